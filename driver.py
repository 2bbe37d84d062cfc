"""AgentPRM driver: one command for every stage of the pipeline.

    python driver.py                        # the embedded default job (configs/default.yaml)
    python driver.py mode=eval eval.num_games=20 policy.model=PATH
    python driver.py mode=demos             # the handcoded expert's demonstrations (train split)
    python driver.py mode=sft               # demonstrations -> SFT (DeepSpeed on Ray Train) -> π0, evaluated
    python driver.py mode=critic policy.model=runs/x/sft/policy   # rollouts -> Q-targets -> PRM -> Best-of-N
    python driver.py mode=eval "best_of_n.sizes=[1,8]" best_of_n.prm=runs/x/critic/prm   # Best-of-N with a PRM
    python driver.py mode=train iterations=2  # AgentPRM: π0 by SFT, then 2 x (rollouts, PRM, online DPO, eval)
    python driver.py mode=train algorithm=inverseprm   # InversePRM: the PRM from demonstrations alone
    python driver.py mode=serve policy.model=runs/x/iter_1/dpo/policy   # OpenAI-compatible endpoints until stopped
    python driver.py --config configs/other.yaml key=value ...

Without $RAY_ADDRESS it starts a local Ray; under `ray job submit` it joins the cluster.
Every run writes into its run directory (config.yaml, a folder of episode shards per stage,
reports); running again with the same `run_dir=` resumes: finished episodes are not played
again, finished stages are not redone.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

# Before `import ray`: keep a local head on loopback, no usage reporting, no hub downloads.
_ENV_DEFAULTS = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
for _k, _v in _ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from configs import REPO_ROOT, ConfigError, load_config, save_config  # noqa: E402
from envs import list_games, pick_games, resolve_data_root  # noqa: E402
from learners import (RewardHackingMonitor, build_dataset, build_transitions, learner_failure,  # noqa: E402
                      sample_next_actions, states_of, train_dpo, train_inverse_prm, train_prm, train_sft,
                      without_outcome)
from policy_server import SamplingParams, resolve_model, start_policy_servers  # noqa: E402
from prm_service import start_prm_servers  # noqa: E402
from reports import (plot_best_of_n, plot_monitor, plot_reliability, plot_success,  # noqa: E402
                     plot_target_histogram)
from reports.paired import paired  # noqa: E402
from rollout_workers import (Acting, demonstrated_commands, episode_tasks, evaluate,  # noqa: E402
                             format_report, start_rollout_workers)
from rollout_workers.demonstrations import collect_demos  # noqa: E402
from rollout_workers.play import play  # noqa: E402
from serving.replicas import unrecoverable  # noqa: E402
from stages import stage, stage_walls  # noqa: E402


def init_ray(cfg: DictConfig) -> None:
    """Join the cluster of `ray.address` / $RAY_ADDRESS, or start a local Ray sized for the job."""
    runtime_env = {"env_vars": {k: os.environ[k] for k in _ENV_DEFAULTS}}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # A local Ray offers what the job's actors ask for, so none of them waits forever.
    # Stages run one after the other, so the largest stage sets the size.
    uses_prm = cfg.mode in ("critic", "train") or cfg.best_of_n.prm
    prm_cpus = cfg.prm_service.replicas * cfg.prm_service.num_cpus if uses_prm else 0
    servers = cfg.policy.replicas * cfg.policy.num_cpus + prm_cpus
    learners = cfg.learner.num_workers * cfg.learner.num_cpus_per_worker
    rollouts = cfg.rollout.num_workers * cfg.rollout.num_cpus
    monitor = rollouts if cfg.dpo.monitor_games else 0  # the monitor's own rollout workers, during DPO
    cpus = max(rollouts + servers,
               learners if cfg.mode in ("sft", "critic") else 0,
               learners + servers + monitor if cfg.mode == "train" else 0)  # DPO: learners sample from both servers
    resources: dict[str, float] = {}
    for per_actor, count in ((cfg.rollout.resources, cfg.rollout.num_workers),
                             (cfg.policy.resources, cfg.policy.replicas),
                             (cfg.prm_service.resources, cfg.prm_service.replicas),
                             (cfg.learner.resources_per_worker, cfg.learner.num_workers)):
        for key, amount in per_actor.items():
            resources[key] = resources.get(key, 0) + amount * count
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)), resources=resources,
             object_store_memory=int(cfg.ray.object_store_memory_gb * 2**30), runtime_env=runtime_env,
             include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1")
    needed, have = cfg.policy.replicas * cfg.policy.num_gpus, ray.cluster_resources().get("GPU", 0)
    if needed > have:
        ray.shutdown()
        raise ConfigError(f"config: the policy servers need {needed:g} GPUs and this machine has {have:g}")


def sft(cfg: DictConfig, run_dir: Path) -> dict:
    """π0: fine-tune `policy.model` on expert demonstrations, then evaluate it.

    Each stage is skipped when its output exists, so re-running the command resumes: the
    demonstrations (demos.parquet), training (sft/policy; a stopped training continues from
    its last checkpoint), the evaluations (episode shards per split).
    """
    demos = demos_path(cfg, run_dir)
    if not demos.exists():
        collect_demos(cfg, run_dir)
    policy = run_dir / "sft" / "policy"
    if not (policy / "config.json").exists():  # (runs from before SFT had a manifest have the policy alone)
        stage(run_dir / "sft", "sft", lambda: {"policy": str(train_sft(cfg, demos, resolve_model(cfg.policy.model),
                                                                       run_dir / "sft"))})
        wall = json.loads((run_dir / "sft" / "manifest.json").read_text())["wall_time_s"]
        print(f"π0: {policy} ({wall:.0f} s of training)", flush=True)
    return {split: evaluate(cfg, policy_acting(cfg, str(policy)), run_dir, split, name=f"eval_sft_{split}")
            for split in cfg.sft.eval_splits}


def policy_acting(cfg: DictConfig, model: str) -> Acting:
    """The policy `model` as every evaluation plays it: at `eval.temperature` (0: greedy)."""
    return Acting("llm", model, cfg.eval.temperature)


def best_of_n_acting(cfg: DictConfig, model: str, n: int, prm_dir: Path) -> Acting:
    """Best-of-`n` of the policy `model` against the PRM in `prm_dir`, sampling at `best_of_n.temperature`."""
    return Acting("llm", model, cfg.best_of_n.temperature, n, str(prm_dir))


def demos_path(cfg: DictConfig, run_dir: Path) -> Path:
    """The expert demonstrations: `sft.demos`, else the run's own demos.parquet."""
    return Path(cfg.sft.demos) if cfg.sft.demos else run_dir / "demos.parquet"


