"""AgentPRM stage 2: fit the PRM Q(s, a) to the Monte Carlo targets of stage 1.

    report = train_prm(cfg, dataset_dir, init_model, out_dir)   # -> out_dir/prm, out_dir/prm_report.json

The PRM reads whole episodes: each is one token sequence (the ids the policy saw and
wrote, `EpisodeSequence`), and one forward pass gives Q(s_t, a_t) at the end of every
assistant turn, so an episode of T steps costs one pass over its tokens instead of T
passes over ever longer prompts. Two losses (`prm.loss`, `configs.schema.PRMLoss`):

- absolute: binary cross-entropy between sigmoid(Q) and the soft target in [0, 1], at
  every turn of the micro-batch's episodes (the mean over their turns: the same as one
  example per step);
- relative: Bradley-Terry on preference pairs, -log sigmoid(Q(s, a+) - Q(s, a-)); both
  actions hang off their shared state in one row (`agent.tree`), so the state is encoded
  once per pair.

After training, the held-out games measure how well Q separates actions of won and lost
episodes (AUC over visits), how calibrated sigmoid(Q) is against the targets, and how
often it orders the held-out pairs right.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F

from agent.tree import tree_row
from learners.qtargets import distinct_state_actions, state_ids
from learners.trainer import (build_engine, count_steps, export_hf, init_worker, run_recipe, train_steps,
                              worker_share)
from models.prm import head_scores, load_prm, turn_scores
from rollout_workers.records import episodes_in_order


@dataclass
class EpisodeSequence:
    """One context of an episode (a whole episode unless the context rule restarted it) as
    the policy held it, with each step's turn end, target and (episode, state, action) key."""
    input_ids: list[int]
    turn_ends: list[int]  # index of each step's last response token (its prompt's last, if empty)
    targets: list[float]
    keys: list[tuple[str, str, str]]


@dataclass
class StatePair:
    """Two actions at one state: the state's ids, the chosen and the rejected response ids."""
    state: list[int]
    chosen: list[int]
    rejected: list[int]


def q_sequences(targets, split: str) -> list[EpisodeSequence]:
    """Every episode of the split as token sequences with their Q-targets at each turn (a new
    sequence at each context start)."""
    out: list[EpisodeSequence] = []
    for rows in episodes_in_order(targets.filter(pc.equal(targets["split"], split))):
        for row in rows:
            if row["context_start"] or not out or out[-1].keys[0][0] != row["episode_id"]:
                out.append(EpisodeSequence([], [], [], []))
            seq = out[-1]
            seq.input_ids += list(row["prompt_ids"]) + list(row["response_ids"])
            seq.turn_ends.append(len(seq.input_ids) - 1)
            seq.targets.append(row["target"])
            seq.keys.append((row["episode_id"], row["state_key"], row["action"]))
    return out


def state_pairs(targets, pairs, split: str) -> list[StatePair]:
    """The split's preference pairs with their state's ids and both responses' ids."""
    steps = {}
    for rows in episodes_in_order(targets.filter(pc.equal(targets["split"], split))):
        for row, ids in zip(rows, state_ids(rows)):
            steps[(row["episode_id"], row["step"])] = (ids, list(row["response_ids"]))
    out = []
    for p in pairs.filter(pc.equal(pairs["split"], split)).to_pylist():
        state, chosen = steps[(p["chosen_episode"], p["chosen_step"])]
        out.append(StatePair(state, chosen, steps[(p["rejected_episode"], p["rejected_step"])][1]))
    return out


def pair_scores(model, pair: StatePair, device) -> torch.Tensor:
    """Q of the chosen and the rejected action, both off the state in one row."""
    row = tree_row(pair.state, [(len(pair.state), pair.chosen), (len(pair.state), pair.rejected)]).to(device)
    hidden = model.base_model(**row.model_inputs()).last_hidden_state
    return head_scores(model, hidden[0, row.branch_ends])


