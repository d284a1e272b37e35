"""A search driver (or a benchmark) run as a user would, in its own process, with every process it starts
accounted for."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import psutil

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "experiments" / "tiny.yaml"


class WatchedProcess:
    """A command run from the repository root in its own session; records all its descendants so none can
    outlive the test. Its output goes to ``log_file``, or only its stderr when ``stdout_file`` takes stdout."""

    def __init__(self, args: Sequence[str], log_file: Path, stdout_file: Optional[Path] = None):
        self.log_file = log_file
        self._log = open(log_file, "ab")
        self._stdout = open(stdout_file, "wb") if stdout_file is not None else None
        self.process = subprocess.Popen(
            args,
            stdout=self._stdout or self._log,
            stderr=self._log if self._stdout else subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )
        self.seen: dict[int, float] = {}
        self._watching = True
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while self._watching:
            try:
                for child in psutil.Process(self.process.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child.create_time())
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._watching = False

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def survivors(self, grace: float = 30.0) -> list[str]:
        """Descendants still alive ``grace`` seconds after the driver ended (same pid and start time)."""
        deadline = time.monotonic() + grace
        while True:
            alive = []
            for pid, created in self.seen.items():
                try:
                    process = psutil.Process(pid)
                    if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid}: {' '.join(process.cmdline())[:150]}")
                except psutil.NoSuchProcess:
                    continue
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def kill_everything(self) -> None:
        """Teardown: whatever is left of the driver and its descendants, by the pids recorded here."""
        self._watching = False
        pids = [self.process.pid, *self.seen]
        for pid in pids:
            try:
                process = psutil.Process(pid)
                if pid == self.process.pid or process.create_time() == self.seen.get(pid):
                    process.kill()
            except psutil.NoSuchProcess:
                continue
        self.process.wait(10)
        self._log.close()
        if self._stdout is not None:
            self._stdout.close()


class SearchProcess(WatchedProcess):
    """A search driver (``ptune-search search CONFIG``), watched as above."""

    def __init__(self, config: Path, overrides: Sequence[str], log_file: Path, extra_args: Sequence[str] = ()):
        args = [sys.executable, "-m", "ptune_search.cli", "search", str(config), *extra_args]
        for override in overrides:
            args += ["--set", override]
        super().__init__(args, log_file)


def assert_no_survivors(search: WatchedProcess, grace: float = 30.0) -> None:
    survivors = search.survivors(grace)
    assert not survivors, "processes outlived the search:\n" + "\n".join(survivors)


def wait_for(search: WatchedProcess, condition: Callable[[], bool], timeout: float = 300.0) -> None:
    """Poll ``condition`` while the search runs; fail with the driver's log if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert search.process.poll() is None, f"the search ended first:\n{search.log()[-3000:]}"
        assert time.monotonic() < deadline, f"not reached in {timeout}s:\n{search.log()[-3000:]}"
        time.sleep(0.5)