def policy_rollouts(cfg: DictConfig, out: Path, policy_model: str, demos: Path) -> tuple[pa.Table, dict]:
    """Stage 1's rollouts: `critic.rollouts_per_game` episodes per game of `critic.num_games`
    games, the policy alone at `critic.temperature` (out/rollouts/); with
    `critic.reset_fraction`, that share of them starts along the game's demonstration."""
    steps, report = play(cfg, Acting("llm", policy_model, cfg.critic.temperature), out / "rollouts",
                         cfg.critic.split, cfg.critic.num_games, cfg.critic.rollouts_per_game,
                         demonstrations=demonstrated_commands(demos) if cfg.critic.reset_fraction else None)
    print(format_report(report))
    return steps, report


def q_targets_stage(cfg: DictConfig, out: Path, policy_model: str, demos: Path) -> dict:
    """AgentPRM stage 1: the policy's rollouts, their Monte Carlo Q-targets and preference
    pairs (out/qtargets.parquet, out/pairs.parquet, out/dataset.json, out/qtargets.png)."""
    steps, rollouts = policy_rollouts(cfg, out, policy_model, demos)
    dataset = build_dataset(steps, out, cfg.critic.gamma, cfg.critic.discount, cfg.critic.pair_margin,
                            cfg.critic.val_fraction, cfg.seed)
    dataset.update(rollouts=rollouts, states=str(out / "qtargets.parquet"))
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2))
    plot_target_histogram(dataset["target_histogram"], out / "qtargets.png",
                          f"Q-targets of {dataset['unique_state_actions']} (s, a)")
    print(f"stage 1: {dataset['transitions']} transitions, {dataset['unique_state_actions']} unique (s, a), "
          f"{dataset['states_with_several_actions']} states with several actions, {dataset['pairs']} pairs",
          flush=True)
    return dataset


