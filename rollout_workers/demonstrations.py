"""The handcoded expert's demonstrations, played once and kept for every later run.

A store is a folder of episode shards, one per (games data, split, step limit, expert):
`<demos.store, default <cache>/demonstrations>/<split>-<max_steps>steps-handcoded-<data>/`. A run asks
for its games and plays only those the store lacks, so a second run, or a run on a subset
of the games, plays none. `store.json` names what the store holds; a store that names
something else is refused, never mixed. The shards' token ids are those of the run that
played them; SFT builds its sequences from their text with its own tokenizer and prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

from configs import cache_dir
from envs.data import DataError, data_fingerprint

EXPERT = "handcoded"  # alfworld's handcoded expert (the only one that needs no model)


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
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(key, indent=2))
        tmp.replace(record)
    return folder / "episodes"
