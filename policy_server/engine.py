"""What every inference engine gives the policy server (transformers and vLLM alike)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Union

import torch

# A prompt is text (encoded without added special tokens: it is already rendered with the
# chat template) or token ids, used exactly as given: an episode's context (agent.episode).
Prompt = Union[str, list[int]]


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


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The ids an engine feeds the model for `prompt`."""
    return tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)


def per_prompt(params: SamplingParams | list[SamplingParams], num_prompts: int) -> list[SamplingParams]:
    """One SamplingParams per prompt, from one for all or a list."""
    params = params if isinstance(params, list) else [params] * num_prompts
    if len(params) != num_prompts:
        raise ValueError("one SamplingParams per prompt, or one for all")
    return params


class InferenceEngine(Protocol):
    """Async, so that an engine with its own scheduler (vLLM) takes requests as they come."""

    name: str  # "hf" or "vllm"

    async def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[list[Generation]]:
        """`params[i].n` generations for prompt i, in prompt order. Token ids are used as
        given; text is encoded without added special tokens. A generation's `token_ids` are
        the ids sampled, its end-of-turn token included when it stopped by itself."""

    async def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights in place (same architecture), without a restart.
        Called only while no generation is in flight."""

    def stats(self) -> dict[str, int]:
        """Counters for tests and benchmarks (requests, engine batches, ...)."""

    def shutdown(self) -> None:
        """Release what the engine started (threads, vLLM's processes)."""