def transitions_stage(cfg: DictConfig, out: Path, policy_model: str, demos: Path) -> dict:
    """InversePRM stage 1: the policy's rollouts give D-, the expert's demonstrations D+ (with
    a' sampled from the policy at s'), balanced (out/transitions.parquet, out/dataset.json).
    The rollouts' success is logged, never used."""
    steps, rollouts = policy_rollouts(cfg, out, policy_model, demos)
    expert = pq.read_table(demos)
    policy = start_policy_servers(cfg.policy, resolve_model(policy_model), cfg.seed)
    try:
        dataset = build_transitions(
            without_outcome(expert), without_outcome(steps),
            lambda prompts: sample_next_actions(policy, prompts, cfg.critic.temperature, cfg.policy.max_new_tokens,
                                                cfg.seed),
            out, cfg.critic.val_fraction, cfg.seed)
    finally:
        policy.shutdown()
    dataset.update(rollouts=rollouts, states=str(out / "transitions.parquet"))
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2))
    print(f"stage 1: {dataset['expert_transitions']} expert and {dataset['policy_transitions']} policy transitions, "
          f"{dataset['per_side']} of each kept", flush=True)
    return dataset


def agentprm_prm(cfg: DictConfig, out: Path, init: str) -> dict:
    """AgentPRM's PRM: Q(s, a) fitted to the Monte Carlo targets (and pairs) of stage 1."""
    report = train_prm(cfg, out, init, out)
    if report["reliability"]:
        plot_reliability(report["reliability"], out / "prm_reliability.png", "PRM calibration (held-out games)")
    print(f"stage 2: PRM {out / 'prm'}: validation AUC {report['auc']}, calibration error "
          f"{report['expected_calibration_error']}, pair accuracy {report['pair_accuracy']}", flush=True)
    return report


def inverseprm_prm(cfg: DictConfig, out: Path, init: str) -> dict:
    """InversePRM's PRM: r = Q(s, a) - γ·Q(s', a') telling expert from policy transitions."""
    report = train_inverse_prm(cfg, out, init, out)
    print(f"stage 2: PRM {out / 'prm'}: validation AUC {report['auc']} (expert vs policy transitions), "
          f"accuracy {report['accuracy']}", flush=True)
    return report


@dataclass(frozen=True)
class AlgorithmStages:
    """What makes an algorithm (`algorithm`): its stage 1 (the PRM's data, from the policy's
    rollouts) and its stage 2 (the PRM trained on it); stage 3 (DPO) is shared."""
    stage_1: Callable[[DictConfig, Path, str, Path], dict]  # (cfg, out, policy model, demos) -> dataset
    train_prm: Callable[[DictConfig, Path, str], dict]  # (cfg, out, initial weights) -> validation report


ALGORITHM_STAGES = {"agentprm": AlgorithmStages(q_targets_stage, agentprm_prm),
                    "inverseprm": AlgorithmStages(transitions_stage, inverseprm_prm)}


def prm_stage(cfg: DictConfig, out: Path, policy_model: str) -> dict:
    """Stage 2: the PRM (out/prm/, a Hugging Face folder) trained on stage 1's data in `out`,
    and its validation report (out/prm_report.json; AgentPRM: out/prm_reliability.png). Its
    manifest goes to out/prm_stage/, not into the model folder, which is replaced whole."""
    init = resolve_model(policy_model if cfg.prm.init == "policy" else cfg.prm.init)
    return ALGORITHM_STAGES[cfg.algorithm].train_prm(cfg, out, init)


def dpo_stage(cfg: DictConfig, out: Path, policy_model: str, prm_dir: Path, states: Path) -> dict:
    """Stage 3: online DPO of the policy against the PRM; the new policy in out/policy/.
    With `dpo.monitor_games`, the reward-hacking monitor watches the policy versions as they
    reach the server (out/monitor.jsonl, out/monitor.png)."""
    model_path = resolve_model(policy_model)
    policy = start_policy_servers(cfg.policy, model_path, cfg.seed)
    prm = start_prm_servers(cfg.prm_service, str(prm_dir))
    workers, monitor, records = [], None, []
    try:
        if cfg.dpo.monitor_games:
            workers = start_rollout_workers(cfg, "llm", model_path, policy, cfg.eval.temperature)
            games = pick_games(list_games(cfg.eval.split, resolve_data_root(cfg.data.archive)), cfg.dpo.monitor_games)
            held_out = states_of(pq.read_table(states), "val")[:cfg.dpo.monitor_states]
            monitor = RewardHackingMonitor(
                policy, prm, workers, cfg.rollout.envs_per_worker, held_out,
                episode_tasks(games, 1, cfg.seed),
                SamplingParams(temperature=cfg.eval.temperature, top_p=cfg.policy.top_p,
                               max_tokens=cfg.policy.max_new_tokens), out, every=cfg.dpo.monitor_every)
            monitor.start()
        new_policy = train_dpo(cfg, states, model_path, policy, prm, out)
        if monitor:
            records = monitor.stop()
            plot_monitor(records, out / "monitor.png", "PRM score vs real success during DPO")
    finally:
        for worker in workers:
            ray.kill(worker)
        policy.shutdown()
        prm.shutdown()
        if monitor:
            monitor.close()  # before Ray shuts down: its thread must not be left waiting on Ray
    print(f"stage 3: {new_policy}", flush=True)
    return {"policy": str(new_policy), "monitor": records}


