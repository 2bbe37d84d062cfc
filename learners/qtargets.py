"""AgentPRM stage 1: Monte Carlo Q-targets from rollouts of the current policy.

For an episode of length T with outcome r (+1 won, -1 lost), step t gets the discounted
return to go gamma^(T-1-t) * r (or gamma^t * r, the reference code's `from_start`).
Identical (state, action) pairs, that is the same state (the whole prompt the policy was
fed, in token ids: exactly what the PRM reads) and the same command, are merged and their
returns averaged: the Monte Carlo estimate of Q, which every step of the pair gets as its
target. The loss reads it rescaled to [0, 1]. Preference pairs for the relative loss are
actions at one state whose estimates differ by more than a margin (on the [-1, 1] scale,
as in the reference code).

The table keeps one row per step with the episode's ids, so the learner rebuilds each
episode as one token sequence and reads Q at every turn from one pass.

Games are split into train and validation by task folder (the trials of one task in one
room share their first states), so validation states are unseen in training; folders with
a won episode and folders without are sampled apart, so validation holds both outcomes.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from configs.schema import Discount
from rollout_workers.records import episodes_in_order

QTARGET_SCHEMA = pa.schema([
    ("game_id", pa.string()), ("task_type", pa.string()), ("episode_id", pa.string()), ("step", pa.int32()),
    ("split", pa.string()),
    ("context_start", pa.bool_()),  # as in the step records: prompt_ids start a new token sequence
    ("prompt_ids", pa.list_(pa.int32())),  # as in the step records: the ids that extend the sequence
    ("response_ids", pa.list_(pa.int32())), ("response", pa.string()), ("action", pa.string()),
    ("state_key", pa.string()),  # a digest of the whole prompt's ids: equal states, equal keys
    ("mc_return", pa.float32()),  # mean discounted return in [-1, 1] over the visits of (state, action)
    ("target", pa.float32()),  # (mc_return + 1) / 2, the loss's soft label
    ("visits", pa.int32()), ("wins", pa.int32()),  # visits of (state, action), and those from won episodes
])
PAIR_SCHEMA = pa.schema([
    ("game_id", pa.string()), ("split", pa.string()),
    # the steps that took the chosen and the rejected action at one state
    ("chosen_episode", pa.string()), ("chosen_step", pa.int32()),
    ("rejected_episode", pa.string()), ("rejected_step", pa.int32()),
    ("chosen_target", pa.float32()), ("rejected_target", pa.float32()),
])


def state_ids(rows: list[dict]) -> list[list[int]]:
    """The whole prompt of each step of an episode (rows in step order): its context's
    prompt and response ids so far, then the step's own prompt ids."""
    states, context = [], []
    for row in rows:
        if row["context_start"]:
            context = []
        context = context + list(row["prompt_ids"])
        states.append(context)
        context = context + list(row["response_ids"])
    return states


def state_key(ids: list[int]) -> str:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=16).hexdigest()


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
    raise ValueError(f"unknown discount {discount!r}; one of {', '.join(Discount)}")


def q_targets(steps: pa.Table, gamma: float, discount: str, val_games: set[str]) -> pa.Table:
    """One row per step, with the MC estimate of its (state, action) over all its visits."""
    rows = []
    for episode in episodes_in_order(steps.select(["episode_id", "game_id", "task_type", "step", "context_start",
                                                   "prompt_ids", "response_ids", "response", "action", "won"])):
        won = any(r["won"] for r in episode)
        split = "val" if episode[0]["game_id"] in val_games else "train"
        returns = episode_returns([r["step"] for r in episode], won, gamma, discount)
        for row, ret, ids in zip(episode, returns, state_ids(episode)):
            rows.append({**row, "split": split, "state_key": state_key(ids), "mc_return": ret, "won": won})
    merged: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        merged[(row["split"], row["state_key"], row["action"])].append(row)
    out = []
    for visits in merged.values():
        mc = float(np.mean([r["mc_return"] for r in visits]))
        wins = sum(r["won"] for r in visits)
        out += [{**r, "mc_return": mc, "target": (mc + 1) / 2, "visits": len(visits), "wins": wins} for r in visits]
    out.sort(key=lambda r: (r["episode_id"], r["step"]))
    return pa.Table.from_pylist([{k: r[k] for k in QTARGET_SCHEMA.names} for r in out], schema=QTARGET_SCHEMA)


