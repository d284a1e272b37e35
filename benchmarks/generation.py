"""Tokens/s of greedy generation through the swarm, with and without inference sessions, against local blocks.

On SmolLM2-135M (30 blocks) with a swarm of 2 block servers (15 blocks each) on 127.0.0.1: ``--new-tokens``
(128) greedy tokens after ``--input-tokens`` (64) random token ids, at each batch size of ``--batches``
(1 and 8), three ways, taken in turns (session, no_cache, local, session, ...) so that load from other
processes hits all alike:

- ``session``: ``model.generate`` through the swarm; each server keeps the session's attention caches, so
  a step sends only the new token's hidden states;
- ``no_cache``: through the swarm without a session, as a forward-only swarm would have to: the whole
  sequence so far goes through the remote chain's forward for every new token (only the last position
  goes through the LM head);
- ``local``: Hugging Face's ``generate`` with its KV cache on the same weights, all blocks in this process.

Each swarm record also says where a step's time went: ``servers_compute_ms_per_step`` (the servers' compute
threads, summed over the servers, from their info RPC), ``servers_core_wait_ms_per_step`` (their wait for
the machine's cores) and ``rest_ms_per_step`` (the client's embeddings and LM head, RPCs, serialization,
queues).

Then, with ``--sessions`` (16) concurrent sessions of batch ``--sessions-batch`` opened on the swarm from
threads of this process, the resident memory (RSS) of each server process is sampled: its growth is set
against the bytes its sessions reserve and the server's stated budget (``--server-budget-mib``, its
``inflight_bytes``: a server refuses a session that does not fit as busy, the client retries later). The
default budget, 256 MiB, is below what 16 sessions of batch 8 x 192 positions need on SmolLM2's 15 blocks
(540 MiB), so it binds.

Prints JSON lines, one per measurement; the last is the summary::

    {"benchmark": "generation", "way": "session", "batch": 1, "tokens_per_s": 25.1, "load_avg_1m": [..], ...}
    {"benchmark": "generation_sessions_memory", "sessions": 16, "servers": [{"rss_growth_mib": ..}, ..], ...}
    {"benchmark": "generation_summary", "session_over_local": {"1": 0.8, "8": 0.95},
     "session_over_no_cache": {"1": 3.1, "8": 9.0}, "same_tokens": {"1": true, "8": true}, ...}

Run from the repository root: ``python -m benchmarks.generation [--model smollm2-135m] [--rounds 2]``
(``tests/test_benchmarks.py`` runs it on ``--model tiny-llama`` with a few tokens, one round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from ptune_search.models.registry import AutoDistributedModelForCausalLM
from ptune_search.pretrained import resolve_model
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import BlockService, unpack_metadata
from ptune_search.swarm.server.settings import ServerSettings

WAYS = ("session", "no_cache", "local")
WARMUP_TOKENS = 2
MIB = 1024**2


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def make_inputs(batch: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, length]``, none of them padding: every row is generated alike."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 32000), (batch, length), generator=generator)


class Generators:
    """The three ways to generate greedily, each ``way(input_ids, new_tokens) -> new tokens [B, new_tokens]``."""

    def __init__(self, path: Path, initial_peers: Sequence[str]):
        self.remote = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=list(initial_peers), eos_token_id=None, request_timeout=120.0
        ).eval()
        self.local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.local.generation_config.eos_token_id = None  # every row generates all its tokens, as remotely

    @property
    def vocab_size(self) -> int:
        return self.remote.config.vocab_size

    def way(self, name: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
        return {"session": self.session, "no_cache": self.no_cache, "local": self.hugging_face}[name]

    def session(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self.remote.generate(input_ids, max_new_tokens=new_tokens)[:, input_ids.shape[1] :]

    @torch.no_grad()
    def no_cache(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        ids = input_ids
        for _ in range(new_tokens):
            hidden = self.remote.model(ids).last_hidden_state[:, -1]  # the whole sequence, every time
            ids = torch.cat([ids, self.remote.lm_head(hidden).argmax(dim=-1, keepdim=True)], dim=1)
        return ids[:, input_ids.shape[1] :]

    @torch.no_grad()
    def hugging_face(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        out = self.local.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return out[:, input_ids.shape[1] :]

    def close(self) -> None:
        self.remote.close()


def server_info(model: Any, peer_id: str) -> dict[str, Any]:
    """What a server's info RPC says (its compute queue's stats, its sessions, ...)."""
    connection = model.model.layers.connection

    async def ask() -> dict[str, Any]:
        stub = BlockService.get_stub(connection.p2p, PeerID.from_base58(peer_id))
        return unpack_metadata((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=30)).metadata)

    return connection.run(ask(), timeout=60)


def servers_compute(model: Any, peer_ids: Sequence[str]) -> dict[str, float]:
    """Seconds the servers' compute threads spent computing and waiting for cores, summed over the servers."""
    stats = [server_info(model, peer_id)["compute"] for peer_id in peer_ids]
    return {key: sum(stat[key] for stat in stats) for key in ("compute_s", "lock_wait_s")}