def best_of_n_stage(cfg: DictConfig, run_dir: Path, policy_model: str, prm_dir: Path, ns: list[int]) -> dict:
    """Best-of-N(policy, PRM) on `eval.split` for each N of `ns` (bon_<N>/, bon_<N>.json,
    bon.json, bon.png in `run_dir`)."""
    success: dict[int, float] = {}
    for n in ns:
        success[n] = evaluate(cfg, best_of_n_acting(cfg, policy_model, n, prm_dir), run_dir,
                              name=f"bon_{n}")["success_rate"]
    if success:
        (run_dir / "bon.json").write_text(json.dumps({"split": cfg.eval.split, "success_rate": success}, indent=2))
        plot_best_of_n(success, run_dir / "bon.png", f"Best-of-N with the PRM, {cfg.eval.split}")
        print("Best-of-N: " + ", ".join(f"N={n} {s:.1%}" for n, s in success.items()), flush=True)
    return {"success_rate": success}


def critic(cfg: DictConfig, run_dir: Path) -> dict:
    """Stages 1 and 2 of `algorithm` for the policy `policy.model`, then Best-of-N with the new
    PRM; everything in run_dir/critic/. Finished stages are not redone."""
    out = run_dir / "critic"
    dataset = stage(out, "stage_1",
                    lambda: ALGORITHM_STAGES[cfg.algorithm].stage_1(cfg, out, cfg.policy.model,
                                                                    demos_path(cfg, run_dir)))
    report = stage(out / "prm_stage", "prm", lambda: prm_stage(cfg, out, cfg.policy.model))
    bon = stage(out / "bon", "best_of_n", lambda: best_of_n_stage(cfg, out / "bon", cfg.policy.model, out / "prm",
                                                                  list(cfg.best_of_n.sizes)))
    return {"dataset": dataset, "prm": report, "best_of_n": bon}


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """AgentPRM or InversePRM (`algorithm`): π0 (`init_policy`, else SFT in this run), then
    `iterations` critic-then-actor iterations, then the summary. Re-running resumes at the
    first unfinished stage."""
    if cfg.init_policy:
        policy_model = cfg.init_policy
        stage(run_dir / "eval_pi0", "evaluation",
              lambda: evaluate(cfg, policy_acting(cfg, policy_model), run_dir / "eval_pi0"))
        evaluations = {"pi0": run_dir / "eval_pi0" / "eval.json"}
    else:
        sft(cfg, run_dir)
        policy_model = str(run_dir / "sft" / "policy")
        evaluations = {"pi0": run_dir / f"eval_sft_{cfg.eval.split}.json"}
    for i in range(1, cfg.iterations + 1):
        policy_model = iteration(cfg, run_dir, i, policy_model, evaluations)
    return summarize_run(cfg, run_dir, evaluations)


def iteration(cfg: DictConfig, run_dir: Path, i: int, policy_model: str, evaluations: dict[str, Path]) -> str:
    """Iteration i in run_dir/iter_<i>/, from π_{i-1} (`policy_model`) to π_i, as named
    stages (each timed, each skipped when it finished); adds its evaluations' reports to
    `evaluations` and returns π_i. With `best_of_n.sizes`, also Best-of-N(π_{i-1}, Q_{i-1})
    for each N, and Best-of-N(π_i, Q_{i-1}) at the largest (the paper's Figures 2 and 5b)."""
    out, ns = run_dir / f"iter_{i}", list(cfg.best_of_n.sizes)
    algorithm, prm_dir = ALGORITHM_STAGES[cfg.algorithm], out / "critic" / "prm"
    # 1. rollouts of π_{i-1} -> the PRM's data (Monte Carlo Q-targets, or expert vs policy transitions)
    dataset = stage(out / "critic", "stage_1",
                    lambda: algorithm.stage_1(cfg, out / "critic", policy_model, demos_path(cfg, run_dir)))
    # 2. the PRM Q_{i-1} on that data
    stage(out / "critic" / "prm_stage", "prm", lambda: prm_stage(cfg, out / "critic", policy_model))
    if ns:
        stage(out / "bon_before", "best_of_n", lambda: best_of_n_stage(cfg, out / "bon_before", policy_model,
                                                                       prm_dir, ns))
        evaluations.update({f"BoN-{n}(pi{i - 1},Q{i - 1})": out / "bon_before" / f"bon_{n}.json" for n in ns})
    # 3. online DPO of π_{i-1} against Q_{i-1} -> π_i
    policy_model = stage(out / "dpo", "dpo", lambda: dpo_stage(cfg, out / "dpo", policy_model, prm_dir,
                                                               Path(dataset["states"])))["policy"]
    # 4. π_i's evaluation
    stage(out / "eval", "evaluation", lambda: evaluate(cfg, policy_acting(cfg, policy_model), out / "eval"))
    evaluations[f"pi{i}"] = out / "eval" / "eval.json"
    if ns:
        after = best_of_n_acting(cfg, policy_model, max(ns), prm_dir)
        stage(out / "bon_after", "best_of_n", lambda: evaluate(cfg, after, out / "bon_after"))
        evaluations[f"BoN-{max(ns)}(pi{i},Q{i - 1})"] = out / "bon_after" / "eval.json"
    return policy_model


