"""Chaos run: one small AgentPRM iteration while its processes are SIGKILLed at random.

    python -m bench.chaos [--mean-interval-s 40] [--seed 0] [--no-baseline] [key=value ...]

Starts a local Ray and runs `driver.py mode=train` on it (one iteration from
`init_policy`, at the small size of `SMALL`, plus any key=value overrides) twice: once
undisturbed (the baseline) and once while a thread here SIGKILLs a random live process among
the rollout workers, policy and PRM replicas and learner workers (of the kind killed least
so far among those alive), at exponentially distributed intervals. A run the driver stops (restarts used up) is run again, as a user
would: it resumes. Then, for each run: the kills, the episodes each playing stage requested,
wrote, lost and wrote twice (goal: 0 and 0), what each restarted replica served (its console
line), the learners' resumes, and the wall time the kills cost. Figures are printed and saved
as JSON in bench/results/chaos.json. Kills are what a crash, an OOM kill or a preempted node
does to a process: no cleanup runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver joins this Ray from another process

import ray  # noqa: E402
from ray._private import state as ray_state  # noqa: E402  (the actor table, without the dashboard)

from bench import machine  # noqa: E402
from configs import REPO_ROOT, ConfigError, load_config  # noqa: E402
from rollout_workers import read_steps  # noqa: E402

# One iteration small enough for a 2-core machine: 4 games x 2 rollouts, a PRM of at most 2
# steps and DPO of at most 4 on 2 learner workers (a push and a checkpoint every 2; fewer steps
# when the rollouts hold fewer episodes or states), 8 evaluation games.
SMALL = ["mode=train", "iterations=1", "critic.num_games=4", "critic.rollouts_per_game=2",
         "critic.val_fraction=0.5", "env.max_steps=15", "eval.num_games=8", "best_of_n.sizes=[]",
         "rollout.num_workers=2", "rollout.envs_per_worker=2", "learner.num_workers=2", "learner.max_failures=3",
         "prm.max_steps=2", "prm.batch_size=4", "prm.micro_batch_size=1", "prm.checkpoint_every=1",
         "dpo.max_steps=4", "dpo.batch_size=2", "dpo.micro_batch_size=1",
         "dpo.push_every=2", "dpo.checkpoint_every=2", "dpo.monitor_games=0"]
TARGETS = ("RolloutWorker", "PolicyServer", "PRMServer", "RayTrainWorker")
RESTARTED = re.compile(r"(policy server|PRM service): replica restarted \(pid (\d+)\), at version (\d+)")
RESUMED = re.compile(r"(\w+): resuming after step (\d+)")


class Chaos(threading.Thread):
    """SIGKILLs a live target process every Exp(mean_interval_s) seconds until stopped."""

    def __init__(self, rng: random.Random, mean_interval_s: float):
        super().__init__(daemon=True)
        self.rng, self.mean_interval_s = rng, mean_interval_s
        self.stopped, self.kills, self.start_time = threading.Event(), [], time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(self.rng.expovariate(1 / self.mean_interval_s)):
            alive = sorted((a for a in ray_state.actors().values()
                            if a["State"] == "ALIVE" and a["ActorClassName"] in TARGETS and a["Pid"]),
                           key=lambda a: a["ActorID"])
            if not alive:
                continue
            # The kind killed least so far among those alive, so every kind is hit in its stage
            # (the PRM replica lives only through DPO); a random process of that kind.
            killed = {kind: sum(k["actor"] == kind for k in self.kills) for kind in TARGETS}
            fewest = min(killed[a["ActorClassName"]] for a in alive)
            victim = self.rng.choice([a for a in alive if killed[a["ActorClassName"]] == fewest])
            try:
                os.kill(victim["Pid"], signal.SIGKILL)
            except ProcessLookupError:  # it ended between the table and the kill
                continue
            self.kills.append({"t_s": round(time.monotonic() - self.start_time, 1), "actor": victim["ActorClassName"],
                               "pid": victim["Pid"], "restarts_before": victim["NumRestarts"]})
            print(f"chaos: SIGKILL {victim['ActorClassName']} pid {victim['Pid']}", flush=True)


def run_driver(args: list[str], address: str, log: Path, max_runs: int) -> tuple[int, float, str]:
    """The driver until it finishes (a stopped run is run again: it resumes), at most
    `max_runs` times; its console goes to the terminal and to `log`. Returns (runs, wall, output)."""
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_DEDUP_LOGS": "0"}  # every restart's line, not one for several
    start, output = time.monotonic(), ""
    for run in range(1, max_runs + 1):
        with subprocess.Popen([sys.executable, "driver.py", *args], cwd=REPO_ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as driver, log.open("a") as f:
            for line in driver.stdout:
                sys.stdout.write(line)
                f.write(line)
                output += line
        if driver.returncode == 0:
            return run, time.monotonic() - start, output
        print(f"chaos: the driver stopped (exit {driver.returncode}); running it again", flush=True)
    raise RuntimeError(f"the driver did not finish in {max_runs} runs; its console: {log}")


def episode_counts(run_dir: Path, cfg) -> dict:
    """Per playing stage: episodes requested, written, lost, and written twice (an episode id
    in two shards cannot happen, one name per episode; a step twice within one can)."""
    evaluation = cfg.eval.num_games * cfg.eval.episodes_per_game
    stages = {"pi0_evaluation": (run_dir / "eval_pi0/eval", evaluation),
              "rollouts": (run_dir / "iter_1/critic/rollouts", cfg.critic.num_games * cfg.critic.rollouts_per_game),
              "pi1_evaluation": (run_dir / "iter_1/eval/eval", evaluation)}
    counts = {}
    for name, (folder, requested) in stages.items():
        steps = read_steps(folder).select(["episode_id", "step"]).to_pylist()
        written = len({s["episode_id"] for s in steps})
        counts[name] = {"requested": requested, "written": written, "lost": requested - written,
                        "duplicated_steps": len(steps) - len({(s["episode_id"], s["step"]) for s in steps})}
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="driver key=value overrides, after the small size's")
    parser.add_argument("--init-policy", default="smollm2-135m-instruct", help="π0 (a model name or folder)")
    parser.add_argument("--mean-interval-s", type=float, default=40.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kills' times and victims")
    parser.add_argument("--no-baseline", action="store_true", help="skip the undisturbed run (no wall cost then)")
    parser.add_argument("--max-runs", type=int, default=4, help="driver runs (a first and resumes) per iteration")
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs" / f"chaos-{datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/chaos.json")
    args = parser.parse_args()
    driver_args = [*SMALL, f"init_policy={args.init_policy}", *args.overrides]
    try:
        cfg = load_config(driver_args)  # a bad override stops here, in one line, before anything starts
    except ConfigError as error:
        sys.exit(f"chaos: {error}")
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=8, include_dashboard=False)  # 8 logical CPUs: every stage fits
    address = ray.get_runtime_context().gcs_address
    results = {"machine": machine(cfg.policy.torch_threads), "driver_args": driver_args,
               "mean_interval_s": args.mean_interval_s, "seed": args.seed, "runs": {}}
    try:
        for name in ([] if args.no_baseline else ["baseline"]) + ["chaos"]:
            run_dir = args.runs_dir / name
            chaos = Chaos(random.Random(args.seed), args.mean_interval_s) if name == "chaos" else None
            if chaos:
                chaos.start()
            try:
                runs, wall, output = run_driver([*driver_args, f"run_dir={run_dir}"], address,
                                                args.runs_dir / f"{name}.log", args.max_runs)
            finally:
                if chaos:
                    chaos.stopped.set()
                    chaos.join()
            results["runs"][name] = {
                "wall_s": round(wall, 1), "driver_runs": runs, "kills": chaos.kills if chaos else [],
                "episodes": episode_counts(run_dir, cfg),
                "restarted_replicas": [{"service": m[0], "pid": int(m[1]), "version": int(m[2])}
                                       for m in RESTARTED.findall(output)],
                "learner_resumes": [{"learner": m[0], "after_step": int(m[1])} for m in RESUMED.findall(output)],
                "summary": json.loads((run_dir / "summary.json").read_text())}
    finally:
        ray.shutdown()
    runs = results["runs"]
    if "baseline" in runs:
        results["extra_wall_s"] = round(runs["chaos"]["wall_s"] - runs["baseline"]["wall_s"], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    for name, run in runs.items():
        lost = sum(e["lost"] for e in run["episodes"].values())
        twice = sum(e["duplicated_steps"] for e in run["episodes"].values())
        print(f"{name}: {len(run['kills'])} kills, {run['driver_runs']} driver runs, {lost} episodes lost, "
              f"{twice} steps written twice, {run['wall_s']:.0f} s; restarted replicas served "
              f"{[r['version'] for r in run['restarted_replicas']]}; learner resumes "
              f"{[(r['learner'], r['after_step']) for r in run['learner_resumes']]}")
    if "extra_wall_s" in results:
        print(f"the kills cost {results['extra_wall_s']:.0f} s of wall time")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
