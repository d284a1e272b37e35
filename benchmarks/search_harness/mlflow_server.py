"""A real ``mlflow server`` on 127.0.0.1 that a test can kill and start again on the same port and store.

The server keeps its runs in ``<root>/mlflow.db`` (or serves a given store) and proxies artifacts into
``<root>/artifacts``, so a restarted server serves everything the killed one took. Each start runs in its own
session, and every process of it (the CLI and the web workers it spawns) is killed by pid.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import psutil


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """``start()`` / ``kill()`` as often as a test needs; ``uri`` stays the same."""

    def __init__(self, root: Path, port: Optional[int] = None, backend_store_uri: Optional[str] = None):
        self.root = root
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self._seen: dict[int, float] = {}  # pid -> start time of every process a start spawned
        self._log = root / "server.log"
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 180.0) -> None:
        """Returns once the server answers /health (on a loaded machine it may take a while to import)."""
        assert self.process is None, "already running"
        args = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes: a lighter server
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while not self.answers():
            self._note_descendants()
            assert self.process.poll() is None, f"mlflow server exited:\n{self._log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not up in {timeout}s:\n{self._log.read_text()[-3000:]}"
            time.sleep(0.5)
        self._note_descendants()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL to the server and every process it spawned: an outage, not a clean shutdown."""
        if self.process is None:
            return
        self._note_descendants()
        for pid, created in self._seen.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created:
                    process.kill()
            except psutil.NoSuchProcess:
                continue
        self.process.kill()
        self.process.wait(30)
        self.process, self._seen = None, {}

    def _note_descendants(self) -> None:
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self._seen.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            pass
