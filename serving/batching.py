"""Micro-batching: instances that arrive together are decoded in one batched call, and a
large request cannot starve small ones.

``submit_many(items)`` queues one request's items as a group and awaits their results (in
order); ``submit(item)`` is a group of one. One worker task waits for the first item,
gathers company for up to ``max_wait_ms``, then fills a batch of at most
``max_batch_size`` items and runs ``run_batch(items) -> results`` on a single background
thread (the model is not shared between threads). With ``interleave`` (the default) the
batch takes one item from each waiting group in turn (round robin across batches too), so
a small request waits for about one batch however large the requests before it are;
without it, items are taken first come, first served.

Cancelling the awaiting coroutine (the client went away, or the request's deadline passed)
drops the group's items that are still queued; a batch already running finishes.
"""

from __future__ import annotations

import asyncio
import collections
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
    max_new_tokens: int | None = None  # free text: the token budget (None: the model's own)
    temperature: float = 0.0  # free text: 0 is greedy


class MicroBatcher:
    def __init__(self, run_batch: Callable[[Sequence[Any]], list[Any]], max_batch_size: int = 16,
                 max_wait_ms: float = 10.0, on_batch: Callable[[int, float], None] | None = None,
                 interleave: bool = True):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self.on_batch = on_batch  # (batch size, seconds) after each batch, e.g. for metrics
        self.interleave = interleave
        self._groups: collections.deque[collections.deque] = collections.deque()  # per request: (item, future)
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def queued(self) -> int:
        return sum(len(g) for g in self._groups)

    async def submit(self, item: Any) -> Any:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._loop())
        group = collections.deque((x, loop.create_future()) for x in items)
        futures = [f for _, f in group]
        self._groups.append(group)
        self._wake.set()
        try:
            return list(await asyncio.gather(*futures))
        finally:  # done, failed or cancelled: nothing of this request stays queued
            group.clear()
            for f in futures:
                f.cancel()

    def _take(self) -> list:
        """The next batch: one item per waiting group in turn (interleave), or in arrival order."""
        batch: list = []
        while self._groups and len(batch) < self.max_batch_size:
            group = self._groups.popleft()
            if not group:
                continue
            if self.interleave:
                batch.append(group.popleft())
                if group:
                    self._groups.append(group)
            else:
                while group and len(batch) < self.max_batch_size:
                    batch.append(group.popleft())
                if group:
                    self._groups.appendleft(group)
        return [(x, f) for x, f in batch if not f.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queued():
                self._wake.clear()
                await self._wake.wait()
            deadline = loop.time() + self.max_wait_s
            while self.queued() < self.max_batch_size and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except TimeoutError:
                    break
            live = self._take()
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