def summarize_run(cfg: DictConfig, run_dir: Path, evaluations: dict[str, Path]) -> dict:
    """summary.json and success.png: every evaluation's success, paired against π0's on the
    same games (exact McNemar), and each stage's wall time; the same as a table on the console."""
    reports = {name: json.loads(path.read_text()) for name, path in evaluations.items() if path.exists()}
    summary = {"algorithm": cfg.algorithm, "split": cfg.eval.split, "games": cfg.eval.num_games,
               "success_rate": {name: r["success_rate"] for name, r in reports.items()},
               "paired_vs_pi0": {name: paired(reports["pi0"], r, ("pi0", name)) for name, r in reports.items()
                                 if name != "pi0" and "pi0" in reports},
               "stage_wall_s": stage_walls(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("stage wall times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in summary["stage_wall_s"].items()))
    plot_success(summary["success_rate"], summary["paired_vs_pi0"], run_dir / "success.png",
                 f"{cfg.algorithm} on {cfg.eval.split}")
    for name, rate in summary["success_rate"].items():
        versus = summary["paired_vs_pi0"].get(name)
        print(f"{name}: {rate:.1%}" + (f" (vs pi0 {versus['difference']:+.1%}, p = {versus['p_value']:.3g})"
                                       if versus else ""), flush=True)
    return summary


def evaluation(cfg: DictConfig, run_dir: Path) -> dict:
    """mode=eval: `rollout.agent` (the policy `policy.model` at `eval.temperature`) on
    `eval.split`; with `best_of_n.prm`, Best-of-N of the policy against that PRM for each N of
    `best_of_n.sizes` instead (bon_<N>.json)."""
    if cfg.best_of_n.prm:
        return best_of_n_stage(cfg, run_dir, cfg.policy.model, Path(cfg.best_of_n.prm), list(cfg.best_of_n.sizes))
    return evaluate(cfg, Acting(cfg.rollout.agent, cfg.policy.model, cfg.eval.temperature), run_dir)


def serve(cfg: DictConfig, run_dir: Path) -> dict:
    """mode=serve: `policy.replicas` replicas of `policy.model` behind OpenAI-compatible
    endpoints on loopback (`policy.openai_port`, replica i on port + i; null or 0: free ports),
    until the process is stopped (Ctrl-C or SIGTERM). The URLs go to run_dir/endpoints.json."""
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    policy = start_policy_servers(cfg.policy, resolve_model(cfg.policy.model), cfg.seed)
    try:
        urls = policy.serve_openai(cfg.policy.openai_port or 0)
        (run_dir / "endpoints.json").write_text(json.dumps({"model": cfg.policy.model, "urls": urls}, indent=2))
        print(f"serving {cfg.policy.model} at {', '.join(urls)} until stopped (Ctrl-C)", flush=True)
        stopped.wait()
    finally:
        policy.shutdown()
    print("stopped serving", flush=True)
    return {"urls": urls}


MODES = {"eval": evaluation, "demos": collect_demos, "sft": sft, "critic": critic, "train": train, "serve": serve}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        run_dir = Path(cfg.run_dir or REPO_ROOT / "runs" / f"{cfg.mode}-{datetime.now():%Y%m%d-%H%M%S}")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
        print(f"run directory: {run_dir}", flush=True)
        init_ray(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        MODES[cfg.mode](cfg, run_dir)
    except (ray.exceptions.RayError, ray.train.TrainingFailedError) as e:
        failure = unrecoverable(e) or learner_failure(e)
        if failure is None:
            raise
        print(f"error: {failure}; what finished is kept: run the same command again to resume", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