def train_prm(cfg, dataset_dir: Path, init_model: str, out_dir: Path) -> dict:
    """Train a PRM from `init_model` (a policy or PRM folder) on stage 1's data set."""
    run_recipe(prm_recipe, cfg, "prm", out_dir, dataset_dir=str(dataset_dir.resolve()), init_model=init_model)
    return json.loads((out_dir / "prm_report.json").read_text())


def absolute_loss(q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-label cross-entropy of sigmoid(Q) against the rescaled MC targets, mean over turns."""
    return F.binary_cross_entropy_with_logits(q, targets)


def relative_loss(q_chosen: torch.Tensor, q_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(Q(s, a+) - Q(s, a-)), mean over pairs."""
    return -F.logsigmoid(q_chosen - q_rejected).mean()


def prm_recipe(config: dict) -> None:
    prm, learner = config["train"], config["learner"]
    device = init_worker(config["seed"], learner)
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir, dataset = Path(config["out_dir"]), Path(config["dataset_dir"])
    model, tokenizer = load_prm(config["init_model"], trust_remote_code=config["trust_remote_code"], new_head=True)

    # Data: the train games' episodes (absolute) or pairs (relative); every worker builds the
    # same list and takes its slices.
    targets = pq.read_table(dataset / "qtargets.parquet")
    pairs = pq.read_table(dataset / "pairs.parquet")
    if prm["loss"] == "absolute":
        examples = q_sequences(targets, "train")
        length = (lambda e: len(e.input_ids))
    else:
        examples = state_pairs(targets, pairs, "train")
        length = (lambda e: len(e.state) + len(e.chosen) + len(e.rejected))
    kept = [e for e in examples if length(e) <= prm["max_seq_len"]]
    dropped, examples = len(examples) - len(kept), kept
    if not examples:
        raise ValueError(f"no {prm['loss']} training examples in {dataset} within prm.max_seq_len "
                         f"({dropped} dropped; the relative loss needs states with actions whose targets differ)")
    total_steps = count_steps(prm, len(examples))
    if rank == 0:
        what = "episode sequences" if prm["loss"] == "absolute" else "pairs"
        print(f"prm: {len(examples)} {what} ({sum(map(length, examples))} tokens; {dropped} longer than "
              f"prm.max_seq_len dropped), {total_steps} steps of {prm['batch_size']} on {world} workers", flush=True)

    engine, optimizer = build_engine(model.to(device), prm, learner, total_steps)

    def micro_loss(micro: list) -> tuple[torch.Tensor, dict[str, float]]:
        if prm["loss"] == "absolute":
            q = torch.cat([turn_scores(engine.module, e.input_ids, e.turn_ends, device) for e in micro])
            loss = absolute_loss(q, torch.tensor([t for e in micro for t in e.targets], device=device))
            return loss, {"loss": loss.item(), "tokens": sum(len(e.input_ids) for e in micro)}
        q = torch.stack([pair_scores(engine.module, e, device) for e in micro])
        loss = relative_loss(q[:, 0], q[:, 1])
        return loss, {"loss": loss.item(), "pair_accuracy": (q[:, 0] > q[:, 1]).float().mean().item(),
                      "tokens": sum(map(length, micro))}

    train_steps(engine, optimizer, worker_share(examples, prm["batch_size"], config["seed"], length=length),
                micro_loss, prm, learner, total_steps, out_dir, "prm")

    # Validation on the held-out games: every rank scores a share of the episodes, rank 0 reports.
    engine.module.eval()
    val = q_sequences(targets, "val")
    scores = gather_scores(lambda e: turn_scores(engine.module, e.input_ids, e.turn_ends, device).tolist(), val,
                           rank, world)
    q_of = {key: q for e, qs in zip(val, scores) for key, q in zip(e.keys, qs)}
    weights = engine.export_state_dict()
    if rank == 0:
        report = validation_report(targets, pairs, q_of, calibrated=prm["loss"] == "absolute")
        report.update(loss=prm["loss"], train_examples=len(examples), train_dropped=dropped, steps=total_steps,
                      val_sequences=len(val), val_tokens=sum(len(e.input_ids) for e in val))
        (out_dir / "prm_report.json").write_text(json.dumps(report, indent=2))
        export_hf(engine.module, weights, tokenizer, out_dir / "prm")


@torch.no_grad()
def gather_scores(score: Callable[[object], list[float]], items: list, rank: int, world: int) -> list[list[float]]:
    """`score` of every item, each rank scoring items rank, rank + world, ...; all ranks run
    the same number of forward passes (sharded parameters need every rank in each one)."""
    mine = items[rank::world]
    passes = math.ceil(len(items) / world) if items else 0
    scores = [score(mine[i] if i < len(mine) else items[0]) for i in range(passes)][:len(mine)]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, scores)
    out: list = [None] * len(items)
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


