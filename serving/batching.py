"""Micro-batching: instances that arrive together are decoded in one batched call.

``submit(item)`` queues an item and awaits its result. One worker task takes the first
waiting item, gathers more until ``max_batch_size`` items or ``max_wait_ms`` have passed,
and runs ``run_batch(items) -> results`` on a single background thread (the model is not
shared between threads); items arriving meanwhile form the next batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cellpuzzles.serving.protocol import Instance


@dataclass
class Job:
    instance: Instance
    mode: str
    count_tokens: bool = False


class MicroBatcher:
    def __init__(self, run_batch: Callable[[Sequence[Any]], list[Any]], max_batch_size: int = 16,
                 max_wait_ms: float = 10.0, on_batch: Callable[[int, float], None] | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self.on_batch = on_batch  # (batch size, seconds) after each batch, e.g. for metrics
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._loop())
        fut = loop.create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            live = [(x, f) for x, f in batch if not f.cancelled()]
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [x for x, _ in live])
            except Exception as e:  # noqa: BLE001 - the error belongs to every request in the batch
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch:
                self.on_batch(len(live), time.perf_counter() - t0)
            for (_, f), r in zip(live, results):
                if not f.done():
                    f.set_result(r)
