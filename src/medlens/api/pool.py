"""A bounded pool for model work, so the event loop never blocks and overload is refused.

``workers`` threads run jobs; at most ``queue`` more may wait. A job beyond that is
refused at once with ``Overloaded`` (the API answers 503 + Retry-After) instead of
queueing without bound. A job that runs past its timeout is answered with
``JobTimeout`` (504); its slot stays taken until the thread really finishes, so the
bound stays honest.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Overloaded(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"all slots busy; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class JobTimeout(Exception):
    pass


class WorkerPool:
    def __init__(self, workers: int, queue: int):
        if workers < 1 or queue < 0:
            from medlens.errors import ConfigError

            raise ConfigError("MEDLENS_API_WORKERS must be >= 1 and MEDLENS_API_QUEUE >= 0")
        self.workers, self.queue = workers, queue
        self.capacity = workers + queue
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="medlens-model")
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._lock = threading.Lock()
        self._in_use = 0
        self._mean_s = 0.5  # running mean job time, for Retry-After
        self.refused = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead divided among workers."""
        return max(1, math.ceil(self._mean_s * self.capacity / self.workers))

    def _release(self, started: float, _fut: Future) -> None:
        with self._lock:
            self._in_use -= 1
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - started)
        self._slots.release()

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            raise Overloaded(self.retry_after())
        with self._lock:
            self._in_use += 1
        started = time.perf_counter()
        try:
            fut = self._executor.submit(fn, *args)
        except BaseException:
            with self._lock:
                self._in_use -= 1
            self._slots.release()
            raise
        fut.add_done_callback(lambda f: self._release(started, f))
        return fut

    async def run(self, fn: Callable[..., T], *args: object, timeout_s: float) -> T:
        fut = self.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except TimeoutError:
            fut.cancel()  # frees the slot at once if the job had not started
            raise JobTimeout(f"the job did not finish within {timeout_s:g} s") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