def validation_report(targets, pairs, q_of: dict[tuple[str, str, str], float], bins: int = 10,
                      calibrated: bool = True) -> dict:
    """The held-out (state, action) pairs' Q (`q_of`: by (episode, state, action) of a step
    that took it) against their MC targets and outcomes, and the held-out preference pairs."""
    val = [r for r in distinct_state_actions(targets) if r["split"] == "val"]
    q = np.array([q_of[(r["episode_id"], r["state_key"], r["action"])] for r in val])
    step_key = {(r["episode_id"], r["step"]): (r["episode_id"], r["state_key"], r["action"])
                for r in targets.filter(pc.equal(targets["split"], "val")).to_pylist()}
    val_pairs = pairs.filter(pc.equal(pairs["split"], "val")).to_pylist()
    q_chosen = np.array([q_of[step_key[(p["chosen_episode"], p["chosen_step"])]] for p in val_pairs])
    q_rejected = np.array([q_of[step_key[(p["rejected_episode"], p["rejected_step"])]] for p in val_pairs])
    return q_report(val, q, q_chosen, q_rejected, bins, calibrated)


def weighted_auc(scores: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting half; each row stands for
    `positives` + `negatives` observations with its score. None without both kinds."""
    if positives.sum() == 0 or negatives.sum() == 0:
        return None
    _, group = np.unique(scores, return_inverse=True)
    pos, neg = np.bincount(group, positives), np.bincount(group, negatives)
    negatives_below = np.cumsum(neg) - neg
    return float((pos * (negatives_below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def q_report(val: list[dict], q: np.ndarray, q_chosen: np.ndarray, q_rejected: np.ndarray,
                      bins: int = 10, calibrated: bool = True) -> dict:
    """AUC of Q between actions of won and lost episodes (over visits), calibration of
    sigmoid(Q) against the MC targets (reliability bins, expected calibration error over
    visits; only when `calibrated`: the relative loss fixes Q up to a constant, so
    sigmoid(Q) is no probability), accuracy on held-out pairs."""
    visits = np.array([r["visits"] for r in val], dtype=float)
    wins = np.array([r["wins"] for r in val], dtype=float)
    target = np.array([r["target"] for r in val], dtype=float)
    pred = 1 / (1 + np.exp(-q))
    reliability, ece = [], 0.0
    which = np.minimum((pred * bins).astype(int), bins - 1)
    for b in range(bins if calibrated else 0):
        sel = which == b
        if sel.any():
            w = visits[sel].sum()
            mean_pred = np.average(pred[sel], weights=visits[sel])
            mean_target = np.average(target[sel], weights=visits[sel])
            ece += w / visits.sum() * abs(mean_pred - mean_target)
            reliability.append({"bin": [b / bins, (b + 1) / bins], "visits": int(w),
                                "mean_prediction": float(mean_pred), "mean_target": float(mean_target)})
    return {
        "val_state_actions": len(val), "val_visits": int(visits.sum()), "val_pairs": len(q_chosen),
        "auc": weighted_auc(q, wins, visits - wins) if len(val) else None,
        "expected_calibration_error": float(ece) if len(val) and calibrated else None,
        "mean_abs_error": float(np.average(np.abs(pred - target), weights=visits)) if len(val) and calibrated else None,
        "pair_accuracy": float((q_chosen > q_rejected).mean()) if len(q_chosen) else None,
        "reliability": reliability,
    }
