"""The swarm of a search on a Ray cluster: block servers placed as Ray actors on the nodes marked ``swarm_host``.

``swarm.mode: ray`` in an experiment config. A node hosts block servers when Ray was started there with the
custom resource ``swarm_host`` (``ray start ... --resources='{"swarm_host": 2}'``; ``ray_cluster.yaml`` marks
the nodes): its amount is how many servers the node takes, one unit per server. Servers are spread over the
marked nodes; the bootstrap peer runs on the driver's node. Trial actors go anywhere.

Each actor owns one swarm process (``python -m ptune_search.swarm dht|serve``, the same command as
``ptune-search swarm``) on its node, listening on the node's Ray address, or on ``PTUNE_SWARM_HOST`` when the
node's Ray was started with that variable set (a node with several interfaces; 127.0.0.1 on one machine).
The process gets SIGTERM, and so leaves the DHT cleanly and stops its p2p daemon, when the actor stops it
or when the actor's worker dies.

Example (inside a driver joined to the cluster)::

    with RaySwarm(model_path, "tiny-llama", servers=2) as swarm:   # returns once every block is online
        trials_use(swarm.initial_peers)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ptune_search.swarm.launcher import PARENT_PID_ENV, read_peers_file, server_env, wait_until_online
from ptune_search.swarm.replica_layout import replica_layout_problem, split_blocks
from ptune_search.swarm.server.settings import ListenAddress, ServerSettings
from ptune_search.swarm.setting_flags import setting_flags

logger = logging.getLogger(__name__)

SWARM_RESOURCE = "swarm_host"
SWARM_HOST_ENV = "PTUNE_SWARM_HOST"


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class SwarmProcess:
    """One swarm process on the node Ray placed this actor on; ``start`` returns at once, ``status`` polls."""

    def __init__(self, swarm_id: str, name: str):
        self.node_ip = os.environ.get(SWARM_HOST_ENV) or ray.util.get_node_ip_address()
        # Shared by the swarm's actors on this node: the servers' core locks live here.
        self.node_dir = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / f"ptune-ray-swarm-{swarm_id}"
        self.node_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = self.node_dir / f"{name}.log"
        self.info_path = self.node_dir / f"{name}.json"  # server: written once online; bootstrap: its peers
        self.process: Optional[subprocess.Popen] = None

    def start_bootstrap(self) -> str:
        self._spawn(["dht", *setting_flags(ListenAddress(host=self.node_ip)), "--peers-file", str(self.info_path)])
        return self.node_ip

    def start_server(self, model: str, blocks: tuple[int, int], initial_peers: list[str], dht_prefix: str) -> str:
        from ptune_search.pretrained import resolve_model

        model_path = resolve_model(model)  # an alias is prepared on this node; a folder must exist here
        settings = ServerSettings(
            dht_prefix=dht_prefix,
            listen=ListenAddress(host=self.node_ip),
            compute_lock=self.node_dir / "cores",  # servers of one node share its cores
        )
        args = ["serve", "--model", str(model_path), "--blocks", f"{blocks[0]}:{blocks[1]}"]
        args += ["--initial-peers", *initial_peers, *setting_flags(settings), "--info-file", str(self.info_path)]
        self._spawn(args, server_env(settings))
        return self.node_ip

    def _spawn(self, args: Sequence[str], extra_env: Mapping[str, str] = {}) -> None:
        self.info_path.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ptune_search.swarm", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches its p2pd too
                # PARENT_PID_ENV: SIGTERM when this worker dies
                env=dict(os.environ, **extra_env, **{PARENT_PID_ENV: str(os.getpid())}),
            )

    def status(self) -> dict[str, Any]:
        """``exit_code`` (None while it runs), ``info`` once online (peers or server info), the log's tail."""
        assert self.process is not None, "start the process first"
        info = None
        with contextlib.suppress(OSError, ValueError):
            text = self.info_path.read_text()
            info = read_peers_file(self.info_path) if self.name == "bootstrap" else json.loads(text)
        return {"exit_code": self.process.poll(), "info": info or None, "log_tail": self._log_tail()}

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM (the process leaves the swarm cleanly), SIGKILL its group after ``timeout`` s; the exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left, p2pd included
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(5)
        shutil.rmtree(self.node_dir, ignore_errors=True)
        return code

    def _log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class RaySwarm:
    """A bootstrap peer on the driver's node and ``servers`` block servers on the ``swarm_host`` nodes.

    The blocks of ``model_path`` (the driver's copy, read for the block count and DHT prefix) are split into
    ``servers // replicas`` spans, each served by ``replicas`` servers. Servers load ``model`` (an alias,
    prepared on each node, or a folder that must exist at the same path on every node).
    """

    def __init__(self, model_path: str | Path, model: str, servers: int, replicas: int = 1):
        from transformers import AutoConfig

        from ptune_search.swarm.protocol import model_prefix

        problem = replica_layout_problem(servers, replicas) if servers >= 1 else "servers must be at least 1"
        if problem:
            raise ValueError(f"swarm.{problem}")
        config = AutoConfig.from_pretrained(model_path)
        self.model, self.prefix, self.num_blocks = model, model_prefix(config), config.num_hidden_layers
        self.servers, self.replicas = servers, replicas
        self.spans = split_blocks(self.num_blocks, servers // replicas)
        self.swarm_id = uuid.uuid4().hex[:12]
        self.actors: dict[str, Any] = {}
        self.initial_peers: list[str] = []

    def start(self, timeout: float = 600.0) -> "RaySwarm":
        from ptune_search.swarm.protocol import block_uids

        slots = ray.cluster_resources().get(SWARM_RESOURCE, 0)
        if slots < self.servers:
            raise ValueError(
                f"swarm.servers is {self.servers} but the Ray cluster has {slots:g} '{SWARM_RESOURCE}' slots: "
                f"start Ray on the nodes that host block servers with --resources='{{\"{SWARM_RESOURCE}\": N}}' "
                "(ray_cluster.yaml does), or lower swarm.servers"
            )
        deadline = time.monotonic() + timeout
        try:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            bootstrap = self._actor("bootstrap", scheduling_strategy=here)
            ray.get(bootstrap.start_bootstrap.remote(), timeout=timeout)
            self.initial_peers = self._wait_for_info("bootstrap", deadline)
            starts = {}
            for copy in range(self.replicas):
                for start, end in self.spans:
                    name = f"server-{copy}-blocks-{start}-{end}"
                    actor = self._actor(name, resources={SWARM_RESOURCE: 1}, scheduling_strategy="SPREAD")
                    starts[name] = actor.start_server.remote(self.model, (start, end), self.initial_peers, self.prefix)
            server_maddrs: list[str] = []
            for name, started in starts.items():
                node_ip = ray.get(started, timeout=max(1.0, deadline - time.monotonic()))  # the model is ready there
                server_maddrs += self._wait_for_info(name, deadline)["maddrs"]
                logger.info("swarm %s online on %s", name, node_ip)
            uids = block_uids(self.prefix, 0, self.num_blocks)
            wait_until_online(self.initial_peers, uids, self.replicas, deadline, where=" in the swarm's DHT")
            self.initial_peers += server_maddrs  # servers are DHT peers too: trials join even if the bootstrap died
        except BaseException:
            self.stop()
            raise
        return self

    def _actor(self, name: str, **options: Any) -> Any:
        actor = SwarmProcess.options(name=f"ptune-swarm-{self.swarm_id}-{name}", **options).remote(self.swarm_id, name)
        self.actors[name] = actor
        return actor

    def _wait_for_info(self, name: str, deadline: float) -> Any:
        """The process's info once it is online; fails early with its log when it exits."""
        actor = self.actors[name]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"swarm {name} was not online in time (is a node with a free '{SWARM_RESOURCE}' slot up?)"
                )
            try:
                status = ray.get(actor.status.remote(), timeout=remaining)
            except ray.exceptions.GetTimeoutError:
                continue
            if status["exit_code"] is not None:
                raise RuntimeError(f"swarm {name} exited with code {status['exit_code']}:\n{status['log_tail']}")
            if status["info"]:
                return status["info"]
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the servers, then the bootstrap peer (each leaves the swarm cleanly), then their actors."""
        servers = [actor for name, actor in self.actors.items() if name != "bootstrap"]
        for batch in (servers, [self.actors["bootstrap"]] if "bootstrap" in self.actors else []):
            ray.wait([actor.stop.remote() for actor in batch], num_returns=len(batch), timeout=timeout)
        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors.clear()

    def __enter__(self) -> "RaySwarm":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