def measure(
    generators: Generators, way: str, input_ids: torch.Tensor, new_tokens: int, peer_ids: Sequence[str]
) -> tuple[dict, torch.Tensor]:
    """One generation, timed; for the swarm ways, with where a step's time went: the servers' computing, their
    wait for cores, and the rest (the client's embeddings and LM head, RPCs, serialization, queues)."""
    remote = way != "local"
    before = servers_compute(generators.remote, peer_ids) if remote else {}
    load_before = load_avg()
    started = time.perf_counter()
    tokens = generators.way(way)(input_ids, new_tokens)
    elapsed = time.perf_counter() - started
    batch = input_ids.shape[0]
    record = {
        "benchmark": "generation",
        "way": way,
        "batch": batch,
        "input_tokens": input_ids.shape[1],
        "new_tokens": tokens.shape[1],
        "wall_s": round(elapsed, 3),
        "tokens_per_s": round(batch * tokens.shape[1] / elapsed, 2),
        "ms_per_step": round(1000 * elapsed / tokens.shape[1], 1),
        "load_avg_1m": [load_before, load_avg()],
    }
    if remote:
        after = servers_compute(generators.remote, peer_ids)
        steps = tokens.shape[1]
        compute, lock_wait = (1000 * (after[key] - before[key]) / steps for key in ("compute_s", "lock_wait_s"))
        record["servers_compute_ms_per_step"] = round(compute, 1)
        record["servers_core_wait_ms_per_step"] = round(lock_wait, 1)
        record["rest_ms_per_step"] = round(record["ms_per_step"] - compute - lock_wait, 1)
    return record, tokens


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def server_sessions(model: Any, peer_id: str) -> dict[str, Any]:
    """The ``sessions`` part of a server's info (open sessions, reserved and allocated cache bytes, endings)."""
    return server_info(model, peer_id)["sessions"]


