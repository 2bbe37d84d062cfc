"""AgentPRM stage 1: Monte Carlo Q-targets from rollouts of the current policy.

For an episode of length T with outcome r (+1 won, -1 lost), step t gets the discounted
return to go gamma^(T-1-t) * r (or gamma^t * r, the reference code's `from_start`).
Identical (state, action) pairs, that is the same prompt (the policy's state as
`prompt.state` builds it: exactly what the PRM reads) and the
same command, are merged and their returns averaged: the Monte Carlo estimate of Q. The
loss reads it rescaled to [0, 1]. Preference pairs for the relative loss are actions at
one state whose estimates differ by more than a margin (on the [-1, 1] scale, as in the
reference code).

Games are split into train and validation by task folder (the trials of one task in one
room share their first states), so validation states are unseen in training; folders with
a won episode and folders without are sampled apart, so validation holds both outcomes.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DISCOUNTS = ("to_go", "from_start")

QTARGET_SCHEMA = pa.schema([
    ("game_id", pa.string()), ("task_type", pa.string()), ("split", pa.string()),
    ("prompt", pa.string()), ("action", pa.string()),
    ("response", pa.string()),  # the response most often written for this action (first seen on ties)
    ("mc_return", pa.float32()),  # mean discounted return in [-1, 1]
    ("target", pa.float32()),  # (mc_return + 1) / 2, the loss's soft label
    ("visits", pa.int32()), ("wins", pa.int32()),  # visits from episodes that were won
])
PAIR_SCHEMA = pa.schema([
    ("game_id", pa.string()), ("split", pa.string()), ("prompt", pa.string()),
    ("chosen", pa.string()), ("rejected", pa.string()),
    ("chosen_target", pa.float32()), ("rejected_target", pa.float32()),
])


def split_games(game_ids: list[str], val_fraction: float, seed: int,
                won_games: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """The validation games: those of a seeded sample of ceil(fraction x task folders) task
    folders (a game id is "<task folder>/<trial folder>"); none if the fraction is 0.

    With `won_games` (AgentPRM: the games of won episodes), folders with a win and folders
    without are sampled apart, each at the fraction but leaving training at least one, so the
    validation AUC has both outcomes to separate whenever the rollouts have two folders with
    a win (a plain sample of 4 of 20 folders missed all 4 with wins)."""
    folders = sorted({g.split("/")[0] for g in game_ids})
    won_folders = {g.split("/")[0] for g in won_games}
    rng = random.Random(seed)
    held_out: set[str] = set()
    for group in ([f for f in folders if f in won_folders], [f for f in folders if f not in won_folders]):
        rng.shuffle(group)
        take = math.ceil(val_fraction * len(group))
        held_out |= set(group[:take if not won_folders else min(take, len(group) - 1)])
    return {g for g in game_ids if g.split("/")[0] in held_out}


def episode_returns(steps: list[int], won: bool, gamma: float, discount: str) -> list[float]:
    """The Monte Carlo return of each recorded step (the game's step numbers, in order: an
    episode from the reset distribution starts past 0)."""
    r = 1.0 if won else -1.0
    if discount == "to_go":
        return [gamma ** (steps[-1] - t) * r for t in steps]
    if discount == "from_start":
        return [gamma ** t * r for t in steps]
    raise ValueError(f"unknown discount {discount!r}; one of {DISCOUNTS}")


def q_targets(steps: pa.Table, gamma: float, discount: str, val_games: set[str]) -> pa.Table:
    """One row per distinct (prompt, action) of the step records, with its MC estimate."""
    episodes: dict[str, list[dict]] = defaultdict(list)
    for row in steps.select(["episode_id", "game_id", "task_type", "step", "prompt", "response", "action",
                             "won"]).to_pylist():
        episodes[row["episode_id"]].append(row)
    merged: dict[tuple[str, str, str], dict] = {}
    for episode_id in sorted(episodes):
        rows = sorted(episodes[episode_id], key=lambda r: r["step"])
        won = any(r["won"] for r in rows)
        split = "val" if rows[0]["game_id"] in val_games else "train"
        for row, ret in zip(rows, episode_returns([r["step"] for r in rows], won, gamma, discount)):
            entry = merged.setdefault((split, row["prompt"], row["action"]), {
                "game_id": row["game_id"], "task_type": row["task_type"], "returns": [], "wins": 0,
                "responses": defaultdict(int)})
            entry["returns"].append(ret)
            entry["wins"] += won
            entry["responses"][row["response"]] += 1
    out = []
    for (split, prompt, action), e in merged.items():
        mc = float(np.mean(e["returns"]))
        out.append({"game_id": e["game_id"], "task_type": e["task_type"], "split": split, "prompt": prompt,
                    "action": action,
                    "response": max(e["responses"], key=e["responses"].get),  # dicts keep first-seen order
                    "mc_return": mc, "target": (mc + 1) / 2, "visits": len(e["returns"]), "wins": e["wins"]})
    return pa.Table.from_pylist(out, schema=QTARGET_SCHEMA)


def preference_pairs(targets: pa.Table, margin: float) -> pa.Table:
    """(chosen, rejected) for every two actions at one state whose Monte Carlo estimates
    (in [-1, 1]) differ by more than `margin`."""
    by_state: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in targets.select(["game_id", "split", "prompt", "response", "mc_return", "target"]).to_pylist():
        by_state[(row["split"], row["prompt"])].append(row)
    pairs = []
    for (_, prompt), rows in by_state.items():
        for a in rows:
            for b in rows:
                if a["mc_return"] - b["mc_return"] > margin:
                    pairs.append({"game_id": a["game_id"], "split": a["split"], "prompt": prompt,
                                  "chosen": a["response"], "rejected": b["response"],
                                  "chosen_target": a["target"], "rejected_target": b["target"]})
    return pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA)


def summarize_dataset(steps: pa.Table, targets: pa.Table, pairs: pa.Table) -> dict:
    """The numbers the stage reports: sizes, how often states repeat, the target histogram."""
    per_state = defaultdict(int)
    for prompt in targets["prompt"].to_pylist():
        per_state[prompt] += 1
    won_episodes = {e for e, w in zip(steps["episode_id"].to_pylist(), steps["won"].to_pylist()) if w}
    counts, edges = np.histogram(targets["target"].to_numpy(), bins=10, range=(0.0, 1.0))
    split = targets["split"].to_pylist()
    return {
        "transitions": steps.num_rows,
        "episodes": len(set(steps["episode_id"].to_pylist())),
        "episodes_won": len(won_episodes),
        "unique_state_actions": targets.num_rows,
        "unique_states": len(per_state),
        "states_with_several_actions": sum(n > 1 for n in per_state.values()),
        "pairs": pairs.num_rows,
        "train_state_actions": split.count("train"), "val_state_actions": split.count("val"),
        "val_games": len({g for g, s in zip(targets["game_id"].to_pylist(), split) if s == "val"}),
        "target_histogram": {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist()},
    }


def build_dataset(steps: pa.Table, out_dir: Path, gamma: float, discount: str, margin: float,
                  val_fraction: float, seed: int) -> dict:
    """Q-targets, pairs and their summary from rollouts: qtargets.parquet, pairs.parquet."""
    won = {g for g, w in zip(steps["game_id"].to_pylist(), steps["won"].to_pylist()) if w}
    val_games = split_games(steps["game_id"].to_pylist(), val_fraction, seed, won)
    targets = q_targets(steps, gamma, discount, val_games)
    pairs = preference_pairs(targets, margin)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(targets, out_dir / "qtargets.parquet")
    pq.write_table(pairs, out_dir / "pairs.parquet")
    return summarize_dataset(steps, targets, pairs)
