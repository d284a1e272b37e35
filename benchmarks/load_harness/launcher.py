"""The load clients as forks of one process that imported torch, transformers and hivemind once.

Eight clients started as eight interpreters each spend seconds of CPU importing the same modules; on a
2-core machine that is most of a minute before the load can begin. Here one process imports them, then forks
the clients (no client has started a thread, an event loop or a p2p daemon yet: each builds its own after
the fork). Run as ``python -m benchmarks.load_harness SPECS.json`` (a JSON list of ClientSpec) in a session
of its own, so that one ``killpg`` ends the launcher, every client and every client's p2p daemon.

The launcher waits for all clients; for a client that died without writing its result (a signal, a crash
in native code) it writes one that says how the client ended.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from benchmarks.load_harness.client import ClientResult, ClientSpec, run_client, write_result


def import_client_modules() -> None:
    """What every client imports before its first step: done once here, inherited by the forks."""
    import hivemind  # noqa: F401
    import torch  # noqa: F401

    import ptune_search.models.llama.model  # noqa: F401
    import ptune_search.swarm.client.remote_chain  # noqa: F401


def run_forked(spec: ClientSpec) -> None:
    """In the child: write to the client's own log, run it, and never return into the launcher's loop."""
    code = 1
    try:
        log = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = run_client(spec)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch(specs: list[ClientSpec]) -> int:
    """Fork one client per spec, wait for all; 1 if any failed."""
    import_client_modules()
    children = {}
    for spec in specs:
        pid = os.fork()
        if pid == 0:
            run_forked(spec)
        children[pid] = spec
    failed = False
    for pid, spec in children.items():
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        failed |= code != 0
        if not Path(spec.result_path).exists():
            result = ClientResult(spec.client, spec.tuning_mode, pid=pid, exceptions=1)
            ending = f"signal {-code}" if code < 0 else f"exit code {code}"
            result.errors.append(f"the client process ended with {ending} without writing a result")
            write_result(spec, result)
    return 1 if failed else 0


def main(specs_path: str) -> int:
    specs = [ClientSpec(**values) for values in json.loads(Path(specs_path).read_text())]
    return launch(specs)


def write_specs(path: Path, specs: list[ClientSpec]) -> None:
    path.write_text(json.dumps([dataclasses.asdict(spec) for spec in specs]))
