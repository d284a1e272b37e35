"""How much a loopback swarm costs a prompt-tuning step, and what it serves to concurrent clients.

On SmolLM2-135M (30 blocks): one training step of a sequence classifier (batch 8, 64 tokens, pre_seq_len 16)
with local blocks in this process against the same step through a swarm of 2 block servers (15 blocks
each) on 127.0.0.1, for ``ptune`` and ``deep_ptune``, taken in turns (local, swarm, local, ...) so that load
from other processes hits both alike; then the aggregate tokens/s of 1, 2 and 4 client
processes training at once on one swarm, measured in turns over ``--rounds``. The servers share the
machine's cores (see ``ptune_search.swarm.server.host_cores``) unless ``--no-share-cores``. Prints JSON lines::

    {"benchmark": "swarm_step", "mode": "ptune", "local_median_s": 2.0, "swarm_median_s": 2.1, "ratio": 1.05, ...}
    {"benchmark": "swarm_throughput", "clients": 4, "tokens_per_s": 231.0, ...}
    {"benchmark": "swarm_throughput_summary", "median_tokens_per_s": {"1": 170.2, "2": ..., "4": ...}, ...}

Run: ``python -m benchmarks.swarm_step [--model smollm2-135m] [--steps 5] [--clients 1 2 4]``
(``tests/test_benchmarks.py`` runs it on ``--model tiny-llama`` with one step and one round).
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing
import os
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ptune_search.models.registry import AutoDistributedModelForSequenceClassification
from ptune_search.pretrained import resolve_model
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.server.settings import ServerSettings

BATCH, LENGTH, PRE_SEQ_LEN, NUM_LABELS = 8, 64, 16, 5
WARMUP_PAIRS = 2


def make_batch(seed: int, vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab_size, (BATCH, LENGTH), generator=generator),
        "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long),
        "labels": torch.randint(0, NUM_LABELS, (BATCH,), generator=generator),
    }


def build_model(path: Path, mode: str, initial_peers: Optional[Sequence[str]] = None):
    settings = dict(num_labels=NUM_LABELS, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN, request_timeout=120.0)
    if initial_peers:
        return AutoDistributedModelForSequenceClassification.from_pretrained(
            path, initial_peers=initial_peers, **settings
        )
    return AutoDistributedModelForSequenceClassification.from_pretrained(path, local_blocks=True, **settings)


class TimedTraining:
    """Training steps of one model on one batch, each timed (forward, backward, optimizer step)."""

    def __init__(self, model, batch: dict[str, torch.Tensor]):
        self.model, self.batch = model, batch
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(self) -> float:
        started = time.perf_counter()
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return time.perf_counter() - started


def compare_step(path: Path, mode: str, peers: list[str], steps: int) -> dict:
    """Local and swarm steps taken in turns, so that load from elsewhere on the machine hits both alike."""
    torch.manual_seed(0)
    local = build_model(path, mode)
    remote = build_model(path, mode, peers)
    with torch.no_grad():
        for name, parameter in local.named_parameters():
            if parameter.requires_grad:
                remote.get_parameter(name).copy_(parameter)
    batch = make_batch(0, local.config.vocab_size)
    trainings = {"local": TimedTraining(local, batch), "swarm": TimedTraining(remote, batch)}
    times: dict[str, list[float]] = {"local": [], "swarm": []}
    load_before = os.getloadavg()[0]
    for index in range(WARMUP_PAIRS + steps):
        for name, training in trainings.items():
            elapsed = training.step()
            if index >= WARMUP_PAIRS:
                times[name].append(elapsed)
    stats = dict(remote.model.layers.passes.stats)
    remote.close()
    local_median, swarm_median = statistics.median(times["local"]), statistics.median(times["swarm"])
    return {
        "benchmark": "swarm_step",
        "model": path.name,
        "mode": mode,
        "batch": BATCH,
        "tokens": LENGTH,
        "pre_seq_len": PRE_SEQ_LEN,
        "servers": 2,
        "steps": steps,
        "local_median_s": round(local_median, 3),
        "swarm_median_s": round(swarm_median, 3),
        "ratio": round(swarm_median / local_median, 3),
        "paired_ratio_median": round(
            statistics.median(swarm / local for swarm, local in zip(times["swarm"], times["local"])), 3
        ),
        "local_s": [round(t, 3) for t in times["local"]],
        "swarm_s": [round(t, 3) for t in times["swarm"]],
        "swarm_recomputes": stats["server_recomputes"],
        "failed_calls": stats["failed_calls"],
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def client_process(
    path: str, peers: list[str], mode: str, steps: int, seed: int, threads: int, barrier, results
) -> None:
    """One trial-like client: its own process, its own connection, its own prompts. Puts the start of its
    measured steps and the end of each on ``results``."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(Path(path), mode, peers)
    training = TimedTraining(model, make_batch(seed, model.config.vocab_size))
    training.step()
    barrier.wait()
    marks = [time.perf_counter()]
    for _ in range(steps):
        training.step()
        marks.append(time.perf_counter())
    results.put(marks)
    model.close()


