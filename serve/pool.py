"""Preprocessing threads shared fairly between requests.

A request of many images (a KServe v2 batch of 250, say) queued in a plain thread pool would
hold its threads until its last image is decoded, and a one-image request arriving meanwhile
would wait behind all of them. :class:`FairPool` keeps one queue of jobs per request and
takes one job from each request in turn (round-robin, as a fair-queueing scheduler does with
flows), so a request waits for at most one job of each other request ahead of each of its
own, whatever their size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any


class FairPool:
    """``threads`` worker threads running jobs round-robin across keys (one key per request).

    Args:
        threads: worker threads (>= 1).
        name: the threads' name prefix.

    Raises:
        ValueError: ``threads`` below 1.
    """

    def __init__(self, threads: int, name: str = "preprocess") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._cond = threading.Condition()
        self._queues: OrderedDict[Hashable, deque] = OrderedDict()
        self._closing = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: Hashable, function: Callable[..., Any], *args: Any) -> Future:
        """Queue ``function(*args)`` behind the other jobs of ``key``.

        Returns:
            Its future; cancelling it before it starts drops the job.

        Raises:
            RuntimeError: the pool is shut down.
        """
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise RuntimeError("the preprocessing pool is shut down")
            self._queues.setdefault(key, deque()).append((future, function, args))
            self._cond.notify()
        return future

    def _next(self):
        with self._cond:
            while not self._queues:
                if self._closing:
                    return None
                self._cond.wait()
            key, jobs = next(iter(self._queues.items()))
            job = jobs.popleft()
            if jobs:
                self._queues.move_to_end(key)  # the next key's turn
            else:
                del self._queues[key]
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            future, function, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True) -> None:
        """Run the queued jobs, then stop the threads (joined when ``wait``)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()


__all__ = ["FairPool"]
