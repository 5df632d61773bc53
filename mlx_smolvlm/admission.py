"""Admission control: how many requests the server holds at once, per API key and in all.

A request holds a slot from the moment it is authorized until its response ends. Slots
cover the decode batch plus a bounded waiting room; past that the answer is 429 with
Retry-After instead of an ever longer queue. Decoding (JSON, images, videos, the
processor) runs in a small thread pool of its own, never on the event loop.
"""

import asyncio
import ctypes
import ctypes.util
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


MALLOC_TRIM = _malloc_trim()


def release_heap():
    """Give freed heap pages back to the OS: decoded images leave the decode threads' malloc
    arenas full of free memory that glibc would otherwise keep (RSS held after a burst)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


class Busy(Exception):
    """No slot free: answer 429 and ask the client to come back after `retry_after` s."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Admission:
    def __init__(self, max_requests: int, max_per_key: int | None = None, decode_workers: int = 2,
                 retry_after: int = 1):
        self.max_requests, self.max_per_key, self.retry_after = max_requests, max_per_key, retry_after
        self.held: Counter = Counter()
        self.pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="mlx-smolvlm-decode")
        # Requests whose media are being decoded: the others wait with their media still compressed.
        self.decoding = asyncio.Semaphore(decode_workers)

    @property
    def total(self) -> int:
        return sum(self.held.values())

    def acquire(self, tenant: str):
        """Take a slot for `tenant` or raise Busy (event-loop thread only: no lock needed)."""
        if self.total >= self.max_requests:
            raise Busy(f"the server is at its limit of {self.max_requests} requests; retry later",
                       self.retry_after)
        if self.max_per_key is not None and self.held[tenant] >= self.max_per_key:
            raise Busy(f"this API key is at its limit of {self.max_per_key} concurrent requests",
                       self.retry_after)
        self.held[tenant] += 1

    def release(self, tenant: str):
        self.held[tenant] -= 1
        if self.held[tenant] <= 0:
            del self.held[tenant]

    @contextmanager
    def slot(self, tenant: str):
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    async def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` in the decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args, **kwargs))

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
