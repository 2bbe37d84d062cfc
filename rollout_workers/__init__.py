"""Rollout workers: Ray actors that play ALFWorld episodes against the policy server.

    report = evaluate(cfg, Acting("llm", model), run_dir)   # a whole stage: servers, workers, shards, report
    workers = start_rollout_workers(cfg, "llm", tokenizer_path, policy, temperature=0.7)
    run_episodes(workers, cfg.rollout.envs_per_worker, tasks, run_dir / "episodes")
    table = read_steps(run_dir / "episodes")     # step records, schema in records.py
"""
from rollout_workers.evaluation import format_report, summarize
from rollout_workers.play import Acting, evaluate
from rollout_workers.records import SCHEMA, StepRecord, read_steps, write_episode
from rollout_workers.runner import missing_episodes, run_episodes, start_rollout_workers
from rollout_workers.tasks import EpisodeTask, demonstrated_commands, episode_seed, episode_tasks, reset_steps
from rollout_workers.worker import NOT_THE_POLICY, RolloutWorker

__all__ = ["Acting", "evaluate", "EpisodeTask", "RolloutWorker", "StepRecord", "SCHEMA", "NOT_THE_POLICY", "read_steps",
           "write_episode", "missing_episodes", "run_episodes", "start_rollout_workers", "summarize", "format_report",
           "episode_seed", "episode_tasks", "reset_steps", "demonstrated_commands"]
