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

Both terms come from one pass over an episode's token sequence: Q(s, a) at the end of each
assistant turn, Q(s', a') at the next turn's end for the policy's own transitions, and for
the expert's at the end of a branch (`agent.tree`): the sampled a', hanging off the expert
episode just where s' ends. A transition whose s' starts a new context (the context rule
restarted the conversation) is left out.

No outcome reward: the builders accept step records only without their outcome columns
(`without_outcome` drops them; a table that still has them is an error). An episode's last
step is terminal whether the game was won or the step limit was reached.
"""
from __future__ import annotations

import json
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
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

from agent.tree import branch_ends, tree_row
from learners.prm import gather_scores, weighted_auc
from learners.qtargets import split_games, state_ids, state_key
from learners.trainer import build_engine, count_steps, export_hf, init_worker, run_recipe, train_steps, worker_share
from models.prm import head_scores, load_prm
from policy_server import SamplingParams
from rollout_workers.records import episodes_in_order

# What InversePRM may read of a step record: no `won`, `reward` or `done`.
STEP_COLUMNS = ("episode_id", "game_id", "task_type", "step", "context_start", "prompt_ids", "response_ids",
                "response")
SOURCES = {"expert": 1.0, "policy": 0.0}  # D+ and D-, with their labels

TRANSITION_SCHEMA = pa.schema([
    ("game_id", pa.string()), ("task_type", pa.string()), ("episode_id", pa.string()), ("step", pa.int32()),
    ("split", pa.string()), ("source", pa.string()), ("label", pa.float32()),
    ("context_start", pa.bool_()), ("prompt_ids", pa.list_(pa.int32())),  # as in the step records
    ("response_ids", pa.list_(pa.int32())), ("response", pa.string()),
    ("state_key", pa.string()),
    ("terminal", pa.bool_()),  # the episode's last step: r = Q(s, a)
    ("kept", pa.bool_()),  # the transition is in the balanced set (other steps are there as history)
    ("next_response_ids", pa.list_(pa.int32())),  # expert: a' sampled from the policy at s'; else null
])


def without_outcome(steps: pa.Table) -> pa.Table:
    """The columns of step records that InversePRM may read."""
    return steps.select(list(STEP_COLUMNS))


def transitions(steps: pa.Table, source: str) -> list[list[dict]]:
    """The episodes' steps as transitions of `source` (expert: label 1, policy: 0): each row
    is (s, a) and the episode's next row (s', a'); the last is terminal. A step whose
    successor starts a new context is not a transition (`kept` False, never balanced in)."""
    if tuple(steps.column_names) != STEP_COLUMNS:
        raise ValueError(f"InversePRM reads only {STEP_COLUMNS} of the step records (no outcome): "
                         f"pass without_outcome(steps), not a table with {steps.column_names}")
    out = []
    for rows in episodes_in_order(steps):
        for row, ids, nxt in zip(rows, state_ids(rows), rows[1:] + [None]):
            row.update(source=source, label=SOURCES[source], state_key=state_key(ids), terminal=nxt is None,
                       kept=nxt is None or not nxt["context_start"], next_response_ids=None)
        out.append(rows)
    return out


def balance(positives: list[tuple[int, int]], negatives: list[tuple[int, int]],
            seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Both sets of (episode, step) cut to the size of the smaller. The larger keeps whole
    episodes, drawn at random, and the first steps of the last one drawn: the PRM reads
    every token of an episode that holds a kept transition, so spreading the same number
    of transitions over all episodes would cost several times the tokens. Order is kept."""
    n = min(len(positives), len(negatives))
    rng = random.Random(seed)

    def sample(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        by_episode: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for item in items:
            by_episode[item[0]].append(item)
        drawn = sorted(by_episode)
        rng.shuffle(drawn)
        kept: list[tuple[int, int]] = []
        for episode in drawn:
            if len(kept) == n:
                break
            kept += by_episode[episode][:n - len(kept)]
        return sorted(kept)

    return sample(positives), sample(negatives)


def build_transitions(expert_steps: pa.Table, policy_steps: pa.Table,
                      sample_next: Callable[[list[list[int]]], list[list[int]]], out_dir: Path, val_fraction: float,
                      seed: int) -> dict:
    """D+ and D-, balanced, with a' of the kept expert transitions from `sample_next` (the
    current policy's response ids to each s', in ids); split into train and validation by
    task folder as in AgentPRM. Writes out_dir/transitions.parquet (every step of the
    episodes that hold a kept transition); returns the summary."""
    expert, policy = transitions(expert_steps, "expert"), transitions(policy_steps, "policy")
    candidates = {s: [(e, i) for e, rows in enumerate(episodes) for i, r in enumerate(rows) if r["kept"]]
                  for s, episodes in (("expert", expert), ("policy", policy))}
    sizes = {"expert_transitions": len(candidates["expert"]), "policy_transitions": len(candidates["policy"])}
    positives, negatives = balance(candidates["expert"], candidates["policy"], seed)
    if not positives:
        raise ValueError("InversePRM needs both expert and policy transitions; one set is empty")
    for episodes, chosen in ((expert, positives), (policy, negatives)):
        chosen = set(chosen)
        for e, rows in enumerate(episodes):
            for i, row in enumerate(rows):
                row["kept"] = (e, i) in chosen
    needs_next = [(rows, i) for rows in expert for i, r in enumerate(rows) if r["kept"] and not r["terminal"]]
    next_states = [state_ids(rows)[i + 1] for rows, i in needs_next]
    for (rows, i), response in zip(needs_next, sample_next(next_states), strict=True):
        rows[i]["next_response_ids"] = response
    episodes = [rows for rows in expert + policy if any(r["kept"] for r in rows)]
    val_games = split_games(sorted({rows[0]["game_id"] for rows in episodes}), val_fraction, seed)
    table = [{**r, "split": "val" if r["game_id"] in val_games else "train"} for rows in episodes for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table, schema=TRANSITION_SCHEMA), out_dir / "transitions.parquet")
    kept = [r for r in table if r["kept"]]
    return {**sizes, "per_side": len(positives),
            "terminal": {s: sum(r["terminal"] for r in kept if r["source"] == s) for s in SOURCES},
            "unique_states": len({r["state_key"] for r in kept}),
            "val_transitions": sum(r["split"] == "val" for r in kept), "val_games": len(val_games)}


