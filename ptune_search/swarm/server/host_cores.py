"""The cores of one machine, shared by the block servers running on it.

Two servers that each compute with one torch thread per core oversubscribe the cores: OpenMP threads spin
at their barriers while the other process holds the core, and on 2 cores a step gets several times slower.
Servers given the same lock-file prefix therefore hold cores (one lock file per core) while they compute,
with as many torch threads as cores held. Servers line up for cores through a turnstile lock file and
say that they want work done through a shared "waiting" lock file. The first in line takes

- every free core if no other server is waiting: one client's requests, which reach the servers one at a
  time, run on all cores as fast as in a single process;
- one core if another server is waiting too: servers that have work at the same time compute side by side
  with a thread each, which is robust to the clients' and daemons' own CPU use, instead of taking turns.

The kernel releases the locks of a process that dies.

Example::

    cores = HostCores(workdir / "cores")  # the same prefix for every server of this machine
    with cores.hold() as held:  # 1 .. os.cpu_count()
        ...  # compute with torch.set_num_threads(held)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator, Optional


class HostCores:
    POLL_SECONDS = 0.001

    def __init__(self, prefix: str | Path, cores: Optional[int] = None):
        self.cores = cores or os.cpu_count() or 1
        self._waiting = os.open(f"{prefix}.waiting", os.O_RDWR | os.O_CREAT, 0o644)
        self._turnstile = os.open(f"{prefix}.line", os.O_RDWR | os.O_CREAT, 0o644)
        self._fds = [os.open(f"{prefix}.{index}", os.O_RDWR | os.O_CREAT, 0o644) for index in range(self.cores)]

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """Hold the free cores (one if another server waits too); yields how many cores are held."""
        fcntl.flock(self._waiting, fcntl.LOCK_SH)
        try:
            fcntl.flock(self._turnstile, fcntl.LOCK_EX)
            try:
                held: list[int] = []
                while not held:  # only the first in line polls; a core frees up within one task
                    held = self._take_free(limit=1 if self._others_waiting() else None)
                    if not held:
                        time.sleep(self.POLL_SECONDS)
            finally:
                fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._waiting, fcntl.LOCK_UN)
        try:
            yield len(held)
        finally:
            for fd in held:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _others_waiting(self) -> bool:
        """Whether another server holds the shared "waiting" lock (we hold it too, shared)."""
        try:
            fcntl.flock(self._waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)  # converts ours: only if no one else's
            others = False
        except BlockingIOError:
            others = True
        fcntl.flock(self._waiting, fcntl.LOCK_SH)  # a failed conversion may have dropped ours
        return others

    def _take_free(self, limit: Optional[int] = None) -> list[int]:
        held: list[int] = []
        for fd in self._fds:
            if limit is not None and len(held) >= limit:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(fd)
            except BlockingIOError:
                continue
        return held

    def close(self) -> None:
        for fd in [self._waiting, self._turnstile, *self._fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
