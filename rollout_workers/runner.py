"""Start rollout workers and stream episodes from them into Parquet shards."""
from __future__ import annotations

import time
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from policy_server import PolicyClient, SamplingParams
from prm_service import PRMClient
from rollout_workers.records import StepRecord, shard_path, write_episode
from rollout_workers.tasks import EpisodeTask
from rollout_workers.worker import RolloutWorker


def start_rollout_workers(cfg, agent: str, tokenizer_path: str, policy: PolicyClient | None = None,
                          temperature: float = 0.0, prm: PRMClient | None = None, best_of_n: int = 1) -> list:
    """`cfg.rollout.num_workers` actors, each with `cfg.rollout.envs_per_worker` environments.

    `agent` picks who acts ("llm", "expert", "random"); "llm" needs `policy` and samples at
    `temperature` (with `policy.top_p`, at most `policy.max_new_tokens`), and with `prm`
    plays Best-of-`best_of_n`.
    """
    sampling = SamplingParams(temperature=temperature, top_p=cfg.policy.top_p, max_tokens=cfg.policy.max_new_tokens,
                              n=best_of_n if prm else 1)
    actor = ray.remote(RolloutWorker).options(
        num_cpus=cfg.rollout.num_cpus, resources=dict(cfg.rollout.resources),
        max_concurrency=cfg.rollout.envs_per_worker,
        # A crashed worker comes back and replays its episodes from their start.
        max_restarts=cfg.rollout.max_restarts, max_task_retries=-1,
    )
    prompt = OmegaConf.to_container(cfg.prompt) if isinstance(cfg.prompt, DictConfig) else dict(cfg.prompt)
    return [
        actor.remote(i, cfg.rollout.envs_per_worker, agent, tokenizer_path, cfg.env.max_steps,
                     prompt, policy, sampling, prm)
        for i in range(cfg.rollout.num_workers)
    ]


def missing_episodes(tasks: list[EpisodeTask], episodes_dir: Path) -> list[EpisodeTask]:
    """The tasks whose episode has no shard in `episodes_dir` yet."""
    return [t for t in tasks if not shard_path(episodes_dir, t.episode_id).exists()]


def run_episodes(workers: list, envs_per_worker: int, tasks: list[EpisodeTask], episodes_dir: Path,
                 desc: str = "episodes", timeout_s: float = 3600.0) -> int:
    """Play every task whose shard is missing; write each episode as it finishes.

    Each worker gets at most `envs_per_worker` episodes at a time and a new one as soon as
    one finishes, so fast and slow games balance across workers. Returns episodes played.
    """
    todo = missing_episodes(tasks, episodes_dir)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc, unit="ep", dynamic_ncols=True)
    pending: dict[ray.ObjectRef, int] = {}  # episode future -> worker index
    queue = list(reversed(todo))
    for w in range(len(workers)):
        for _ in range(envs_per_worker):
            if queue:
                pending[workers[w].play.remote(queue.pop())] = w
    won = played = 0
    last_progress = time.monotonic()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=60)
        if not ready:
            if time.monotonic() - last_progress > timeout_s:
                raise TimeoutError(f"no episode finished in {timeout_s:.0f} s; {len(pending)} in flight")
            continue
        worker = pending.pop(ready[0])
        steps: list[StepRecord] = ray.get(ready[0])
        write_episode(episodes_dir, steps)
        played += 1
        won += steps[-1].won
        last_progress = time.monotonic()
        bar.update(1)
        bar.set_postfix(won=f"{won}/{played}")
        if queue:
            pending[workers[worker].play.remote(queue.pop())] = worker
    bar.close()
    return played