class MemorySampler:
    """Samples the RSS of the server processes and the bytes their sessions allocate, in a thread (the servers
    keep the peaks of open sessions and reserved bytes themselves)."""

    def __init__(self, model: Any, servers: list[tuple[int, str]], period: float = 0.2):
        self.model, self.servers, self.period = model, servers, period
        self.peak_rss = {pid: rss_bytes(pid) for pid, _ in servers}
        self.peak_allocated = {pid: 0 for pid, _ in servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for pid, peer_id in self.servers:
                self.peak_rss[pid] = max(self.peak_rss[pid], rss_bytes(pid))
                sessions = server_sessions(self.model, peer_id)
                self.peak_allocated[pid] = max(self.peak_allocated[pid], sessions["allocated_bytes"])


def concurrent_sessions_memory(
    generators: Generators, swarm: LocalSwarm, sessions: int, batch: int, input_tokens: int, new_tokens: int
) -> dict:
    """``sessions`` generations at once, each in its own thread and session, while the servers' RSS is sampled."""
    model = generators.remote
    servers = [(server.pid, server.peer_id) for server in swarm.servers]
    rss_before = {pid: rss_bytes(pid) for pid, _ in servers}
    errors: list[BaseException] = []

    def generate(seed: int) -> None:
        try:
            model.generate(make_inputs(batch, input_tokens, generators.vocab_size, seed), max_new_tokens=new_tokens)
        except BaseException as e:  # reported below: a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=generate, args=(seed,)) for seed in range(sessions)]
    load_before = load_avg()
    started = time.perf_counter()
    with MemorySampler(model, servers) as sampler:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {sessions} concurrent generations failed: {errors[0]!r}")
    budget = swarm.settings.inflight_budget_bytes
    figures = []
    for pid, peer_id in servers:
        growth = sampler.peak_rss[pid] - rss_before[pid]
        sessions_after = server_sessions(model, peer_id)
        figures.append(
            {
                "pid": pid,
                "rss_before_mib": round(rss_before[pid] / MIB, 1),
                "peak_rss_mib": round(sampler.peak_rss[pid] / MIB, 1),
                "rss_growth_mib": round(growth / MIB, 1),
                "peak_open_sessions": sessions_after["peak_open"],
                "peak_reserved_mib": round(sessions_after["peak_reserved_bytes"] / MIB, 1),
                "peak_allocated_mib": round(sampler.peak_allocated[pid] / MIB, 1),
                "growth_within_budget": growth <= budget,
                "ended": sessions_after["ended"],
            }
        )
    stats = model.model.layers.passes.stats
    return {
        "benchmark": "generation_sessions_memory",
        "sessions": sessions,
        "batch": batch,
        "max_length": input_tokens + new_tokens,
        "budget_mib": round(budget / MIB, 1),
        "wall_s": round(elapsed, 2),
        "tokens_per_s": round(sessions * batch * new_tokens / elapsed, 2),
        "busy_refusals": stats["busy_refusals"],
        "servers": figures,
        "load_avg_1m": [load_before, load_avg()],
    }


def summary(records: list[dict], tokens: dict[tuple[str, int], list[torch.Tensor]], batches: Sequence[int]) -> dict:
    rates = {
        (way, batch): statistics.median(
            record["tokens_per_s"] for record in records if (record["way"], record["batch"]) == (way, batch)
        )
        for way, batch in tokens
    }

    def ratio(way: str, other: str) -> dict[str, float]:
        return {
            str(batch): round(rates[way, batch] / rates[other, batch], 3)
            for batch in batches
            if (way, batch) in rates and (other, batch) in rates
        }

    def same(batch: int) -> bool:
        runs = [run for (way, b), way_runs in tokens.items() if b == batch for run in way_runs]
        return all(torch.equal(run, runs[0]) for run in runs)

    return {
        "benchmark": "generation_summary",
        "median_tokens_per_s": {f"{way}/{batch}": round(rate, 2) for (way, batch), rate in rates.items()},
        "session_over_local": ratio("session", "local"),
        "session_over_no_cache": ratio("session", "no_cache"),
        "same_tokens": {str(batch): same(batch) for batch in batches},
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": load_avg(),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model alias or checkpoint folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--rounds", type=int, default=2, help="measure every way and batch this many times, in turns")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent sessions for the memory check (0: none)")
    parser.add_argument("--sessions-batch", type=int, default=8, help="batch size of each concurrent session")
    parser.add_argument(
        "--server-budget-mib", type=int, default=256, help="each server's memory budget (its inflight_bytes)"
    )
    parser.add_argument("--server-threads", type=int, help="torch threads per server (default: torch's)")
    args = parser.parse_args(argv)
    path = resolve_model(args.model)
    settings = ServerSettings(num_threads=args.server_threads, inflight_bytes=args.server_budget_mib * MIB)
    with LocalSwarm(path, servers=2, settings=settings) as swarm:
        generators = Generators(path, swarm.initial_peers)
        try:
            inputs = {batch: make_inputs(batch, args.input_tokens, generators.vocab_size) for batch in args.batches}
            for batch in args.batches:
                for way in args.ways:
                    generators.way(way)(inputs[batch], WARMUP_TOKENS)
            records: list[dict] = []
            tokens: dict[tuple[str, int], list[torch.Tensor]] = {}
            peer_ids = [server.peer_id for server in swarm.servers]
            for _ in range(args.rounds):
                for batch in args.batches:
                    for way in args.ways:
                        record, new = measure(generators, way, inputs[batch], args.new_tokens, peer_ids)
                        records.append(record)
                        tokens.setdefault((way, batch), []).append(new)
                        emit(record)
            if args.sessions:
                emit(
                    concurrent_sessions_memory(
                        generators, swarm, args.sessions, args.sessions_batch, args.input_tokens, args.new_tokens
                    )
                )
            emit(summary(records, tokens, args.batches))
        finally:
            generators.close()


if __name__ == "__main__":
    sys.exit(main())
