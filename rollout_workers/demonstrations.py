"""The handcoded expert's demonstrations, played once and kept for every later run.

A store is a folder of episode shards, one per (games data, split, step limit, expert):
`<demos.store, default <cache>/demonstrations>/<split>-<max_steps>steps-<EXPERT>-<data>/`. A run asks
for its games and plays only those the store lacks, so a second run, or a run on a subset
of the games, plays none. `store.json` names what the store holds; a store that names
something else is refused, never mixed. The shards' prompts and token ids are those of the
run that played them: a run rebuilds them from the text with its own tokenizer and
`prompt` section (`as_seen_by`), with the code its rollout workers build the policy's state.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from agent.episode import ChatFormat, replay
from paths import cache_dir
from envs.data import DataError, data_fingerprint, resolve_data_root
from policy_server import resolve_model
from rollout_workers.evaluation import format_report
from rollout_workers.play import Acting, play
from rollout_workers.records import SCHEMA, episodes_in_order

# alfworld's handcoded expert (the only one that needs no model), its ties broken by a random
# stream seeded by the game (envs.AlfworldEnv): a game's demonstration is the same in every store.
# Stores of "handcoded", whose ties drew on the worker's shared random state, are not reused.
EXPERT = "handcoded-seeded"


def demonstration_store(data_root: Path, split: str, max_steps: int, stores: str | None = None) -> Path:
    """The folder of episode shards of the expert's demonstrations of `split` at this step
    limit, under `stores` (`demos.store`; null: the cache's); created on first use."""
    key = {"data": data_fingerprint(data_root), "split": split, "max_steps": max_steps, "expert": EXPERT}
    parent = Path(stores).expanduser() if stores else cache_dir() / "demonstrations"
    folder = parent / f"{split}-{max_steps}steps-{EXPERT}-{key['data']}"
    record = folder / "store.json"
    if record.exists():
        held = json.loads(record.read_text())
        if held != key:
            raise DataError(f"the demonstration store {folder} holds {held}, not {key}: remove it or move it away")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(key, indent=2))
        tmp.replace(record)
    return folder / "episodes"


def as_seen_by(steps: pa.Table, tokenizer, prompt: dict, max_new_tokens: int) -> pa.Table:
    """The demonstrations' prompts and token ids as a policy with this tokenizer and prompt
    section would have been fed them (whole episodes from step 0)."""
    chat, rows = ChatFormat(tokenizer), []
    for episode in episodes_in_order(steps):
        replayed, _ = replay(chat, prompt, episode, max_new_tokens)
        for row, (fed, response) in zip(episode, replayed):
            rows.append({**row, "prompt": tokenizer.decode(fed.prompt_ids), "prompt_ids": fed.new_ids,
                         "context_start": fed.reset, "context_rule": fed.rule, "response_ids": response})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def collect_demos(cfg: DictConfig, run_dir: Path) -> dict:
    """The handcoded expert on `demos.num_games` games of the demos split, played into the
    demonstration store (only the games it lacks); the winning episodes, with their prompts
    and ids as this run's policy sees them, become the run's demos.parquet."""
    store = demonstration_store(resolve_data_root(cfg.data.archive), cfg.demos.split, cfg.env.max_steps,
                                cfg.demos.store)
    steps, report = play(cfg, Acting("expert", cfg.policy.model), store, cfg.demos.split, cfg.demos.num_games, 1)
    won_episodes = pc.filter(steps, steps["won"])["episode_id"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.policy.model),
                                              trust_remote_code=cfg.policy.trust_remote_code)
    demos = as_seen_by(steps.filter(pc.is_in(steps["episode_id"], won_episodes)), tokenizer,
                       OmegaConf.to_container(cfg.prompt), cfg.policy.max_new_tokens)
    pq.write_table(demos, run_dir / "demos.parquet")
    report.update(demo_episodes=len(won_episodes), demo_steps=demos.num_rows, store=str(store.parent))
    (run_dir / "demos.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"demonstrations: {len(won_episodes)} winning episodes, {demos.num_rows} steps -> {run_dir / 'demos.parquet'}")
    return report
