"""The async side of lora/serve.py: a small batching queue in front of one model thread.

Requests arrive on the event loop; each prompt becomes a row in a queue. A single worker task takes the first
waiting row, waits `window_ms` for more to arrive (concurrent requests for any adapters), and hands up to
`max_batch_rows` of them to `AdapterHost.run_batch` on the one model thread. Loading and unloading adapters run on
that same thread, so they take effect between batches and never in the middle of a `generate`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lora.core.errors import UserError
from lora.serving.host import AdapterHost, GeneratedRow, GenerationRow

__all__ = ["GenerationBatcher", "ServerBusyError"]


class ServerBusyError(UserError):
    """Too many rows are already waiting; the client should retry later (HTTP 503)."""


@dataclass
class _Job:
    row: GenerationRow
    future: asyncio.Future


class GenerationBatcher:
    """Collects rows for a few milliseconds and runs them as one batch on the model thread.

    Args:
        host: the loaded base model and adapters.
        window_ms: how long the first row of a batch waits for company; 0 batches only what is already queued.
        max_batch_rows: the most rows one `run_batch` call gets (bounds memory and per-batch latency).
        max_queued_rows: beyond this many waiting rows new requests get `ServerBusyError` instead of queueing.
    """

    def __init__(self, host: AdapterHost, *, window_ms: float = 10.0, max_batch_rows: int = 16,
                 max_queued_rows: int = 1024):
        self.host = host
        self.window_s = max(window_ms, 0.0) / 1000
        self.max_batch_rows = max(max_batch_rows, 1)
        self.max_queued_rows = max_queued_rows
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the worker task on the running event loop (the server's lifespan calls this)."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run_batches(), name="generation-batcher")

    async def stop(self) -> None:
        """Stop the worker, fail whatever still waits, and let the model thread finish its current call."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ServerBusyError("the server is shutting down."))
        self._executor.shutdown(wait=True)

    async def call_on_model_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function(*args)` on the model thread, after the batch now running (loads, unloads)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    async def generate(self, rows: list[GenerationRow]) -> list[GeneratedRow]:
        """Queue the rows of one request and wait for all of them.

        Raises:
            ServerBusyError: the queue is full.
            UserError: the first error any of the rows got (e.g. its adapter was unloaded while it waited).
        """
        if self._queue is None:
            raise RuntimeError("GenerationBatcher.start() was not called")
        if self._queue.qsize() + len(rows) > self.max_queued_rows:
            raise ServerBusyError(
                f"{self._queue.qsize()} prompts are already waiting (limit {self.max_queued_rows}); retry shortly."
            )
        loop = asyncio.get_running_loop()
        jobs = [_Job(row, loop.create_future()) for row in rows]
        for job in jobs:
            self._queue.put_nowait(job)
        # Wait for every row (so that no row's error goes unretrieved), then raise the first error, if any.
        results = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def _run_batches(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() + 1 < self.max_batch_rows and self.window_s > 0:
                # Sleeping then draining (rather than wait_for on get) cannot lose a row to a timeout race.
                await asyncio.sleep(self.window_s)
            while len(batch) < self.max_batch_rows and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [job for job in batch if not job.future.done()]  # clients that went away
            if not batch:
                continue
            try:
                results = await self.call_on_model_thread(self.host.run_batch, [job.row for job in batch])
            except Exception as error:  # a bug, not a user error: fail this batch, keep serving the next
                results = [error] * len(batch)
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
