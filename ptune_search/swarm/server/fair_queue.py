"""One compute thread for a block server, taking work from all clients in turn.

Each client (keyed by its peer id) has its own FIFO; the worker serves the clients round-robin, one task at
a time, so a client that sends a burst of requests delays every other client by at most one task each.
Handlers on the event loop ``await queue.run(client, fn)``; a cancelled request is skipped, not computed.

Work submitted with ``await queue.run_mergeable(client, Mergeable(...))`` may run together with the work of
other clients waiting at the same moment: the worker takes the task next in turn and the first waiting task
of each other client in turn that has the same ``key``, as long as the batch stays within
:class:`MergeLimits`, and hands their payloads to the first one's ``run_batch`` at once. A merged batch is
one round of the round-robin, so fairness is unchanged. The worker waits at most ``MergeLimits.max_wait``
for clients that were active lately and have nothing waiting yet.

Example::

    queue = FairQueue(max_pending=100)
    queue.start()
    result = await queue.run("client-a", lambda: sum(range(10**6)))  # runs on the compute thread
    queue.close()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Hashable, Optional, Sequence, TypeVar

from ptune_search.swarm.protocol import RequestLimits
from ptune_search.swarm.setting_flags import setting

if TYPE_CHECKING:
    from ptune_search.swarm.server.host_cores import HostCores

T = TypeVar("T")


class QueueFull(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class MergeLimits:
    """How large a merged batch may grow: ``max_tokens`` rows x longest length (0: never merge) and
    ``max_bytes`` of the requests' tensors together; and how long it may wait for more.

    Without waiting, two clients never merge: each one's request arrives while the other's computes, and is
    alone in the queue when the worker turns to it. A short wait for a client that sent mergeable work within the
    last ``FairQueue.ACTIVE_SECONDS`` lets their passes meet once; then they come back together, as one
    batch's replies go out at once."""

    max_tokens: int = setting(
        8192,
        flag="--merge-max-tokens",
        help="largest batch (rows x length) of concurrent clients' requests run as one; 0: never merge",
    )
    max_bytes: int = setting(64 * 1024**2, flag="--merge-max-bytes", help="largest tensors of a merged batch together")
    max_wait: float = setting(
        0.02, flag="--merge-wait", help="seconds a batch may wait for other active clients' requests"
    )


RunBatch = Callable[[Sequence[Any]], Sequence[Any]]
"""``run_batch(payloads)``: one result per payload, in order; a result that is an exception is raised to its caller."""


@dataclasses.dataclass(frozen=True)
class Mergeable:
    """Work that may run in one batch with other work of the same ``key`` (``run_batch`` computes such batches)."""

    key: Hashable
    rows: int
    length: int
    nbytes: int
    payload: Any
    run_batch: RunBatch


class _Task:
    __slots__ = ("fn", "loop", "future", "mergeable")

    def __init__(
        self,
        fn: Optional[Callable[[], Any]],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future,
        mergeable: Optional[Mergeable] = None,
    ):
        self.fn, self.loop, self.future, self.mergeable = fn, loop, future, mergeable


