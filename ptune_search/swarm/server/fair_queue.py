"""One compute thread for a block server, taking work from all clients in turn.

Each client (keyed by its peer id) has its own FIFO; the worker serves the clients round-robin, one task at
a time, so a client that sends a burst of requests delays every other client by at most one task each.
Handlers on the event loop ``await queue.run(client, fn)``; a cancelled request is skipped, not computed.

Example::

    queue = FairQueue(max_pending=100)
    queue.start()
    result = await queue.run("client-a", lambda: heavy_torch_work())
    queue.close()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Hashable, Optional, TypeVar

if TYPE_CHECKING:
    from ptune_search.swarm.server.host_cores import HostCores

T = TypeVar("T")


class QueueFull(RuntimeError):
    pass


class _Task:
    __slots__ = ("fn", "loop", "future")

    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.fn, self.loop, self.future = fn, loop, future


class FairQueue:
    """Args:
    max_pending: waiting tasks of all clients together beyond which ``run`` raises QueueFull.
    cores: the machine's cores shared with other servers (see HostCores); each task computes with the
        cores free at its start.
    set_threads: called in the worker with the number of cores to use (e.g. ``torch.set_num_threads``).
    threads: the number of threads without ``cores``.
    """

    def __init__(
        self,
        max_pending: int = 1024,
        name: str = "block-compute",
        *,
        cores: Optional[HostCores] = None,
        set_threads: Optional[Callable[[int], None]] = None,
        threads: Optional[int] = None,
    ):
        self.max_pending = max_pending
        self._cores, self._set_threads, self._threads = cores, set_threads, threads
        self._condition = threading.Condition()
        self._queues: collections.OrderedDict[Hashable, collections.deque[_Task]] = collections.OrderedDict()
        self._pending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.stats = {"tasks": 0, "compute_s": 0.0, "lock_wait_s": 0.0, "shared_core_tasks": 0}

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, client: Hashable, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._condition:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._pending >= self.max_pending:
                raise QueueFull(f"the server's queue is full ({self._pending} requests waiting)")
            self._queues.setdefault(client, collections.deque()).append(_Task(fn, loop, future))
            self._pending += 1
            self._condition.notify()
        return await future

    def _next_task(self) -> _Task | None:
        with self._condition:
            while not self._pending and not self._closed:
                self._condition.wait()
            if not self._pending:
                return None
            client, tasks = next(iter(self._queues.items()))
            task = tasks.popleft()
            self._pending -= 1
            if tasks:
                self._queues.move_to_end(client)
            else:
                del self._queues[client]
            return task

    def _use_threads(self, threads: Optional[int]) -> None:
        if threads and threads != self._threads and self._set_threads is not None:
            self._set_threads(threads)
            self._threads = threads

    def _hold_cores(self) -> ContextManager[Optional[int]]:
        if self._cores is None:
            return contextlib.nullcontext(None)
        return self._cores.hold()

    def _work(self) -> None:
        if self._threads and self._set_threads is not None:
            self._set_threads(self._threads)
        while (task := self._next_task()) is not None:
            if task.future.cancelled():  # the client gave up or disconnected: skip the work
                continue
            try:
                waited = time.perf_counter()
                with self._hold_cores() as held:
                    self._use_threads(held)
                    started = time.perf_counter()
                    try:
                        result = task.fn()
                    finally:
                        self._account(started - waited, time.perf_counter() - started, held)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the waiting handler
                _reply(task, None, e)
            else:
                _reply(task, result, None)

    def _account(self, lock_wait: float, compute: float, cores: Optional[int]) -> None:
        self.stats["tasks"] += 1
        self.stats["lock_wait_s"] += lock_wait
        self.stats["compute_s"] += compute
        if cores == 1:
            self.stats["shared_core_tasks"] += 1

    def close(self, timeout: float = 30.0) -> None:
        """Finish the task in progress, fail the waiting ones and stop the worker."""
        with self._condition:
            self._closed = True
            waiting = [task for tasks in self._queues.values() for task in tasks]
            self._queues.clear()
            self._pending = 0
            self._condition.notify_all()
        for task in waiting:
            _reply(task, None, QueueFull("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)


def _reply(task: _Task, result: Any, error: BaseException | None) -> None:
    try:
        task.loop.call_soon_threadsafe(_settle, task.future, result, error)
    except RuntimeError:  # the event loop is already closed: nobody waits any more
        pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
