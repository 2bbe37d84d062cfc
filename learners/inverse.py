"""InversePRM stages 1 and 2: a process reward learned from demonstrations alone.

    summary = build_transitions(without_outcome(demos), without_outcome(rollouts), sample_next, out_dir, ...)
    report = train_inverse_prm(cfg, out_dir, init_model, out_dir)   # -> out_dir/prm, out_dir/prm_report.json

Positives D+ are expert transitions (s, a, s') with the next action a' sampled from the
current policy at s'; negatives D- are the current policy's own transitions (s, a, s', a')
from its rollouts. The larger set is sampled down to the size of the smaller. The PRM
learns Q so that the implied reward of a transition,

    r = Q(s, a) - gamma * Q(s', a')      (Q(s, a) at an episode's last step),

separates them: binary cross-entropy of sigmoid(r), label 1 on D+ and 0 on D-. Gradients
flow through both Q terms, as in IQ-Learn and the paper's reference code.

No outcome reward: the builders accept step records only without their outcome columns
(`without_outcome` drops them; a table that still has them is an error). An episode's last
step is terminal whether the game was won or the step limit was reached.
"""
from __future__ import annotations

import json
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from learners.prm import encode, q_function, score_rows, usable, weighted_auc
from learners.qtargets import split_games
from learners.trainer import build_engine, count_steps, export_hf, init_worker, run_recipe, train_steps, worker_share
from policy_server import SamplingParams
from prm_service import load_prm

# What InversePRM may read of a step record: no `won`, `reward` or `done`.
STEP_COLUMNS = ("episode_id", "game_id", "task_type", "step", "prompt", "response")
SOURCES = {"expert": 1.0, "policy": 0.0}  # D+ and D-, with their labels

TRANSITION_SCHEMA = pa.schema([
    ("game_id", pa.string()), ("task_type", pa.string()), ("split", pa.string()),
    ("source", pa.string()), ("label", pa.float32()),
    ("prompt", pa.string()), ("response", pa.string()),  # s, a
    ("next_prompt", pa.string()), ("next_response", pa.string()),  # s', a'; null at a terminal step
    ("terminal", pa.bool_()),
])


def without_outcome(steps: pa.Table) -> pa.Table:
    """The columns of step records that InversePRM may read."""
    return steps.select(list(STEP_COLUMNS))


def transitions(steps: pa.Table, source: str) -> list[dict]:
    """(s, a, s', a') of every step of every episode; s' and a' are the episode's next step,
    none at its last step (terminal). Labelled by `source` (expert: 1, policy: 0)."""
    if tuple(steps.column_names) != STEP_COLUMNS:
        raise ValueError(f"InversePRM reads only {STEP_COLUMNS} of the step records (no outcome): "
                         f"pass without_outcome(steps), not a table with {steps.column_names}")
    episodes: dict[str, list[dict]] = defaultdict(list)
    for row in steps.to_pylist():
        episodes[row["episode_id"]].append(row)
    out = []
    for episode_id in sorted(episodes):
        rows = sorted(episodes[episode_id], key=lambda r: r["step"])
        for row, nxt in zip(rows, rows[1:] + [None]):
            out.append({"game_id": row["game_id"], "task_type": row["task_type"], "split": None, "source": source,
                        "label": SOURCES[source], "prompt": row["prompt"], "response": row["response"],
                        "next_prompt": nxt and nxt["prompt"], "next_response": nxt and nxt["response"],
                        "terminal": nxt is None})
    return out


def balance(positives: list, negatives: list, seed: int) -> tuple[list, list]:
    """Both sets sampled down to the size of the smaller, keeping their order."""
    n = min(len(positives), len(negatives))
    rng = random.Random(seed)
    return ([positives[i] for i in sorted(rng.sample(range(len(positives)), n))],
            [negatives[i] for i in sorted(rng.sample(range(len(negatives)), n))])


def build_transitions(expert_steps: pa.Table, policy_steps: pa.Table, sample_next: Callable[[list[str]], list[str]],
                      out_dir: Path, val_fraction: float, seed: int) -> dict:
    """D+ and D-, balanced, with a' of the kept expert transitions from `sample_next` (the
    current policy's response to each s'); split into train and validation by task folder
    as in AgentPRM. Writes out_dir/transitions.parquet; returns the summary."""
    positives, negatives = transitions(expert_steps, "expert"), transitions(policy_steps, "policy")
    sizes = {"expert_transitions": len(positives), "policy_transitions": len(negatives)}
    positives, negatives = balance(positives, negatives, seed)
    if not positives:
        raise ValueError("InversePRM needs both expert and policy transitions; one set is empty")
    needs_next = [t for t in positives if not t["terminal"]]
    for t, response in zip(needs_next, sample_next([t["next_prompt"] for t in needs_next]), strict=True):
        t["next_response"] = response
    rows = positives + negatives
    val_games = split_games(sorted({t["game_id"] for t in rows}), val_fraction, seed)
    for t in rows:
        t["split"] = "val" if t["game_id"] in val_games else "train"
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRANSITION_SCHEMA), out_dir / "transitions.parquet")
    return {**sizes, "per_side": len(positives),
            "terminal": {s: sum(t["terminal"] for t in side) for s, side in (("expert", positives),
                                                                           ("policy", negatives))},
            "unique_states": len({t["prompt"] for t in rows}),
            "val_transitions": sum(t["split"] == "val" for t in rows), "val_games": len(val_games)}