def sample_next_actions(policy, prompts: list[list[int]], temperature: float, max_tokens: int, seed: int,
                        chunk: int = 32) -> list[list[int]]:
    """The policy's response ids to each prompt (one sample, seeded by the prompt), in chunks
    spread over the policy server's replicas."""
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens,
                             seed=(seed + zlib.crc32(state_key(p).encode())) % 2**31) for p in prompts]
    refs = [policy.generate(prompts[i:i + chunk], params[i:i + chunk]) for i in range(0, len(prompts), chunk)]
    out: list[list[int]] = []
    for ref in tqdm(refs, desc="a' from the policy", unit="chunk", dynamic_ncols=True):
        out += [list(g[0].token_ids) for g in ray.get(ref).generations]
    return out


@dataclass
class TransitionSequence:
    """One context of an episode as a trunk with the sampled a' as branches, and where each
    kept transition reads Q(s, a) and Q(s', a') in the row."""
    trunk: list[int] = field(default_factory=list)
    branches: list[tuple[int, list[int]]] = field(default_factory=list)
    q_at: list[int] = field(default_factory=list)  # row index of each kept transition's Q(s, a)
    next_at: list[int | None] = field(default_factory=list)  # row index of its Q(s', a'); None: terminal
    labels: list[float] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.trunk) + sum(len(ids) for _, ids in self.branches)


def transition_sequences(table: pa.Table, split: str) -> list[TransitionSequence]:
    """The split's episodes as token sequences (a new one at each context start) with
    their kept transitions."""
    out = []
    for rows in episodes_in_order(table.filter(pc.equal(table["split"], split))):
        seqs, ends, starts = [], [], []  # per step: its sequence, its turn end, where its response starts
        for row in rows:
            if row["context_start"] or not seqs:
                out.append(TransitionSequence())
            seq = out[-1]
            seq.trunk += list(row["prompt_ids"])
            starts.append(len(seq.trunk))
            seq.trunk += list(row["response_ids"])
            seqs.append(seq)
            ends.append(len(seq.trunk) - 1)
        branch = {}  # step -> the index of its sampled a' among its sequence's branches
        for i, row in enumerate(rows):  # the sampled a' of expert transitions, where s' ends
            if row["next_response_ids"] is not None:
                branch[i] = len(seqs[i].branches)
                seqs[i].branches.append((starts[i + 1], list(row["next_response_ids"])))
        branch_end = {id(seq): branch_ends(len(seq.trunk), seq.branches) for seq in seqs}
        for i, row in enumerate(rows):
            if not row["kept"]:
                continue
            seq = seqs[i]
            seq.q_at.append(ends[i])
            seq.labels.append(row["label"])
            if row["terminal"]:
                seq.next_at.append(None)
            elif i in branch:
                seq.next_at.append(branch_end[id(seq)][branch[i]])
            else:
                seq.next_at.append(ends[i + 1])
    return out


