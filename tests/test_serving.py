"""What both services share: dynamic batching and the device and dtype of a served model."""
import asyncio

import torch

from serving.batching import DynamicBatcher
from serving.devices import cpu_computes_bf16, pick_dtype


def test_batches_stay_within_max_size():
    """Requests of 3 units, at most 7 per batch: pairs of requests, and the odd one alone."""
    batches = []

    def run_batch(items):
        batches.append(items)
        return [f"{item}!" for item in items]

    async def submit_all():
        batcher = DynamicBatcher(run_batch, max_size=7, max_wait_s=0.05, size=lambda item: 3)
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        finally:
            batcher.shutdown()

    assert asyncio.run(submit_all()) == [f"{i}!" for i in range(5)]
    assert sorted(batches) == [[0, 1], [2, 3], [4]]


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_in_it(monkeypatch):
    assert cpu_computes_bf16("flags : fpu avx2 avx512f avx512_bf16 avx512_vnni")
    assert cpu_computes_bf16("flags : fpu avx2 amx_bf16 amx_tile")
    assert not cpu_computes_bf16("flags : fpu avx2 avx512f avx512_vnni")
    monkeypatch.setattr("serving.devices.cpu_computes_bf16", lambda: False)
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr("serving.devices.cpu_computes_bf16", lambda: True)
    assert pick_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32
