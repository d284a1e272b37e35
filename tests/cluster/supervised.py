"""Commands run under supervisor.py, so that a test stops them and every process they leave behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import psutil

SUPERVISOR = Path(__file__).with_name("supervisor.py")


class Supervised:
    """A long-running command (sshd, a Ray head) under ``supervisor.py serve``; :meth:`stop` ends it all."""

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[Path] = None,
    ):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(SUPERVISOR), "serve", "--", *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.process.pid).children(recursive=True)
        return []

    def stop(self, timeout: float = 120.0) -> None:
        """SIGTERM: the supervisor stops every descendant; SIGKILL to what is left if it does not finish in time."""
        if self.process.poll() is None:
            leftovers = self.descendants()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
            for process in [*self.descendants(), *leftovers, psutil.Process(self.process.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def run_supervised(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[Path] = None,
    timeout: float = 600.0,
) -> int:
    """Run ``command`` to its end (``supervisor.py run``): what it leaves running (ssh masters) is stopped too."""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            [sys.executable, str(SUPERVISOR), "run", "--", *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            return process.wait(timeout)
        except BaseException:
            process.send_signal(signal.SIGTERM)  # the supervisor stops the command and its leftovers
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
            raise


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
