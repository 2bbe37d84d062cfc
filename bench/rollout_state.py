"""Rollout cost of the policy's state: the whole episode as one conversation vs a window.

    .venv/bin/python -m bench.rollout_state --model FOLDER [--games 16] [--states episode window]

The same policy plays the same eval_out_of_distribution games (greedy, `--max-steps` at
most) on the vLLM engine behind the policy server, with Ray rollout workers as in a run,
once per `prompt.state`. For each: environment steps per second, the prompt tokens the
engine computed per step (asked for minus served from its prefix cache), and the mean time
the agent waited for its answer at step 5 and at step 40 of the episodes that reached them
(the episode's history grows in between). Printed and saved as JSON in
bench/results/rollout_state.json. Run it on a quiet machine: it measures wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import ray  # noqa: E402

from bench import machine  # noqa: E402
from configs import REPO_ROOT, load_config  # noqa: E402
from envs import list_games, pick_games, resolve_data_root  # noqa: E402
from policy_server import resolve_model, start_policy_servers  # noqa: E402
from rollout_workers import EpisodeTask, read_steps, run_episodes, start_rollout_workers, summarize  # noqa: E402

LATENCY_STEPS = (5, 40)


def play(cfg, games, model_path: str) -> dict:
    policy = start_policy_servers(cfg.policy, model_path, cfg.seed)
    workers = start_rollout_workers(cfg, "llm", model_path, policy, cfg.eval.temperature)
    ray.get([w.__ray_ready__.remote() for w in workers], timeout=300)
    policy.wait_ready()
    tasks = [EpisodeTask(g, 0, seed=i) for i, g in enumerate(games)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_episodes(workers, cfg.rollout.envs_per_worker, tasks, Path(tmp), desc=cfg.prompt.state)
        seconds = time.perf_counter() - start
        steps = read_steps(Path(tmp))
    stats = policy.stats()[0]
    for w in workers:
        ray.kill(w)
    policy.shutdown()
    rows = steps.select(["step", "act_seconds"]).to_pylist()
    report = summarize(steps)
    return {
        "state": cfg.prompt.state, "env_steps": steps.num_rows, "seconds": round(seconds, 1),
        "env_steps_per_s": round(steps.num_rows / seconds, 2),
        "prompt_tokens_per_step": round(stats["prompt_tokens"] / steps.num_rows, 1),
        "computed_prompt_tokens_per_step": round((stats["prompt_tokens"] - stats["cached_prompt_tokens"])
                                                 / steps.num_rows, 1),
        **{f"act_seconds_at_step_{k}": mean_or_none([r["act_seconds"] for r in rows if r["step"] == k])
           for k in LATENCY_STEPS},
        **{f"episodes_reaching_step_{k}": sum(r["step"] == k for r in rows) for k in LATENCY_STEPS},
        "success_rate": report["success_rate"], "mean_steps": round(report["mean_steps"], 1),
    }


def mean_or_none(values: list[float]) -> float | None:
    return round(statistics.mean(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the policy: a Hugging Face folder (e.g. a π0)")
    parser.add_argument("--games", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--states", nargs="+", default=["episode", "window"], choices=["episode", "window"])
    parser.add_argument("--engine", choices=["hf", "vllm"], default="vllm")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/rollout_state.json"))
    args = parser.parse_args()

    base = [f"policy.model={args.model}", f"env.max_steps={args.max_steps}", f"policy.engine={args.engine}",
            "policy.torch_threads=2", "policy.vllm.kv_cache_gb=1", "rollout.num_workers=2", "rollout.envs_per_worker=4"]
    cfg = load_config(base)
    games = pick_games(list_games("eval_out_of_distribution", resolve_data_root(cfg.data.archive)), args.games)
    model_path = resolve_model(cfg.policy.model)
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             object_store_memory=2**30)
    results = {"machine": machine(torch_threads=2), "engine": args.engine, "model": args.model,
               "games": args.games, "max_steps": args.max_steps, "runs": []}
    for state in args.states:
        results["runs"].append(play(load_config([*base, f"prompt.state={state}"]), games, model_path))
        print(results["runs"][-1], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))  # written as each state completes
    print(f"\n{'state':<8} {'steps/s':>8} {'prompt tok/step':>16} {'computed tok/step':>18} "
          f"{'s at step 5':>12} {'s at step 40':>13} {'success':>8}")
    for r in results["runs"]:
        print(f"{r['state']:<8} {r['env_steps_per_s']:>8.2f} {r['prompt_tokens_per_step']:>16.1f} "
              f"{r['computed_prompt_tokens_per_step']:>18.1f} {r['act_seconds_at_step_5'] or 0:>12.3f} "
              f"{r['act_seconds_at_step_40'] or 0:>13.3f} {r['success_rate']:>8.1%}")
    print(f"saved {args.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
