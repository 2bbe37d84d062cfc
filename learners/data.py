"""Supervised examples for the policy, tokenized with a loss mask on the policy's own turns.

SFT learns whole episodes: one token sequence per episode (`episode_sequences`), built by
the same `agent.episode` context the rollout workers build, with the loss on every assistant
turn (the response and its end-of-turn token) and nowhere else. Several episodes share a
micro-batch packed end to end in one row (`pack`), each attending only to itself.

DPO learns two responses off one state as branches of one row (`branch_logprobs`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pyarrow as pa
import torch

from agent.episode import ChatFormat, replay
from agent.tree import TreeRow
from rollout_workers.records import episodes_in_order

IGNORE = -100  # label of tokens outside the loss


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens, the token id on response tokens

    @property
    def response_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def episode_sequences(steps: pa.Table, chat: ChatFormat, prompt: dict, max_new_tokens: int
                      ) -> tuple[list[TokenizedExample], int]:
    """Each episode of the step records (e.g. the expert's winning ones) as the sequence the
    policy would have held while playing it under `prompt` (the config's prompt section):
    a new sequence wherever the context starts anew (every step for prompt.state=window, a
    restart of the context rule). Also returns how many restarts the context rule made."""
    sequences, restarts = [], 0
    for rows in episodes_in_order(steps):
        replayed, context = replay(chat, prompt, rows, max_new_tokens)
        ids: list[int] = []
        labels: list[int] = []
        for fed, response in replayed:
            if fed.reset and ids:
                sequences.append(TokenizedExample(ids, labels))
                ids, labels = [], []
            ids += fed.new_ids + response
            labels += [IGNORE] * len(fed.new_ids) + response
        sequences.append(TokenizedExample(ids, labels))
        restarts += context.resets
    return sequences, restarts


def pack(batch: list[TokenizedExample]) -> dict[str, torch.Tensor]:
    """The sequences end to end in one row, without padding: input_ids, labels and
    position_ids that restart at 0 with each sequence. From those restarts transformers
    builds a block-diagonal causal mask, so each sequence attends only to itself."""
    ids = [i for e in batch for i in e.input_ids]
    labels = [label for e in batch for label in e.labels]
    positions = [p for e in batch for p in range(len(e.input_ids))]
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The same shuffled order on every worker: each takes its own slice of each batch."""
    order = list(range(num_examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def response_token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the tokens that follow each kept position, [rows, kept], and the
    mask of those that are response tokens (labels != IGNORE). A batch is packed (`pack`:
    position_ids) or padded (attention_mask). The model computes logits only
    at the positions that predict a response token (in any row): over a whole prompt,
    [rows, length, vocabulary] logits would take most of the memory, and the LM head over
    ~500 prompt positions a fifth of the compute."""
    labels = batch["labels"]
    keep = (labels[:, 1:] != IGNORE).any(dim=0).nonzero()[:, 0]  # logits at t predict the token at t + 1
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    # No KV cache: with one, transformers does not read packed sequences from position_ids.
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    targets = labels[:, keep + 1]
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return token_logprobs, targets != IGNORE


def response_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over all the batch's response tokens: the SFT loss, as a
    causal LM computes it from `labels`, without the logits of prompt positions."""
    token_logprobs, mask = response_token_logprobs(model, batch)
    return -(token_logprobs * mask).sum() / mask.sum()


def branch_logprobs(model, row: TreeRow, branches: list[tuple[int, list[int]]]) -> torch.Tensor:
    """Sum of the log-probabilities of each branch's tokens (DPO's sequence scores) in a
    `tree_row` of a trunk and `branches` (each (at, ids), at >= 1): a branch's first token is
    predicted at the trunk's token at - 1, each later one at the branch's previous token.
    Logits are computed only at those positions."""
    trunk_len = row.input_ids.shape[1] - sum(len(ids) for _, ids in branches)
    predictors, targets, owners, start = [], [], [], trunk_len
    for b, (at, ids) in enumerate(branches):
        predictors += [at - 1] + list(range(start, start + len(ids) - 1))
        targets += ids
        owners += [b] * len(ids)
        start += len(ids)
    device = row.input_ids.device
    logits = model(**row.model_inputs(), logits_to_keep=torch.tensor(predictors, device=device),
                   use_cache=False).logits[0].float()
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    return torch.zeros(len(branches), device=device).index_add(0, torch.tensor(owners, device=device),
                                                               token_logprobs)
