"""Dynamic batching for a model served inside an async Ray actor (the policy and the PRM).

Requests queue while the model is busy; when it frees up, everything queued (up to
`max_size` units, waiting at most `max_wait_s` for more) runs as one batch on the model's
single thread. A request that would take a batch past `max_size` opens the next one (one
larger than `max_size` runs alone). Other model calls (weight loads) go through the same
thread, so they never overlap a batch.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future


class DynamicBatcher:
    """`await submit(item)` -> `run_batch([items...])[i]`, with the items of concurrent callers
    merged into one `run_batch` call. `size(item)` counts an item's units (rows, pairs)."""

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_size: int, max_wait_s: float,
                 size: Callable[[Any], int] = lambda item: 1):
        self.run_batch, self.max_size, self.max_wait_s, self.size = run_batch, max_size, max_wait_s, size
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._held: _Pending | None = None  # did not fit the last batch: first in the next
        self.batches = 0

    async def submit(self, item: Any) -> Any:
        if self._queue is None:  # created inside the actor's event loop
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._loop())
        pending = _Pending(item, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.future

    async def run_exclusive(self, fn: Callable, *args) -> Any:
        """Run `fn(*args)` on the model's thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _next_batch(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        batch = [self._held or await self._queue.get()]
        self._held = None
        units = self.size(batch[0].item)
        deadline = loop.time() + self.max_wait_s
        while units < self.max_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                pending = self._queue.get_nowait()
            if units + self.size(pending.item) > self.max_size:
                self._held = pending
                break
            batch.append(pending)
            units += self.size(pending.item)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                results = await self.run_exclusive(self.run_batch, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} requests gave {len(results)} results")
            except Exception as e:  # fail this batch's callers, keep serving
                for p in batch:
                    if not p.future.done():  # a caller may have been cancelled meanwhile
                        p.future.set_exception(e)
                continue
            self.batches += 1
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)