class FairQueue:
    """Args:
    max_pending: waiting tasks of all clients together beyond which ``run`` raises QueueFull.
    cores: the machine's cores shared with other servers (see HostCores); each task computes with the
        cores free at its start.
    set_threads: called in the worker with the number of cores to use (e.g. ``torch.set_num_threads``).
    threads: the number of threads without ``cores``.
    merge_limits: bounds of a merged batch of :class:`Mergeable` work.
    """

    ACTIVE_SECONDS = 2.0  # a client that sent work this recently is expected to send more

    def __init__(
        self,
        max_pending: int = RequestLimits.max_queue,
        name: str = "block-compute",
        *,
        cores: Optional[HostCores] = None,
        set_threads: Optional[Callable[[int], None]] = None,
        threads: Optional[int] = None,
        merge_limits: Optional[MergeLimits] = None,
    ):
        self.max_pending = max_pending
        self.merge_limits = merge_limits or MergeLimits()
        self._cores, self._set_threads, self._threads = cores, set_threads, threads
        self._condition = threading.Condition()
        self._queues: collections.OrderedDict[Hashable, collections.deque[_Task]] = collections.OrderedDict()
        self._pending = 0
        self._closed = False
        self._last_submit: collections.OrderedDict[Hashable, float] = collections.OrderedDict()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.stats = {
            "tasks": 0,
            "compute_s": 0.0,
            "lock_wait_s": 0.0,
            "shared_core_tasks": 0,
            "merged_batches": 0,  # batches of two or more requests
            "merged_requests": 0,  # the requests in them
            "largest_merge": 1,
        }

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, client: Hashable, fn: Callable[[], T]) -> T:
        return await self._submit(client, fn, None)

    async def run_mergeable(self, client: Hashable, work: Mergeable) -> Any:
        """The result for ``work.payload``, computed alone or merged with other clients' work."""
        return await self._submit(client, None, work)

    async def _submit(self, client: Hashable, fn: Optional[Callable[[], Any]], work: Optional[Mergeable]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._condition:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._pending >= self.max_pending:
                raise QueueFull(f"the server's queue is full ({self._pending} requests waiting)")
            self._queues.setdefault(client, collections.deque()).append(_Task(fn, loop, future, work))
            self._pending += 1
            if work is not None:  # only clients that send mergeable work are worth waiting for
                self._note_submit(client)
            self._condition.notify()
        return await future

    def _next_tasks(self) -> list[_Task]:
        """The task next in turn, with the tasks of other clients it merges with; [] once closed."""
        with self._condition:
            while not self._pending and not self._closed:
                self._condition.wait()
            if not self._pending:
                return []
            client = next(iter(self._queues))
            task = self._pop(client)
            if task.mergeable is None or self.merge_limits.max_tokens <= 0:
                return [task]
            return self._merge_with(client, task)

    def _merge_with(self, client: Hashable, first: _Task) -> list[_Task]:
        """``first`` and the first task of each other client in turn that merges with it; waits up to
        ``max_wait`` for clients that sent mergeable work within ``ACTIVE_SECONDS`` and have none waiting yet."""
        limits, key = self.merge_limits, first.mergeable.key
        tasks, seen = [first], {client}
        rows, length, nbytes = first.mergeable.rows, first.mergeable.length, first.mergeable.nbytes
        deadline = time.monotonic() + limits.max_wait
        while True:
            for other in list(self._queues):  # the others in their round-robin order
                if other in seen:
                    continue
                head = self._queues[other][0]
                work = head.mergeable
                seen.add(other)
                if work is None or work.key != key or head.future.cancelled():
                    continue
                if (rows + work.rows) * max(length, work.length) > limits.max_tokens:
                    continue
                if nbytes + work.nbytes > limits.max_bytes:
                    continue
                rows, length, nbytes = rows + work.rows, max(length, work.length), nbytes + work.nbytes
                tasks.append(self._pop(other))
            now = time.monotonic()
            active = [c for c, at in self._last_submit.items() if c not in seen and now - at < self.ACTIVE_SECONDS]
            if not active or now >= deadline or self._closed:
                return tasks
            self._condition.wait(deadline - now)

    def _note_submit(self, client: Hashable) -> None:
        now = time.monotonic()
        self._last_submit[client] = now
        self._last_submit.move_to_end(client)
        while now - next(iter(self._last_submit.values())) > self.ACTIVE_SECONDS:  # forget idle clients
            self._last_submit.popitem(last=False)

    def _pop(self, client: Hashable) -> _Task:
        """The first task of ``client``, whose turn then moves to the end of the round."""
        tasks = self._queues[client]
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
        while tasks := self._next_tasks():
            tasks = [task for task in tasks if not task.future.cancelled()]  # the client gave up: skip its work
            if not tasks:
                continue
            try:
                waited = time.perf_counter()
                with self._hold_cores() as held:
                    self._use_threads(held)
                    started = time.perf_counter()
                    try:
                        results = self._compute(tasks)
                    finally:
                        self._account(len(tasks), started - waited, time.perf_counter() - started, held)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the waiting handlers
                for task in tasks:
                    _reply(task, None, e)
            else:
                for task, result in zip(tasks, results):
                    if isinstance(result, BaseException):
                        _reply(task, None, result)
                    else:
                        _reply(task, result, None)

    def _compute(self, tasks: list[_Task]) -> Sequence[Any]:
        if tasks[0].mergeable is None:
            return [tasks[0].fn()]
        results = tasks[0].mergeable.run_batch([task.mergeable.payload for task in tasks])
        if len(results) != len(tasks):
            raise RuntimeError(f"run_batch gave {len(results)} results for {len(tasks)} requests")
        return results

    def _account(self, requests: int, lock_wait: float, compute: float, cores: Optional[int]) -> None:
        self.stats["tasks"] += 1
        self.stats["lock_wait_s"] += lock_wait
        self.stats["compute_s"] += compute
        if cores == 1:
            self.stats["shared_core_tasks"] += 1
        if requests > 1:
            self.stats["merged_batches"] += 1
            self.stats["merged_requests"] += requests
            self.stats["largest_merge"] = max(self.stats["largest_merge"], requests)

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
