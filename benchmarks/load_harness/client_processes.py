"""The runner's side of the load clients: their specs, the launcher process, readiness, the deadline, results.

The clients are forked by one launcher process in a session of its own (see :mod:`.launcher`); they talk
to the runner through files in a work folder: ``client-N.ready`` after the warm-up, one shared ``go`` file
holding the deadline, ``client-N.result.json`` at the end, and each client's log ``client-N.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional

from benchmarks.load_harness.client import ClientResult, ClientSpec
from benchmarks.load_harness.launcher import write_specs
from benchmarks.load_harness.shape import LoadShape


class ClientProcesses:
    """The load clients, forked by one launcher process in a session of its own (see :mod:`.launcher`).

    On exit the whole session is SIGKILLed: launcher, clients and their p2p daemons, whatever state they are in.
    """

    def __init__(self, model: Path, initial_peers: list[str], shape: LoadShape, work_dir: Path):
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.go_path = work_dir / "go"
        self.go_path.unlink(missing_ok=True)
        go_timeout = shape.ready_timeout_s + 60.0
        self.specs = [self._spec(index, model, initial_peers, shape, go_timeout) for index in range(shape.clients)]
        self.launcher: Optional[subprocess.Popen] = None
        self._log: Optional[IO] = None
        self.errors: dict[int, str] = {}  # client -> why the runner gave up on it

    def _spec(self, index: int, model: Path, peers: list[str], shape: LoadShape, go_timeout: float) -> ClientSpec:
        spec = ClientSpec(
            client=index,
            model=str(model),
            initial_peers=list(peers),
            tuning_mode=shape.modes[index % len(shape.modes)],
            pre_seq_len=shape.pre_seq_len,
            batch=shape.batch,
            length=shape.length,
            num_labels=shape.num_labels,
            warmup_steps=shape.warmup_steps,
            threads=shape.client_threads,
            ready_path=str(self.work_dir / f"client-{index}.ready"),
            go_path=str(self.go_path),
            result_path=str(self.work_dir / f"client-{index}.result.json"),
            log_path=str(self.work_dir / f"client-{index}.log"),
            go_timeout_s=go_timeout,
        )
        for path in (spec.ready_path, spec.result_path):
            Path(path).unlink(missing_ok=True)
        return spec

    def start(self) -> None:
        specs_path = self.work_dir / "clients.json"
        write_specs(specs_path, self.specs)
        self._log = open(self.work_dir / "launcher.log", "wb")
        self.launcher = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.load_harness", str(specs_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],  # the repository root, where ``benchmarks`` is importable
        )

    def wait_ready(self, timeout: float) -> list[int]:
        """Clients that finished their warm-up within ``timeout`` s (those that did not are noted)."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            if all(self._ready(spec) or self._finished(spec) for spec in self.specs):
                break
            time.sleep(0.2)
        ready = [spec.client for spec in self.specs if self._ready(spec) and not self._finished(spec)]
        if self.running():
            reason = f"not ready (warm-up not finished) within {timeout:.0f} s"
        else:
            code = self.launcher.returncode if self.launcher is not None else None
            reason = f"the launcher exited with code {code} before the client was ready"
        for spec in self.specs:
            if spec.client not in ready and not self._finished(spec):
                self.errors[spec.client] = reason
        return ready

    def send_deadline(self, deadline: float) -> None:
        staging = self.go_path.with_suffix(".tmp")
        staging.write_text(repr(deadline))
        os.replace(staging, self.go_path)

    def running(self) -> bool:
        return self.launcher is not None and self.launcher.poll() is None

    def kill_if_running(self, reason: str) -> None:
        if not self.running():
            return
        for spec in self.specs:
            if not self._finished(spec):
                self.errors.setdefault(spec.client, reason)
        self._kill()

    def result(self, client: int) -> ClientResult:
        """The client's own report, with what the runner saw added; a client without one counts as failed."""
        spec = self.specs[client]
        try:
            result = ClientResult.from_dict(json.loads(Path(spec.result_path).read_text()))
        except (OSError, ValueError, TypeError):
            result = ClientResult(client, spec.tuning_mode)
            self.errors.setdefault(client, "no result (the launcher ended before the client wrote one)")
        if client in self.errors:
            result.exceptions += 1
            result.errors.append(f"{self.errors[client]}; log {spec.log_path}:\n{self.log_tail(client)}")
        return result

    def log_tail(self, client: int, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(Path(self.specs[client].log_path).read_text(errors="replace").splitlines()[-lines:])
        return ""

    @staticmethod
    def _ready(spec: ClientSpec) -> bool:
        return Path(spec.ready_path).exists()

    @staticmethod
    def _finished(spec: ClientSpec) -> bool:
        return Path(spec.result_path).exists()

    def _kill(self) -> None:
        if self.launcher is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.launcher.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.launcher.wait(30)

    def close(self) -> None:
        self._kill()  # also ends whatever a finished launcher left in its session
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ClientProcesses":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
