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
    read_peers_file,
    run_block_server,
    run_bootstrap_peer,
    run_local_swarm,
)

PR_SET_PDEATHSIG = 1


def add_swarm_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``dht``, ``serve`` and ``local`` subcommands (shared with the ``ptune-search swarm`` CLI)."""
    dht = subparsers.add_parser("dht", help="run a bootstrap peer that writes its multiaddrs to a file")
    dht.add_argument("--peers-file", help="write the peer's multiaddrs here, one a line")
    dht.add_argument("--host", default="127.0.0.1")
    dht.add_argument("--port", type=int, default=0)

    serve = subparsers.add_parser("serve", help="serve blocks A..B-1 of a model to the swarm")
    serve.add_argument("--model", required=True, help="folder of a Hugging Face checkpoint (safetensors)")
    serve.add_argument("--blocks", required=True, help="START:END, e.g. 0:15 serves blocks 0..14")
    peers = serve.add_mutually_exclusive_group(required=True)
    peers.add_argument("--initial-peers", nargs="+", help="multiaddrs of a bootstrap peer")
    peers.add_argument("--peers-file", help="file with the bootstrap multiaddrs, one a line (waits for it)")
    _add_server_options(serve)
    serve.add_argument("--max-tokens", type=int, help="largest batch * length accepted")
    serve.add_argument("--max-payload-bytes", type=int, help="largest request payload accepted")
    serve.add_argument("--receive-timeout", type=float, help="seconds a streamed request may take to arrive (60)")
    serve.add_argument("--cache-bytes", type=int, help="memory for forward graphs kept for backward")
    serve.add_argument(
        "--max-inflight-bytes",
        type=int,
        help="requests in flight and kept graphs together; beyond it requests are refused as busy (4 GiB)",
    )
    serve.add_argument("--max-inflight-tokens", type=int, help="tokens of the requests in flight together (262144)")
    serve.add_argument(
        "--cache-max-age", type=float, help="seconds a forward graph waits for its backward before it is freed (600)"
    )
    serve.add_argument(
        "--merge-max-tokens",
        type=int,
        help="largest batch (rows x length) of concurrent clients' requests run as one; 0: never merge (8192)",
    )
    serve.add_argument(
        "--merge-wait", type=float, help="seconds a batch may wait for other active clients' requests (0.02)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--info-file", help="once online, write the server's peer id and addresses here (JSON)")
    serve.add_argument(
        "--identity-file",
        help="the server's key (libp2p identity, created if absent): a peer id that survives restarts",
    )
    serve.add_argument(
        "--compute-lock", help="lock-file prefix shared by the servers of this machine: they share its cores"
    )

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
    _add_server_options(local)


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dht-prefix", help="model name in the DHT (default: the model folder's name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num-threads", type=int, help="torch threads per server")
    parser.add_argument("--record-ttl", type=float, default=60.0, help="seconds a server's DHT records live")
    parser.add_argument("--refresh-period", type=float, help="seconds between refreshes (default: ttl / 3)")


def run_swarm_command(args: argparse.Namespace) -> None:
    if args.command in ("serve", "local"):
        from ptune_search.models.registry import check_supported

        check_supported(args.model)  # an unsupported model is refused before any peer or server starts
    if args.command == "dht":
        run_bootstrap_peer(args.peers_file, host=args.host, port=args.port)
    elif args.command == "serve":
        run_block_server(
            args.model,
            args.blocks,
            args.initial_peers or wait_for_peers_file(args.peers_file),
            dht_prefix=args.dht_prefix,
            dtype=args.dtype,
            num_threads=args.num_threads,
            record_ttl=args.record_ttl,
            refresh_period=args.refresh_period,
            max_tokens=args.max_tokens,
            max_payload_bytes=args.max_payload_bytes,
            receive_timeout=args.receive_timeout,
            cache_bytes=args.cache_bytes,
            cache_max_age=args.cache_max_age,
            max_inflight_bytes=args.max_inflight_bytes,
            max_inflight_tokens=args.max_inflight_tokens,
            merge_max_tokens=args.merge_max_tokens,
            merge_wait=args.merge_wait,
            host=args.host,
            port=args.port,
            info_file=args.info_file,
            compute_lock=args.compute_lock,
            identity_file=args.identity_file,
        )
    elif args.command == "local":
        server_args = ["--record-ttl", str(args.record_ttl)]
        if args.refresh_period:
            server_args += ["--refresh-period", str(args.refresh_period)]
        run_local_swarm(
            args.model,
            args.servers,
            args.peers_file,
            replicas=args.replicas,
            dht_prefix=args.dht_prefix,
            dtype=args.dtype,
            num_threads=args.num_threads,
            server_args=server_args,
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
