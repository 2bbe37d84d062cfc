"""Token sequences that share a prefix, in one row: a trunk and branches off it.

Best-of-N scores N responses to one history, DPO compares two, InversePRM scores a sampled
next action beside the expert's. Written as separate sequences, each would encode the
shared history again; here they are one row: the trunk (the history, causal), then each
branch, which attends to the trunk up to where it hangs (`at`) and to itself, at the
positions it would have had as a continuation of that trunk prefix. A 4D attention mask
says who sees whom, so one forward pass gives every branch's hidden states exactly as if
it had been its own sequence (up to floating-point rounding), with the gradient of all
branches flowing through the shared trunk.

`past` tokens may already sit in a KV cache (the PRM service keeps an episode's history
there between steps); the trunk and the branches then attend to all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TreeRow:
    input_ids: torch.Tensor  # [1, length]: trunk, then the branches end to end
    position_ids: torch.Tensor  # [1, length]
    attention_mask: torch.Tensor  # [1, 1, length, past + length], True where a token may attend
    branch_ends: list[int]  # index in the row of each branch's last token (a branch of no tokens: the trunk's at `at` - 1)

    def to(self, device) -> "TreeRow":
        return TreeRow(self.input_ids.to(device), self.position_ids.to(device), self.attention_mask.to(device),
                       self.branch_ends)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}


def branch_ends(trunk_len: int, branches: list[tuple[int, list[int]]]) -> list[int]:
    """Where each branch's last token sits in the row (a branch of no ids: the trunk's token
    at - 1, on which its response would have followed)."""
    ends, start = [], trunk_len
    for at, ids in branches:
        start += len(ids)
        ends.append(start - 1 if ids else at - 1)
    return ends


def tree_row(trunk: list[int], branches: list[tuple[int, list[int]]], past: int = 0) -> TreeRow:
    """The row of `trunk` followed by `branches`, each (at, ids): `ids` continue `trunk[:at]`
    (with `past` cached tokens before the trunk). A branch of no ids ends on the trunk's token
    at - 1, so `at` must be at least 1 for it."""
    length = len(trunk) + sum(len(ids) for _, ids in branches)
    positions = list(range(past, past + len(trunk)))
    owner = [-1] * len(trunk)  # -1: the trunk
    hang = [len(trunk)] * len(trunk)  # trunk tokens see the trunk causally
    for b, (at, ids) in enumerate(branches):
        if not 0 <= at <= len(trunk) or (not ids and at < 1):
            raise ValueError(f"branch {b} hangs at {at}, outside a trunk of {len(trunk)} tokens")
        positions += range(past + at, past + at + len(ids))
        owner += [b] * len(ids)
        hang += [at] * len(ids)
    pos = torch.tensor(positions)
    own = torch.tensor(owner)
    index = torch.arange(length)
    in_trunk = index < len(trunk)
    # query i sees trunk key j when j < hang[i] (and j <= i for trunk queries), and a branch
    # key j when it is its own branch's and not later than i
    sees_trunk = in_trunk[None, :] & (index[None, :] < torch.tensor(hang)[:, None]) & (index[None, :] <= index[:, None])
    sees_branch = (~in_trunk)[None, :] & (own[None, :] == own[:, None]) & (index[None, :] <= index[:, None])
    mask = torch.cat([torch.ones(length, past, dtype=torch.bool), sees_trunk | sees_branch], dim=1)
    return TreeRow(torch.tensor([trunk + [i for _, ids in branches for i in ids]]), pos[None], mask[None, None],
                   branch_ends(len(trunk), branches))