def sample_next_actions(policy, prompts: list[str], temperature: float, max_tokens: int, seed: int,
                        chunk: int = 32) -> list[str]:
    """The policy's response to each prompt (one sample, seeded by the prompt), in chunks
    spread over the policy server's replicas."""
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens,
                             seed=(seed + zlib.crc32(p.encode())) % 2**31) for p in prompts]
    refs = [policy.generate(prompts[i:i + chunk], params[i:i + chunk]) for i in range(0, len(prompts), chunk)]
    out: list[str] = []
    for ref in tqdm(refs, desc="a' from the policy", unit="chunk", dynamic_ncols=True):
        out += [g[0].text for g in ray.get(ref).generations]
    return out


@dataclass
class TransitionExample:
    ids: list[int]  # s + a
    next_ids: list[int] | None  # s' + a'; None at a terminal step
    label: float


def train_inverse_prm(cfg, dataset_dir: Path, init_model: str, out_dir: Path) -> dict:
    """Train the InversePRM Q from `init_model` on transitions.parquet in `dataset_dir`."""
    run_recipe(inverse_prm_recipe, cfg, "prm", out_dir, dataset_dir=str(dataset_dir.resolve()),
               init_model=init_model, gamma=cfg.critic.gamma)
    return json.loads((out_dir / "prm_report.json").read_text())


def implied_rewards(q: torch.Tensor, q_next: torch.Tensor, terminal: torch.Tensor, gamma: float) -> torch.Tensor:
    """r = Q(s, a) - gamma * Q(s', a'), or Q(s, a) where the step is terminal."""
    return q - gamma * torch.where(terminal, torch.zeros_like(q_next), q_next)


def inverse_prm_recipe(config: dict) -> None:
    prm, learner, gamma = config["train"], config["learner"], config["gamma"]
    device = init_worker(config["seed"], learner)
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(config["out_dir"])
    model, tokenizer = load_prm(config["init_model"], trust_remote_code=config["trust_remote_code"], new_head=True)
    pad_id = model.config.pad_token_id
    table = pq.read_table(Path(config["dataset_dir"]) / "transitions.parquet")

    def example(row: dict) -> TransitionExample | None:
        ids = encode(tokenizer, row["prompt"], row["response"])
        next_ids = None if row["terminal"] else encode(tokenizer, row["next_prompt"], row["next_response"])
        fits = all(usable(x, prm["max_seq_len"], pad_id) for x in (ids, next_ids) if x is not None)
        return TransitionExample(ids, next_ids, row["label"]) if fits else None

    rows = {split: table.filter(pc.equal(table["split"], split)).to_pylist() for split in ("train", "val")}
    encoded = {split: [example(r) for r in rows[split]] for split in rows}
    examples = [e for e in encoded["train"] if e is not None]
    dropped = len(encoded["train"]) - len(examples)
    if not examples:
        raise ValueError(f"no InversePRM training transitions within prm.max_seq_len ({dropped} dropped)")
    total_steps = count_steps(prm, len(examples))
    if rank == 0:
        print(f"inverse prm: {len(examples)} transitions ({dropped} dropped: longer than prm.max_seq_len), "
              f"{total_steps} steps of {prm['batch_size']} on {world} workers", flush=True)
    engine, optimizer = build_engine(model.to(device), prm, learner, total_steps)
    q_values = q_function(engine, pad_id, device)

    def micro_loss(micro: list[TransitionExample]) -> tuple[torch.Tensor, dict[str, float]]:
        successors = [e.next_ids for e in micro if e.next_ids is not None]
        q_all, tokens = q_values([e.ids for e in micro] + successors)  # one forward for Q(s, a) and Q(s', a')
        terminal = torch.tensor([e.next_ids is None for e in micro], device=device)
        q_next = torch.zeros(len(micro), device=device)
        q_next[~terminal] = q_all[len(micro):]
        r = implied_rewards(q_all[:len(micro)], q_next, terminal, gamma)
        label = torch.tensor([e.label for e in micro], device=device)
        loss = F.binary_cross_entropy_with_logits(r, label)
        return loss, {"loss": loss.item(), "accuracy": ((r > 0).float() == label).float().mean().item(),
                      "tokens": tokens}

    share = worker_share(examples, prm["batch_size"], config["seed"],
                         length=lambda e: max(len(e.ids), len(e.next_ids or ())))
    train_steps(engine, optimizer, share, micro_loss, prm, learner, total_steps, out_dir, "prm")

    # Validation on the held-out games: how well r separates D+ from D-.
    engine.module.eval()
    val = [e for e in encoded["val"] if e is not None]
    q = score_rows(q_values, [e.ids for e in val], prm["micro_batch_size"], rank, world)
    successors = [e.next_ids for e in val if e.next_ids is not None]
    q_next = np.zeros(len(val))
    q_next[[i for i, e in enumerate(val) if e.next_ids is not None]] = score_rows(
        q_values, successors, prm["micro_batch_size"], rank, world)
    weights = engine.export_state_dict()
    if rank == 0:
        terminal = np.array([e.next_ids is None for e in val], dtype=bool)
        r = q - gamma * np.where(terminal, 0.0, q_next)
        label = np.array([e.label for e in val])
        report = {"loss": "inverse", "gamma": gamma, "train_examples": len(examples), "train_dropped": dropped,
                  "steps": total_steps, "val_transitions": len(val),
                  "auc": weighted_auc(r, label, 1 - label) if len(val) else None,
                  "accuracy": float(((r > 0) == (label > 0.5)).mean()) if len(val) else None,
                  "mean_reward": {s: float(r[label == v].mean()) if (label == v).any() else None
                                  for s, v in SOURCES.items()},
                  "mean_q": {s: float(q[label == v].mean()) if (label == v).any() else None
                             for s, v in SOURCES.items()}}
        (out_dir / "prm_report.json").write_text(json.dumps(report, indent=2))
        export_hf(engine.module, weights, tokenizer, out_dir / "prm")