def context_states(steps: pa.Table, split: str) -> list[list[list[int]]]:
    """The distinct states (whole prompts, in ids) of the split's steps, grouped by the token
    sequence they extend (an episode, or its part after a context-rule restart), in step
    order: each is a prefix of the next, so one encoding of a context's last state holds
    them all. A state met in an earlier context (the first turn of two rollouts of one game)
    stays there. `steps`: a table of step rows with `split` (stage 1's qtargets.parquet or
    transitions.parquet)."""
    seen: set[str] = set()
    contexts: list[list[list[int]]] = []
    for rows in episodes_in_order(steps.filter(pc.equal(steps["split"], split)).select(
            ["episode_id", "step", "context_start", "prompt_ids", "response_ids"])):
        for i, (row, ids) in enumerate(zip(rows, state_ids(rows))):
            if i == 0 or row["context_start"]:
                contexts.append([])
            if (key := state_key(ids)) not in seen:
                seen.add(key)
                contexts[-1].append(ids)
    return [c for c in contexts if c]


def states_of(steps: pa.Table, split: str) -> list[list[int]]:
    """The distinct states of the split's steps (as `context_states`), ordered by key."""
    states = {state_key(s): s for context in context_states(steps, split) for s in context}
    return [states[k] for k in sorted(states)]


def distinct_state_actions(targets: pa.Table) -> list[dict]:
    """The first step of every distinct (split, state, action), in table order."""
    seen, out = set(), []
    for row in targets.select(["game_id", "split", "episode_id", "step", "state_key", "action", "mc_return",
                               "target", "visits", "wins"]).to_pylist():
        key = (row["split"], row["state_key"], row["action"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def preference_pairs(targets: pa.Table, margin: float) -> pa.Table:
    """(chosen, rejected) for every two actions at one state whose Monte Carlo estimates
    (in [-1, 1]) differ by more than `margin`; each refers to a step that took it."""
    by_state: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in distinct_state_actions(targets):
        by_state[(row["split"], row["state_key"])].append(row)
    pairs = []
    for rows in by_state.values():
        for a in rows:
            for b in rows:
                if a["mc_return"] - b["mc_return"] > margin:
                    pairs.append({"game_id": a["game_id"], "split": a["split"],
                                  "chosen_episode": a["episode_id"], "chosen_step": a["step"],
                                  "rejected_episode": b["episode_id"], "rejected_step": b["step"],
                                  "chosen_target": a["target"], "rejected_target": b["target"]})
    return pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA)


def summarize_dataset(steps: pa.Table, targets: pa.Table, pairs: pa.Table) -> dict:
    """The numbers the stage reports: sizes, how often states repeat, the target histogram."""
    distinct = distinct_state_actions(targets)
    per_state = defaultdict(int)
    for row in distinct:
        per_state[(row["split"], row["state_key"])] += 1
    won_episodes = {e for e, w in zip(steps["episode_id"].to_pylist(), steps["won"].to_pylist()) if w}
    counts, edges = np.histogram([r["target"] for r in distinct], bins=10, range=(0.0, 1.0))
    split = [r["split"] for r in distinct]
    return {
        "transitions": steps.num_rows,
        "episodes": len(set(steps["episode_id"].to_pylist())),
        "episodes_won": len(won_episodes),
        "unique_state_actions": len(distinct),
        "unique_states": len(per_state),
        "states_with_several_actions": sum(n > 1 for n in per_state.values()),
        "pairs": pairs.num_rows,
        "train_state_actions": split.count("train"), "val_state_actions": split.count("val"),
        "val_games": len({r["game_id"] for r in distinct if r["split"] == "val"}),
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
