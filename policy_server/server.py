"""The policy server: a Ray actor in front of an inference engine.

Rollout workers send small requests (one prompt per environment step) whenever they need
them; the server merges whatever is queued into one engine batch, so generation for some
environments overlaps with other environments stepping their games.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

import ray
import torch

from policy_server.engine import Generation, SamplingParams


@dataclass
class GenerateResult:
    generations: list[list[Generation]]  # per prompt, `n` each
    policy_version: int  # the weights that produced them


@dataclass
class _Request:
    prompts: list[str]
    params: SamplingParams
    future: asyncio.Future


class PolicyServer:
    """Use `PolicyServer.remote(...)` through `start_policy_servers`; methods are async."""

    def __init__(self, model_path: str, engine: str = "hf", device: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False, num_threads: int = 1, max_batch_size: int = 32,
                 batch_wait_ms: float = 5.0, seed: int = 0):
        torch.set_num_threads(max(1, num_threads))
        if engine != "hf":
            raise ValueError(f"unknown engine {engine!r}")
        from policy_server.hf_engine import HFEngine

        self.engine = HFEngine(model_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                               seed=seed)
        self.version = 0
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        # One engine thread: batches and weight loads run one at a time, in arrival order.
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._queue: asyncio.Queue[_Request] | None = None
        self.stats = {"requests": 0, "batches": 0, "prompts": 0}

    async def generate(self, prompts: list[str], params: SamplingParams) -> GenerateResult:
        if self._queue is None:  # created inside the actor's event loop
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batch_loop())
        request = _Request(prompts, params, asyncio.get_running_loop().create_future())
        self.stats["requests"] += 1
        await self._queue.put(request)
        return await request.future

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            rows = batch[0].params.n * len(batch[0].prompts)
            deadline = loop.time() + self.batch_wait_s
            while rows < self.max_batch_size:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        request = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                else:
                    request = self._queue.get_nowait()
                batch.append(request)
                rows += request.params.n * len(request.prompts)
            prompts = [p for r in batch for p in r.prompts]
            params = [r.params for r in batch for _ in r.prompts]
            version = self.version
            try:
                outputs = await loop.run_in_executor(self._engine_thread, self.engine.generate, prompts, params)
            except Exception as e:  # fail the batch's requests, keep serving
                for r in batch:
                    r.future.set_exception(e)
                continue
            self.stats["batches"] += 1
            self.stats["prompts"] += len(prompts)
            start = 0
            for r in batch:
                r.future.set_result(GenerateResult(outputs[start:start + len(r.prompts)], version))
                start += len(r.prompts)

    async def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load new weights in place; generations after this report `version`."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._engine_thread, self.engine.load_weights, state_dict)
        self.version = version
        return version

    def get_version(self) -> int:
        return self.version

    def get_stats(self) -> dict[str, int]:
        return dict(self.stats)


def start_policy_servers(policy_cfg, model_path: str, seed: int) -> list:
    """`policy_cfg.replicas` server actors with the configured resources; returns their handles."""
    actor = ray.remote(PolicyServer).options(
        num_cpus=policy_cfg.num_cpus, num_gpus=policy_cfg.num_gpus, resources=dict(policy_cfg.resources),
        max_concurrency=1000,
    )
    return [
        actor.remote(model_path, engine=policy_cfg.engine, device=policy_cfg.device, dtype=policy_cfg.dtype,
                     trust_remote_code=policy_cfg.trust_remote_code, num_threads=policy_cfg.torch_threads or int(policy_cfg.num_cpus),
                     max_batch_size=policy_cfg.max_batch_size, batch_wait_ms=policy_cfg.batch_wait_ms,
                     seed=seed + i)
        for i in range(policy_cfg.replicas)
    ]
