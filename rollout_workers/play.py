"""Playing a set of episodes as one step of a run: the servers up, the missing episodes
played into shards, the servers down, the report.

    report = evaluate(cfg, Acting("llm", "runs/x/sft/policy"), run_dir)          # greedy
    report = evaluate(cfg, Acting("llm", policy, 0.7, best_of_n=16, prm=prm_dir), run_dir, name="bon_16")

Every stage that plays (evaluations, stage 1's rollouts, Best-of-N, the expert's
demonstrations) says who acts and how in an `Acting`: its own temperature and PRM, never
another section's knobs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
from omegaconf import DictConfig

from envs import list_games, pick_games, resolve_data_root
from policy_server import resolve_model, start_policy_servers
from prm_service import start_prm_servers
from rollout_workers.evaluation import format_report, summarize
from rollout_workers.records import read_steps
from rollout_workers.runner import missing_episodes, run_episodes, start_rollout_workers
from rollout_workers.tasks import EpisodeTask, episode_tasks
from stages import stage_clock


@dataclass(frozen=True)
class Acting:
    """Who plays and how. `agent`: llm (the policy server), expert (handcoded) or random
    (admissible commands); `model`: the policy (a model name or folder), whose tokenizer
    renders every agent's prompts. The LLM samples at `temperature`; with `prm` (a PRM
    folder) it plays Best-of-`best_of_n`: that many samples per step, the PRM's best played."""
    agent: str
    model: str
    temperature: float = 0.0
    best_of_n: int = 1
    prm: str | None = None


def play(cfg: DictConfig, acting: Acting, episodes_dir: Path, split: str, num_games: int | None,
         episodes_per_game: int, demonstrations: dict[str, list[str]] | None = None) -> tuple[pa.Table, dict]:
    """Play `episodes_per_game` episodes of `num_games` games of the split (`pick_games`: the
    same games in every run, task types in their shares), one shard per episode in
    `episodes_dir`; with `demonstrations` (game id -> its demonstration's commands), episodes
    start from the reset distribution of `critic.reset_fraction`.

    Returns the episodes' step records and their report (success overall and per task type).
    """
    games = pick_games(list_games(split, resolve_data_root(cfg.data.archive)), num_games)
    tasks = episode_tasks(games, episodes_per_game, cfg.seed, cfg.critic.reset_fraction, cfg.env.max_steps,
                          demonstrations)
    episodes_dir.mkdir(parents=True, exist_ok=True)
    # The time spent playing, summed over every run that worked on these episodes; the leading
    # underscore keeps it out of the folder as a Parquet dataset (Arrow and Ray Data skip such files).
    with stage_clock(episodes_dir / "_playing_time.json") as playing_time:
        if missing_episodes(tasks, episodes_dir):  # a finished set starts no servers
            play_missing(cfg, acting, tasks, episodes_dir, desc=f"{acting.agent} on {split}")
    steps = read_steps(episodes_dir, [t.episode_id for t in tasks])
    report = summarize(steps)
    llm = acting.agent == "llm"
    report.update(split=split, games=len(games), max_steps=cfg.env.max_steps, seed=cfg.seed, agent=acting.agent,
                  model=acting.model if llm else None, wall_time_s=round(playing_time(), 1),
                  temperature=acting.temperature if llm else None,
                  best_of_n=acting.best_of_n if llm and acting.prm else None, prm=acting.prm if llm else None)
    return steps, report


def play_missing(cfg: DictConfig, acting: Acting, tasks: list[EpisodeTask], episodes_dir: Path, desc: str) -> None:
    """Start the policy server (and the PRM service for Best-of-N) and the rollout workers,
    play the tasks without a shard, and stop them all."""
    model_path = resolve_model(acting.model)
    llm = acting.agent == "llm"
    policy = start_policy_servers(cfg.policy, model_path, cfg.seed) if llm else None
    prm = start_prm_servers(cfg.prm_service, acting.prm) if llm and acting.prm else None
    workers = start_rollout_workers(cfg, acting.agent, model_path, policy, acting.temperature, prm, acting.best_of_n)
    try:
        run_episodes(workers, cfg.rollout.envs_per_worker, tasks, episodes_dir, desc=desc)
    finally:  # free their CPUs for the next stage
        for worker in workers:
            ray.kill(worker)
        for server in (policy, prm):
            if server:
                server.shutdown()


def evaluate(cfg: DictConfig, acting: Acting, run_dir: Path, split: str | None = None, name: str = "eval") -> dict:
    """Success of `acting` on a split (default `eval.split`, `eval.num_games` games); the
    episodes in run_dir/<name>/, the report in run_dir/<name>.json."""
    split = split or cfg.eval.split
    _, report = play(cfg, acting, run_dir / name, split, cfg.eval.num_games, cfg.eval.episodes_per_game)
    (run_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report
