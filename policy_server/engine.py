"""The interface every inference engine implements (transformers now, vLLM next)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 48
    stop: tuple[str, ...] = ()  # generation ends before the first stop string (not included)
    seed: Optional[int] = None  # per request: the same prompt and seed give the same samples


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each generated token under the model (no temperature)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class InferenceEngine(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Generation]]:
        """`params.n` generations for each prompt, in prompt order."""

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights in place (same architecture), without a restart."""