def steps_done(marks: list[float], at: float) -> float:
    """Steps a client had done at time ``at``, the current one counted by the share of its time elapsed."""
    index = bisect.bisect_right(marks, at)
    if index == 0:
        return 0.0
    if index == len(marks):
        return float(len(marks) - 1)
    return index - 1 + (at - marks[index - 1]) / (marks[index] - marks[index - 1])


def throughput(path: Path, peers: list[str], clients: int, mode: str, steps: int, threads: int) -> dict:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(clients), context.Queue()
    processes = [
        context.Process(target=client_process, args=(str(path), peers, mode, steps, seed, threads, barrier, results))
        for seed in range(clients)
    ]
    for process in processes:
        process.start()
    marks: list[list[float]] = []
    try:
        while len(marks) < clients:
            try:
                marks.append(results.get(timeout=1.0))
            except queue.Empty:  # a client that died would leave the others waiting at the barrier for ever
                failed = [process.exitcode for process in processes if process.exitcode not in (None, 0)]
                if failed:
                    message = f"{len(failed)} of {clients} client processes failed (exit codes {failed})"
                    raise RuntimeError(message) from None
    finally:
        for process in processes:
            process.join(60 if len(marks) == clients else 0)
            if process.is_alive():
                process.terminate()
    step_tokens = BATCH * LENGTH
    first_to_last = max(m[-1] for m in marks) - min(m[0] for m in marks)
    # While all clients train: from the last one's first step to the first one's last. The ramps at both ends,
    # when fewer clients are in flight, would otherwise weigh more the fewer steps each client takes.
    window = (max(m[0] for m in marks), min(m[-1] for m in marks))
    wall = window[1] - window[0]
    tokens = clients * steps * step_tokens
    steady = sum(steps_done(m, window[1]) - steps_done(m, window[0]) for m in marks) * step_tokens
    return {
        "benchmark": "swarm_throughput",
        "mode": mode,
        "clients": clients,
        "steps_per_client": steps,
        "tokens": tokens,
        "wall_s": round(first_to_last, 3),
        "tokens_per_s": round(steady / wall, 1),  # all clients in flight
        "tokens_per_s_first_to_last": round(tokens / first_to_last, 1),  # with the ramps
        "client_threads": threads,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "window_perf_counter_s": window,  # all clients in flight, on this host's perf_counter
    }


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model alias or checkpoint folder")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per setting (after 2 warm-up steps)")
    parser.add_argument("--modes", nargs="+", default=["ptune", "deep_ptune"])
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 2, 4], help="concurrent client counts")
    parser.add_argument("--throughput-mode", default="ptune")
    parser.add_argument("--throughput-steps", type=int, default=4)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="measure every client count this many times, in turns (1, 2, 4, 1, 2, 4, ...)",
    )
    parser.add_argument(
        "--client-threads",
        type=int,
        default=1,
        help="torch threads of each client process (their own compute is small)",
    )
    parser.add_argument("--server-threads", type=int, help="torch threads per server (default: torch's)")
    parser.add_argument(
        "--no-share-cores",
        dest="share_cores",
        action="store_false",
        help="servers compute at the same time instead of taking turns on the cores",
    )
    args = parser.parse_args(argv)
    path = resolve_model(args.model)
    settings = ServerSettings(num_threads=args.server_threads)
    with LocalSwarm(path, servers=2, settings=settings, share_cores=args.share_cores) as swarm:
        for mode in args.modes:
            emit(compare_step(path, mode, swarm.initial_peers, args.steps))
        rates: dict[int, list[float]] = {clients: [] for clients in args.clients}
        for _ in range(args.rounds):
            for clients in args.clients:
                record = throughput(
                    path, swarm.initial_peers, clients, args.throughput_mode, args.throughput_steps, args.client_threads
                )
                rates[clients].append(record["tokens_per_s"])
                emit(record)
        if not rates:
            return
        medians = {clients: statistics.median(values) for clients, values in rates.items()}
        summary = {
            "benchmark": "swarm_throughput_summary",
            "mode": args.throughput_mode,
            "rounds": args.rounds,
            "median_tokens_per_s": {str(clients): round(rate, 1) for clients, rate in medians.items()},
        }
        if 1 in medians and max(medians) > 1:
            summary[f"ratio_{max(medians)}_to_1_clients"] = round(medians[max(medians)] / medians[1], 3)
        emit(summary)


if __name__ == "__main__":
    sys.exit(main())