def sequence_q(model, seq: TransitionSequence, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q(s, a), Q(s', a') (0 where terminal) and the terminal mask of a sequence's kept
    transitions, from one forward pass over its row."""
    if seq.branches:
        row = tree_row(seq.trunk, seq.branches).to(device)
        hidden = model.base_model(**row.model_inputs()).last_hidden_state[0]
    else:  # the trunk alone is causal: the model's own causal mask
        hidden = model.base_model(input_ids=torch.tensor([seq.trunk], device=device)).last_hidden_state[0]
    next_index = [0 if n is None else n for n in seq.next_at]
    q = head_scores(model, hidden[torch.tensor(seq.q_at + next_index, device=device)])
    terminal = torch.tensor([n is None for n in seq.next_at], device=device)
    q_next = torch.where(terminal, torch.zeros_like(q[len(seq.q_at):]), q[len(seq.q_at):])
    return q[:len(seq.q_at)], q_next, terminal


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
    table = pq.read_table(Path(config["dataset_dir"]) / "transitions.parquet")

    sequences = [s for s in transition_sequences(table, "train") if s.q_at]
    examples = [s for s in sequences if s.length <= prm["max_seq_len"]]
    dropped = len(sequences) - len(examples)
    if not examples:
        raise ValueError(f"no InversePRM training sequence within prm.max_seq_len ({dropped} dropped)")
    total_steps = count_steps(prm, len(examples))
    if rank == 0:
        print(f"inverse prm: {len(examples)} sequences, {sum(len(s.q_at) for s in examples)} transitions "
              f"({dropped} sequences longer than prm.max_seq_len dropped), {total_steps} steps of "
              f"{prm['batch_size']} on {world} workers", flush=True)
    engine, optimizer = build_engine(model.to(device), prm, learner, total_steps)

    def micro_loss(micro: list[TransitionSequence]) -> tuple[torch.Tensor, dict[str, float]]:
        q, q_next, terminal = (torch.cat(t) for t in zip(*(sequence_q(engine.module, s, device) for s in micro)))
        r = implied_rewards(q, q_next, terminal, gamma)
        label = torch.tensor([x for s in micro for x in s.labels], device=device)
        loss = F.binary_cross_entropy_with_logits(r, label)
        return loss, {"loss": loss.item(), "accuracy": ((r > 0).float() == label).float().mean().item(),
                      "tokens": float(sum(s.length for s in micro))}

    share = worker_share(examples, prm["batch_size"], config["seed"], length=lambda s: s.length)
    train_steps(engine, optimizer, share, micro_loss, prm, learner, total_steps, out_dir, "prm")

    # Validation on the held-out games: how well r separates D+ from D-.
    engine.module.eval()
    val = [s for s in transition_sequences(table, "val") if s.q_at]

    def val_scores(seq: TransitionSequence) -> list[list[float]]:
        q, q_next, terminal = sequence_q(engine.module, seq, device)
        return [q.tolist(), implied_rewards(q, q_next, terminal, gamma).tolist()]

    scored = gather_scores(val_scores, val, rank, world)
    weights = engine.export_state_dict()
    if rank == 0:
        q = np.array([x for qs, _ in scored for x in qs])
        r = np.array([x for _, rs in scored for x in rs])
        label = np.array([x for s in val for x in s.labels])
        report = {"loss": "inverse", "gamma": gamma, "train_sequences": len(examples),
                  "train_transitions": sum(len(s.q_at) for s in examples), "train_dropped": dropped,
                  "steps": total_steps, "val_transitions": len(label),
                  "auc": weighted_auc(r, label, 1 - label) if len(label) else None,
                  "accuracy": float(((r > 0) == (label > 0.5)).mean()) if len(label) else None,
                  "mean_reward": {s: float(r[label == v].mean()) if (label == v).any() else None
                                  for s, v in SOURCES.items()},
                  "mean_q": {s: float(q[label == v].mean()) if (label == v).any() else None
                             for s, v in SOURCES.items()}}
        (out_dir / "prm_report.json").write_text(json.dumps(report, indent=2))
        export_hf(engine.module, weights, tokenizer, out_dir / "prm")
