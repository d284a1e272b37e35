"""The cores of one machine, shared by the block servers running on it.

Two servers that each compute with one torch thread per core oversubscribe the cores: OpenMP threads spin
at their barriers while the other process holds the core, and on 2 cores a step gets several times slower.
Servers given the same lock-file prefix therefore hold cores while they compute, one lock file per core:
a task takes every core that is free at its start and computes with that many threads; if none is free,
it waits in line (a turnstile lock file) for the first core to free up and takes only that one. So one
client's requests, which reach the servers one at a time, run on all cores as fast as in a single process;
with several clients, servers that have work at the same time get a core each instead of taking turns.

The kernel releases the locks of a process that dies.

Example::

    cores = HostCores("/tmp/swarm/cores")
    with cores.hold() as held:  # 1 .. os.cpu_count()
        torch.set_num_threads(held)
        ...
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
        self._turnstile = os.open(f"{prefix}.line", os.O_RDWR | os.O_CREAT, 0o644)
        self._fds = [os.open(f"{prefix}.{index}", os.O_RDWR | os.O_CREAT, 0o644) for index in range(self.cores)]

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """Hold every free core, or wait in line for one; yields how many cores are held."""
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            held = self._take_free()
            while not held:  # only the first in line polls; a core frees up within one task
                time.sleep(self.POLL_SECONDS)
                held = self._take_free(limit=1)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        try:
            yield len(held)
        finally:
            for fd in held:
                fcntl.flock(fd, fcntl.LOCK_UN)

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
        for fd in [self._turnstile, *self._fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
