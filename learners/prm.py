"""AgentPRM stage 2: fit the PRM Q(s, a) to the Monte Carlo targets of stage 1.

    report = train_prm(cfg, dataset_dir, init_model, out_dir)   # -> out_dir/prm, out_dir/prm_report.json

Two losses (`prm.loss`): absolute, binary cross-entropy between sigmoid(Q) and the soft
target in [0, 1]; relative, Bradley-Terry on preference pairs, -log sigmoid(Q(s, a+) - Q(s, a-)).
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

from agent import encode_turn
from learners.trainer import (build_engine, count_steps, export_hf, init_worker, run_recipe, train_steps,
                              worker_share)
from prm_service import load_prm, pad_right

LOSSES = ("absolute", "relative")


@dataclass
class ScoredExample:
    input_ids: list[int]  # prompt + response
    target: float  # soft label in [0, 1]


@dataclass
class PairExample:
    chosen_ids: list[int]
    rejected_ids: list[int]


def padded_length(example: ScoredExample | PairExample) -> int:
    """The length a micro-batch pads the example's sequences to."""
    if isinstance(example, ScoredExample):
        return len(example.input_ids)
    return max(len(example.chosen_ids), len(example.rejected_ids))


def train_prm(cfg, dataset_dir: Path, init_model: str, out_dir: Path) -> dict:
    """Train a PRM from `init_model` (a policy or PRM folder) on stage 1's data set."""
    run_recipe(prm_recipe, cfg, "prm", out_dir, dataset_dir=str(dataset_dir.resolve()), init_model=init_model)
    return json.loads((out_dir / "prm_report.json").read_text())


def encode(tokenizer, prompt: str, response: str) -> list[int]:
    prompt_ids, response_ids = encode_turn(tokenizer, prompt, response)
    return prompt_ids + response_ids


def usable(ids: list[int], max_seq_len: int, pad_id: int) -> bool:
    """Rows the learner keeps: within `prm.max_seq_len`, and not ending in the pad token (the
    classifier pools its last non-pad token; the service, its last token: they must agree)."""
    return len(ids) <= max_seq_len and ids[-1] != pad_id


