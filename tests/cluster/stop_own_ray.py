"""``ray stop`` on a test's loopback head: ``stop_own_ray.py RAY_TEMP_DIR`` stops only the Ray whose processes
name RAY_TEMP_DIR on their command line (its GCS, raylet, dashboard, agents, monitor), with all their
descendants (workers, actors' swarm processes and their p2p daemons).

Ray's own ``ray stop`` stops every Ray on the machine, other people's included; ``ray down`` runs it on the
head, so the test head's PATH puts a ``ray`` in front that sends ``ray stop`` here.
"""

from __future__ import annotations

import sys

import psutil


def main() -> int:
    marker = sys.argv[1]
    me = psutil.Process()
    spared = {me.pid, *(parent.pid for parent in me.parents())}
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid not in spared and marker in " ".join(process.info["cmdline"] or []):
            roots.append(process)
    victims = {}
    for root in roots:
        try:
            for process in [root, *root.children(recursive=True)]:
                victims[process.pid] = process
        except psutil.NoSuchProcess:
            continue
    for process in victims.values():
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=20)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    print(f"stopped {len(victims)} processes of the Ray in {marker}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
