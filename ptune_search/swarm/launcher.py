"""Starting swarms: a bootstrap peer, one block server, or a whole local swarm of subprocesses.

The ``run_*`` functions block until SIGINT or SIGTERM, then leave the swarm cleanly (records go offline, the
p2p daemons stop). :class:`LocalSwarm` starts a bootstrap peer and block servers as subprocesses on
127.0.0.1, each in its own process group so that stopping it, even with SIGKILL, leaves no p2pd behind.

Example::

    from ptune_search.models import DistributedLlamaForCausalLM

    with LocalSwarm(path, servers=2) as swarm:   # returns once every block is online
        model = DistributedLlamaForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Awaitable, Callable, Mapping, Optional, Sequence

from ptune_search.swarm.replica_layout import replica_layout_problem, split_blocks
from ptune_search.swarm.server.settings import ListenAddress, ServerSettings
from ptune_search.swarm.setting_flags import setting_flags

logger = logging.getLogger(__name__)

PARENT_PID_ENV = "PTUNE_SWARM_PARENT_PID"


# What a LocalSwarm chooses for each of its servers, so not a setting of the swarm as a whole.
def server_env(settings: ServerSettings) -> dict[str, str]:
    """The environment a block server runs best in: OpenMP's default team size 1 when the server sizes its
    compute thread's team itself (``num_threads`` or ``compute_lock``). Under libgomp's defaults the team's
    worker was off its core between ops: 11-14 % of the cores idle while clients trained, 1.6-2.5 % with
    this, and 227-231 -> 245 tokens/s for one client on 2 cores (benchmarks/core_use, docs/benchmarks.md)."""
    return {"OMP_NUM_THREADS": "1"} if settings.compute_lock or settings.num_threads else {}


PER_SERVER_SETTINGS = ("listen", "compute_lock", "identity_file")


def parse_blocks(blocks: str | tuple[int, int]) -> tuple[int, int]:
    """``"3:7" -> (3, 7)``: blocks 3, 4, 5 and 6."""
    if isinstance(blocks, tuple):
        start, end = blocks
    else:
        try:
            start_text, end_text = blocks.split(":")
            start, end = int(start_text), int(end_text)
        except ValueError:
            raise ValueError(f"--blocks must look like START:END, e.g. 0:15 (got {blocks!r})") from None
    if not 0 <= start < end:
        raise ValueError(f"--blocks START:END needs 0 <= START < END (got {start}:{end})")
    return start, end


def write_peers_file(path: str | Path, maddrs: Sequence[str]) -> None:
    """Write multiaddrs one per line, atomically: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{maddr}\n" for maddr in maddrs))
    os.replace(tmp, path)


