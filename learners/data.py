"""Supervised examples for the policy: (prompt, response) pairs, tokenized with a loss mask.

The prompt is exactly what the policy server fed the model (chat template applied, ending
with the assistant header) and is tokenized on its own, as the server does at inference;
the response is followed by the end-of-turn token, so the model learns to stop (unless it
was cut off at the sampling limit: DPO's samples are learnt as they were generated).
Only response tokens count in the loss.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pyarrow as pa
import torch

from agent import encode_turn

IGNORE = -100  # label of tokens outside the loss


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    ends: bool = True  # the response ended by itself, so its end-of-turn token is learnt (False: cut off at a limit)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens, the token id on response tokens

    @property
    def response_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def examples_from_steps(steps: pa.Table) -> list[SFTExample]:
    """Every step of the given step records (e.g. the expert's winning episodes), in table order."""
    return [SFTExample(p, r) for p, r in zip(steps["prompt"].to_pylist(), steps["response"].to_pylist())]


def tokenize(tokenizer, example: SFTExample) -> TokenizedExample:
    ending = tokenizer.eos_token if example.ends else ""
    prompt, response = encode_turn(tokenizer, example.prompt, example.response + ending)
    return TokenizedExample(prompt + response, [IGNORE] * len(prompt) + response)


def collate(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The same shuffled order on every worker: each takes its own slice of each batch."""
    order = list(range(num_examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def response_token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the tokens that follow each kept position, [rows, kept], and the
    mask of those that are response tokens (labels != IGNORE). The model computes logits only
    at the positions that predict a response token (in any row): over a whole prompt,
    [rows, length, vocabulary] logits would take most of the memory, and the LM head over
    ~500 prompt positions a fifth of the compute."""
    labels = batch["labels"]
    keep = (labels[:, 1:] != IGNORE).any(dim=0).nonzero()[:, 0]  # logits at t predict the token at t + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits.float()
    targets = labels[:, keep + 1]
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return token_logprobs, targets != IGNORE


def response_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the log-probabilities of each row's response tokens (DPO's sequence scores)."""
    token_logprobs, mask = response_token_logprobs(model, batch)
    return (token_logprobs * mask).sum(dim=1)


def response_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood over all the batch's response tokens: the SFT loss, as a
    causal LM computes it from `labels`, without the logits of prompt positions."""
    token_logprobs, mask = response_token_logprobs(model, batch)
    return -(token_logprobs * mask).sum() / mask.sum()
