"""``python -m ptune_search.swarm dht|serve|local ...``: the swarm's processes, for launchers and the CLI."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
from typing import Optional, Sequence

from ptune_search.swarm.launcher import (
    PARENT_PID_ENV,
    PER_SERVER_SETTINGS,
    read_peers_file,
    run_block_server,
    run_bootstrap_peer,
    run_local_swarm,
)
from ptune_search.swarm.server.settings import ListenAddress, ServerSettings
from ptune_search.swarm.setting_flags import add_setting_flags, settings_from_flags

PR_SET_PDEATHSIG = 1


def add_swarm_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``dht``, ``serve`` and ``local`` subcommands (shared with the ``ptune-search swarm`` CLI).

    The server's flags are those of :class:`ServerSettings`, where each is declared with its default and help.
    """
    dht = subparsers.add_parser("dht", help="run a bootstrap peer that writes its multiaddrs to a file")
    dht.add_argument("--peers-file", help="write the peer's multiaddrs here, one a line")
    add_setting_flags(dht, ListenAddress)

    serve = subparsers.add_parser("serve", help="serve blocks A..B-1 of a model to the swarm")
    serve.add_argument("--model", required=True, help="folder of a Hugging Face checkpoint (safetensors)")
    serve.add_argument("--blocks", required=True, help="START:END, e.g. 0:15 serves blocks 0..14")
    peers = serve.add_mutually_exclusive_group(required=True)
    peers.add_argument("--initial-peers", nargs="+", help="multiaddrs of a bootstrap peer")
    peers.add_argument("--peers-file", help="file with the bootstrap multiaddrs, one a line (waits for it)")
    serve.add_argument("--info-file", help="once online, write the server's peer id and addresses here (JSON)")
    add_setting_flags(serve, ServerSettings)

    local = subparsers.add_parser("local", help="a bootstrap peer plus N block servers on 127.0.0.1")
    local.add_argument("--model", required=True)
    local.add_argument("--servers", type=int, required=True, help="number of block servers in total")
    local.add_argument("--replicas", type=int, default=1, help="servers per span (divides --servers)")
    local.add_argument("--peers-file", required=True, help="written once every block is online")
    local.add_argument("--log-dir", help="server logs (default: a new temporary folder)")
    local.add_argument(
        "--no-share-cores",
        dest="share_cores",
        action="store_false",
        help="let the servers use all cores each, at the same time (by default they share this machine's cores)",
    )
    add_setting_flags(local, ServerSettings, exclude=PER_SERVER_SETTINGS)


def run_swarm_command(args: argparse.Namespace) -> None:
    if args.command in ("serve", "local"):
        from ptune_search.models.registry import check_supported

        check_supported(args.model)  # an unsupported model is refused before any peer or server starts
    if args.command == "dht":
        run_bootstrap_peer(args.peers_file, settings_from_flags(ListenAddress(), args))
    elif args.command == "serve":
        run_block_server(
            args.model,
            args.blocks,
            args.initial_peers or wait_for_peers_file(args.peers_file),
            settings_from_flags(ServerSettings(), args),
            info_file=args.info_file,
        )
    elif args.command == "local":
        run_local_swarm(
            args.model,
            args.servers,
            args.peers_file,
            settings_from_flags(ServerSettings(), args),
            replicas=args.replicas,
            log_dir=args.log_dir,
            share_cores=args.share_cores,
        )
    else:
        raise ValueError(f"unknown swarm command {args.command!r}")


def wait_for_peers_file(path: str, timeout: float = 120.0) -> list[str]:
    """The multiaddrs in ``path``, waiting for a bootstrap peer started alongside to write it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no peers file {path} after {timeout}s: is the bootstrap peer running?")
        time.sleep(0.1)
    return read_peers_file(path)


def _die_with_parent() -> None:
    """When started by a LocalSwarm, get SIGTERM (a clean shutdown) if the launcher dies."""
    expected_parent = os.environ.pop(PARENT_PID_ENV, None)
    if expected_parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != int(expected_parent):  # the launcher died before prctl took effect
        sys.exit(1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ptune_search.swarm", description=__doc__)
    add_swarm_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _die_with_parent()
    run_swarm_command(args)


if __name__ == "__main__":
    main()