def read_peers_file(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """``asyncio.run(main(stop))`` where ``stop`` is set by SIGINT or SIGTERM (when run in the main thread)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def run_bootstrap_peer(peers_file: Optional[str | Path] = None, listen: Optional[ListenAddress] = None) -> None:
    """A DHT peer that others join through; writes its multiaddrs to ``peers_file`` and stdout, runs until a signal."""
    listen = listen or ListenAddress()

    async def main(stop: asyncio.Event) -> None:
        from ptune_search.swarm.record_bounds import RecordLimits, join_dht
        from ptune_search.swarm.signed_records import SwarmRecordValidator

        node = await join_dht(RecordLimits(), SwarmRecordValidator(), host_maddrs=[listen.maddr])
        try:
            maddrs = [str(addr) for addr in await node.get_visible_maddrs()]
            if peers_file is not None:
                write_peers_file(peers_file, maddrs)
            print("\n".join(maddrs), flush=True)
            await stop.wait()
        finally:
            await node.shutdown()

    run_until_signal(main)


def run_block_server(
    model: str | Path,
    blocks: str | tuple[int, int],
    initial_peers: Sequence[str],
    settings: Optional[ServerSettings] = None,
    *,
    info_file: Optional[str | Path] = None,
) -> None:
    """Serve blocks ``blocks`` ("A:B": A..B-1) of the checkpoint ``model`` until SIGINT or SIGTERM.

    Once online, the server writes ``{"peer_id", "maddrs", "start", "end", "pid"}`` as JSON to ``info_file``.
    Servers on one machine given the same ``settings.compute_lock`` prefix share its cores instead of
    oversubscribing them (see :class:`~ptune_search.swarm.server.host_cores.HostCores`). With
    ``settings.identity_file`` the server keeps its key, so its peer id, across restarts (created there if
    absent), e.g. for clients' ``trusted_servers``.
    """
    from ptune_search.swarm.server.block_server import BlockServer

    start, end = parse_blocks(blocks)
    server = BlockServer(model, start, end, initial_peers, settings)

    def on_online(server: BlockServer) -> None:
        if info_file is not None:
            info = {"peer_id": server.peer_id, "maddrs": server.maddrs, "start": start, "end": end, "pid": os.getpid()}
            tmp = Path(f"{info_file}.tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, info_file)

    run_until_signal(lambda stop: server.run(stop, on_online))


def wait_until_online(
    initial_peers: Sequence[str],
    uids: Sequence[str],
    replicas: int,
    deadline: float,
    check: Callable[[], None] = lambda: None,
    where: str = "",
) -> None:
    """Wait until each of ``uids`` has ``replicas`` ONLINE servers in the DHT, seen the way clients see it.

    ``check`` runs before each look (it raises when a server process died); ``where`` ends the timeout message.
    """
    from ptune_search.swarm.client.connection import SwarmConnection
    from ptune_search.swarm.client.routing import fetch_block_records
    from ptune_search.swarm.protocol import ServerState

    with SwarmConnection(list(initial_peers)) as connection:
        while True:
            check()
            records = connection.run(fetch_block_records(connection.node, list(uids)), timeout=60)
            online = [sum(r.state == ServerState.ONLINE for r in servers.values()) for servers in records]
            if all(count >= replicas for count in online):
                return
            if time.monotonic() > deadline:
                missing = [uid for uid, count in zip(uids, online) if count < replicas]
                raise TimeoutError(f"blocks {missing} are not online in time{where}")
            time.sleep(0.25)


@dataclasses.dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    span: Optional[tuple[int, int]] = None
    expected_exit: bool = False  # killed or stopped on purpose

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def info_path(self) -> Path:
        return self.log_path.with_suffix(".json")

    @property
    def peer_id(self) -> Optional[str]:
        """The server's peer id once it is online (None before, or for the bootstrap peer)."""
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.info_path.read_text())["peer_id"]
        return None

    @property
    def maddrs(self) -> list[str]:
        """The server's multiaddrs once it is online (empty before, or for the bootstrap peer)."""
        with contextlib.suppress(OSError, ValueError):
            return list(json.loads(self.info_path.read_text())["maddrs"])
        return []

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class LocalSwarm:
    """A bootstrap peer plus ``servers`` block servers on 127.0.0.1, each block served by ``replicas`` of them.

    Once started, :attr:`initial_peers` lists the bootstrap peer and every server: all are DHT peers, so
    clients and new servers join through any of them that is alive, also after the bootstrap peer died.

    With ``servers=0`` only the bootstrap peer starts; add servers with :meth:`start_server`. The blocks are
    split into ``servers // replicas`` spans and each span is served by ``replicas`` servers, so ``servers``
    must be a multiple of ``replicas``. Every server runs with ``settings`` (e.g.
    ``ServerSettings(record_ttl=4.0)``), but for the address, key and core lock, which the swarm chooses for
    each (:data:`PER_SERVER_SETTINGS`). Children die with this process's thread that started them. With
    ``share_cores`` (default) the servers share the machine's cores (see ``server/host_cores.py``).
    Children run :attr:`module` (``python -m``), which takes the arguments of ``ptune_search.swarm``.
    """

    module = "ptune_search.swarm"

    def __init__(
        self,
        model: str | Path,
        servers: int,
        replicas: int = 1,
        *,
        settings: Optional[ServerSettings] = None,
        log_dir: Optional[str | Path] = None,
        share_cores: bool = True,
    ):
        from transformers import AutoConfig

        from ptune_search.models.registry import check_supported

        problem = replica_layout_problem(servers, replicas)
        if problem:
            raise ValueError(f"--{problem}")
        self.settings = settings or ServerSettings()
        defaults = ServerSettings()
        chosen = [name for name in PER_SERVER_SETTINGS if getattr(self.settings, name) != getattr(defaults, name)]
        if chosen:
            raise ValueError(f"a local swarm chooses {', '.join(chosen)} for each server: leave them unset")
        self.model = Path(model)
        check_supported(self.model)
        self.config = AutoConfig.from_pretrained(self.model)
        if self.settings.dht_prefix:
            self.config.dht_prefix = self.settings.dht_prefix
        self.num_blocks = self.config.num_hidden_layers
        self.replicas = replicas
        self.spans = split_blocks(self.num_blocks, servers // replicas) if servers else []
        self.share_cores = share_cores
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="ptune-swarm-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.bootstrap: Optional[ChildProcess] = None
        self.servers: list[ChildProcess] = []
        self.initial_peers: list[str] = []
        self.bootstrap_maddrs: list[str] = []
        self._logs: list[IO] = []
        self._interrupt: Optional[threading.Event] = None

    @property
    def prefix(self) -> str:
        from ptune_search.swarm.protocol import model_prefix

        return model_prefix(self.config)

    def start(self, timeout: float = 300.0, interrupt: Optional[threading.Event] = None) -> "LocalSwarm":
        """Start everything and return once every block has ``replicas`` online servers.

        Setting ``interrupt`` makes a pending start stop everything and raise InterruptedError.
        """
        self._interrupt = interrupt
        try:
            peers_file = self.log_dir / "bootstrap-peers.txt"
            peers_file.unlink(missing_ok=True)
            self.bootstrap = self._spawn("bootstrap", ["dht", "--peers-file", str(peers_file)])
            deadline = time.monotonic() + timeout
            for _replica in range(self.replicas):  # servers start importing now and wait for the peers file
                for start, end in self.spans:
                    self.start_server(start, end, peers_file=peers_file)
            while not peers_file.exists():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the bootstrap peer did not start within {timeout}s")
                time.sleep(0.1)
            self.bootstrap_maddrs = read_peers_file(peers_file)
            self.initial_peers = list(self.bootstrap_maddrs)
            if self.spans:
                self.wait_until_online(self.replicas, timeout=max(1.0, deadline - time.monotonic()))
                self.initial_peers = self.peer_maddrs()
        except BaseException:
            self.stop()
            raise
        return self

    def start_server(
        self, start: int, end: int, extra_args: Sequence[str] = (), peers_file: Optional[Path] = None
    ) -> ChildProcess:
        """Start one more server for blocks ``start..end-1`` (it joins through :attr:`initial_peers`).

        ``extra_args`` go to :attr:`module` as they are (a test server's own flags).
        """
        settings = self.settings
        if self.share_cores:
            settings = dataclasses.replace(settings, compute_lock=self.log_dir / "cores.lock")
        args = ["serve", "--model", str(self.model), "--blocks", f"{start}:{end}"]
        args += ["--peers-file", str(peers_file)] if peers_file else ["--initial-peers", *self.initial_peers]
        args += [*setting_flags(settings), *extra_args]
        name = f"server-{len(self.servers)}-blocks-{start}-{end}"
        args += ["--info-file", str(self.log_dir / f"{name}.json")]
        child = self._spawn(name, args, server_env(settings))
        child.span = (start, end)
        self.servers.append(child)
        return child

    def command(self, name: str, args: Sequence[str]) -> list[str]:
        """The command line of child ``name``: a subclass may run it elsewhere (e.g. in a network namespace)."""
        return [sys.executable, "-m", self.module, *args]

    def _spawn(self, name: str, args: Sequence[str], extra_env: Mapping[str, str] = {}) -> ChildProcess:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "wb")
        self._logs.append(log)
        env = dict(os.environ, **extra_env, **{PARENT_PID_ENV: str(os.getpid())})
        process = subprocess.Popen(
            self.command(name, args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killpg reaches its p2pd too
            env=env,
        )
        return ChildProcess(name, process, log_path)

    def wait_until_online(
        self, replicas: int = 1, timeout: float = 300.0, blocks: Optional[tuple[int, int]] = None
    ) -> None:
        """Wait until every block (or blocks ``start..end-1``) has at least ``replicas`` online servers."""
        from ptune_search.swarm.protocol import block_uids

        uids = block_uids(self.prefix, *(blocks or (0, self.num_blocks)))
        deadline = time.monotonic() + timeout
        wait_until_online(self.initial_peers, uids, replicas, deadline, self._check_alive, f"; logs in {self.log_dir}")

    def peer_maddrs(self) -> list[str]:
        """Multiaddrs of the bootstrap peer and of every server that is online, in that order."""
        bootstrap = self.bootstrap_maddrs if self.bootstrap is not None and self.bootstrap.alive() else []
        servers = [maddr for child in self.servers if child.alive() for maddr in child.maddrs]
        return [*bootstrap, *servers]

    def _check_alive(self) -> None:
        if self._interrupt is not None and self._interrupt.is_set():
            raise InterruptedError("the local swarm was interrupted while starting")
        for child in [self.bootstrap, *self.servers]:
            if child is not None and not child.alive() and not child.expected_exit:
                raise RuntimeError(
                    f"{child.name} exited with code {child.process.returncode}; "
                    f"log {child.log_path}:\n{child.log_tail()}"
                )

    def dead_children(self) -> list[ChildProcess]:
        """Children that exited although nobody stopped them."""
        return [c for c in [self.bootstrap, *self.servers] if c is not None and not c.alive() and not c.expected_exit]

    def server_by_peer(self, peer_id: str) -> int:
        """Index in :attr:`servers` of the server with ``peer_id``."""
        for index, child in enumerate(self.servers):
            if child.peer_id == peer_id:
                return index
        raise KeyError(f"no server of this swarm has peer id {peer_id}")

    def kill_server(self, index: int, sig: int = signal.SIGKILL) -> ChildProcess:
        """Send ``sig`` to server ``index`` and its p2p daemon (its whole process group), as if it crashed."""
        child = self.servers[index]
        child.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        return child

    def stop_server(self, index: int, timeout: float = 30.0) -> int:
        """Stop server ``index`` cleanly (SIGTERM: its records go offline); return its exit code."""
        child = self.servers[index]
        child.expected_exit = True
        if child.alive():
            child.process.send_signal(signal.SIGTERM)
        try:
            return child.process.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child (servers first), wait up to ``timeout`` s, then SIGKILL their process groups."""
        children = [*self.servers, *([self.bootstrap] if self.bootstrap else [])]
        for child in children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.0, deadline - time.monotonic()))
        for child in children:  # whatever is left of each group, p2pd included
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(5)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_local_swarm(
    model: str | Path,
    servers: int,
    peers_file: str | Path,
    settings: Optional[ServerSettings] = None,
    *,
    replicas: int = 1,
    log_dir: Optional[str | Path] = None,
    ready_timeout: float = 600.0,
    share_cores: bool = True,
) -> None:
    """Run a :class:`LocalSwarm`; write ``peers_file`` once every block is online; stop all on SIGINT/SIGTERM.

    ``peers_file`` lists the bootstrap peer and every server, so that clients can still join once the
    bootstrap peer is gone: its death is logged, and the swarm goes on. Stops (with an error) if a server dies.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    swarm = LocalSwarm(model, servers, replicas, settings=settings, log_dir=log_dir, share_cores=share_cores)
    try:
        try:
            swarm.start(timeout=ready_timeout, interrupt=stop)
        except InterruptedError:
            return
        write_peers_file(peers_file, swarm.initial_peers)
        logger.info(f"swarm ready: {len(swarm.servers)} servers, peers in {peers_file}, logs in {swarm.log_dir}")
        while not stop.wait(0.5):
            dead = swarm.dead_children()
            if swarm.bootstrap in dead:
                logger.warning(f"the bootstrap peer exited; clients join through the servers in {peers_file}")
                swarm.bootstrap.expected_exit = True  # the swarm goes on without it
                dead.remove(swarm.bootstrap)
            if dead:
                raise RuntimeError(f"{dead[0].name} exited unexpectedly; log {dead[0].log_path}:\n{dead[0].log_tail()}")
    finally:
        swarm.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