def prm_recipe(config: dict) -> None:
    prm, learner = config["train"], config["learner"]
    device = init_worker(config["seed"], learner)
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir, dataset = Path(config["out_dir"]), Path(config["dataset_dir"])
    model, tokenizer = load_prm(config["init_model"], trust_remote_code=config["trust_remote_code"], new_head=True)
    pad_id = model.config.pad_token_id

    # Data: the train games' rows; every worker builds the same list and takes its slices.
    targets = pq.read_table(dataset / "qtargets.parquet")
    pairs = pq.read_table(dataset / "pairs.parquet")
    train_split = (lambda t: t.filter(pc.equal(t["split"], "train")))
    if prm["loss"] == "absolute":
        examples = [ScoredExample(encode(tokenizer, p, r), t) for p, r, t in zip(
            *(train_split(targets)[c].to_pylist() for c in ("prompt", "response", "target")))]
        kept = [e for e in examples if usable(e.input_ids, prm["max_seq_len"], pad_id)]
    else:
        examples = [PairExample(encode(tokenizer, p, c), encode(tokenizer, p, r)) for p, c, r in zip(
            *(train_split(pairs)[k].to_pylist() for k in ("prompt", "chosen", "rejected")))]
        kept = [e for e in examples if usable(e.chosen_ids, prm["max_seq_len"], pad_id)
                and usable(e.rejected_ids, prm["max_seq_len"], pad_id)]
    dropped, examples = len(examples) - len(kept), kept
    if not examples:
        raise ValueError(f"no {prm['loss']} training examples in {dataset} within prm.max_seq_len "
                         f"({dropped} dropped; the relative loss needs states with actions whose targets differ)")
    total_steps = count_steps(prm, len(examples))
    if rank == 0:
        print(f"prm: {len(examples)} {prm['loss']} examples ({dropped} dropped: longer than prm.max_seq_len or "
              f"ending in the pad token), {total_steps} steps of {prm['batch_size']} on {world} workers", flush=True)

    engine, optimizer = build_engine(model.to(device), prm, learner, total_steps)
    q_values = q_function(engine, pad_id, device)

    def micro_loss(micro: list) -> tuple[torch.Tensor, dict[str, float]]:
        if prm["loss"] == "absolute":
            q, tokens = q_values([e.input_ids for e in micro])
            target = torch.tensor([e.target for e in micro], device=device)
            loss = F.binary_cross_entropy_with_logits(q, target)
            return loss, {"loss": loss.item(), "tokens": tokens}
        q, tokens = q_values([e.chosen_ids for e in micro] + [e.rejected_ids for e in micro])
        margin = q[:len(micro)] - q[len(micro):]
        loss = -F.logsigmoid(margin).mean()
        return loss, {"loss": loss.item(), "pair_accuracy": (margin > 0).float().mean().item(), "tokens": tokens}

    share = worker_share(examples, prm["batch_size"], config["seed"], length=padded_length)
    train_steps(engine, optimizer, share, micro_loss, prm, learner, total_steps, out_dir, "prm")

    # Validation on the held-out games: every rank scores a share, rank 0 reports.
    engine.module.eval()
    # A pair's responses are rows of the targets table too: its scores are looked up there.
    val = [r for r in targets.filter(pc.equal(targets["split"], "val")).to_pylist()
           if usable(encode(tokenizer, r["prompt"], r["response"]), prm["max_seq_len"], pad_id)]
    q = score_rows(q_values, [encode(tokenizer, r["prompt"], r["response"]) for r in val], prm["micro_batch_size"],
                   rank, world)
    q_of = {(r["prompt"], r["response"]): score for r, score in zip(val, q)}
    val_pairs = [p for p in pairs.filter(pc.equal(pairs["split"], "val")).to_pylist()
                 if (p["prompt"], p["chosen"]) in q_of and (p["prompt"], p["rejected"]) in q_of]
    weights = engine.export_state_dict()
    if rank == 0:
        report = validation_report(val, q, np.array([q_of[(p["prompt"], p["chosen"])] for p in val_pairs]),
                                   np.array([q_of[(p["prompt"], p["rejected"])] for p in val_pairs]),
                                   calibrated=prm["loss"] == "absolute")
        report.update(loss=prm["loss"], train_examples=len(examples), train_dropped=dropped, steps=total_steps)
        (out_dir / "prm_report.json").write_text(json.dumps(report, indent=2))
        export_hf(engine.module, weights, tokenizer, out_dir / "prm")


def q_function(engine, pad_id: int, device: torch.device) -> Callable[[list[list[int]]], tuple[torch.Tensor, int]]:
    """Q of a batch of token-id rows (padded on the right), and the batch's token count."""
    def q_values(rows: list[list[int]]) -> tuple[torch.Tensor, int]:
        ids, mask = pad_right(rows, pad_id, device)
        return engine(input_ids=ids, attention_mask=mask).logits[:, 0].float(), mask.sum().item()
    return q_values


@torch.no_grad()
def score_rows(q_values, rows: list[list[int]], micro_batch_size: int, rank: int, world: int) -> np.ndarray:
    """Q of every row, each rank scoring rows rank, rank + world, ...; all ranks run the same
    number of forward passes (sharded parameters need every rank in each one)."""
    passes = math.ceil(len(rows) / (world * micro_batch_size)) if rows else 0
    mine = rows[rank::world]
    scores: list[float] = []
    for i in range(passes):
        chunk = mine[i * micro_batch_size:(i + 1) * micro_batch_size]
        scores += q_values(chunk or rows[:1])[0].tolist()[:len(chunk)]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, scores)
    out = np.zeros(len(rows))
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


def weighted_auc(scores: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting half; each row stands for
    `positives` + `negatives` observations with its score. None without both kinds."""
    if positives.sum() == 0 or negatives.sum() == 0:
        return None
    _, group = np.unique(scores, return_inverse=True)
    pos, neg = np.bincount(group, positives), np.bincount(group, negatives)
    negatives_below = np.cumsum(neg) - neg
    return float((pos * (negatives_below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def validation_report(val: list[dict], q: np.ndarray, q_chosen: np.ndarray, q_rejected: np.ndarray,
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
