"""Run a command so that every process it leaves behind is accounted for: ``supervisor.py run|serve -- CMD ...``.

The supervisor makes itself the child subreaper of what it starts (prctl PR_SET_CHILD_SUBREAPER): a daemon
that detaches (``ray start``'s services, an ``mlflow server`` behind setsid, an ssh ControlMaster, processes
started over SSH through a supervised sshd) is re-parented to the supervisor instead of init, so nothing
escapes. ``run``: when CMD exits, stop whatever it left and exit with CMD's code. ``serve``: keep running
(CMD may exit; its daemons stay) until SIGTERM or SIGINT, then stop everything and exit 0.

Stopping is SIGTERM to every descendant, a grace period, then SIGKILL, repeated until none is left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 20.0
exit_codes: dict[int, int] = {}  # pid -> exit code of every child reaped so far


def reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exit_codes[pid] = os.waitstatus_to_exitcode(status)


def stop_descendants(grace: float = GRACE_S) -> None:
    me = psutil.Process()
    for _ in range(10):
        alive = [p for p in me.children(recursive=True) if _running(p)]
        if not alive:
            return
        for process in alive:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_running(p) for p in alive):
            reap()
            time.sleep(0.2)
        for process in me.children(recursive=True):
            _signal(process, signal.SIGKILL)
        time.sleep(0.2)
        reap()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def main() -> int:
    mode, separator, *command = sys.argv[1:]
    assert mode in ("run", "serve") and separator == "--" and command, __doc__
    if ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(command)  # reaped by reap(), never by Popen
    while not stopping and not (mode == "run" and child.pid in exit_codes):
        reap()
        time.sleep(0.2)
    stop_descendants()
    reap()
    return exit_codes.get(child.pid, 1) if mode == "run" else 0


if __name__ == "__main__":
    sys.exit(main())
