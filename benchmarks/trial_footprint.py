"""Memory and start-up of a trial client (remote blocks) next to a process holding the whole model.

Each measured process is a fresh interpreter that builds the SmolLM2-135M classifier the way a trial does
(``ptune_search.search.trial.build_classifier``), runs one training step (batch 8 x 64 tokens, pre_seq_len 16) and
reports its peak RSS and the time from interpreter start to the end of that step. Prints JSON lines; the last
holds the client's figures over the whole model's.

    python -m benchmarks.trial_footprint [--model smollm2-135m] [--servers 2]

``tests/test_benchmarks.py`` runs it on ``--model tiny-llama --servers 1``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from ptune_search.models.ptune import PTuneConfig
from ptune_search.pretrained import resolve_model
from ptune_search.search.trial import build_classifier
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.training.steps import train_step, trainable_parameters

REPO = Path(__file__).resolve().parents[1]


def measure(model: str, initial_peers: list[str]) -> dict:
    """Runs inside the measured process."""
    torch.manual_seed(0)
    swarm = ClientConfig(initial_peers=initial_peers) if initial_peers else None
    classifier = build_classifier(model, 5, 2, PTuneConfig(16, "ptune"), swarm)
    optimizer = torch.optim.AdamW(trainable_parameters(classifier), lr=1e-3)
    batch = {
        "input_ids": torch.randint(0, classifier.config.vocab_size, (8, 64)),
        "attention_mask": torch.ones(8, 64, dtype=torch.long),
        "labels": torch.randint(0, 5, (8,)),
    }
    train_step(classifier, optimizer, batch)
    first_step_s = time.time() - psutil.Process().create_time()  # from the interpreter's start, imports included
    parameters = sum(p.numel() for p in classifier.parameters())
    classifier.close()
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "start_to_first_step_s": first_step_s,
        "parameters_in_process": parameters,
    }


def run_measured_process(model: str, initial_peers: list[str]) -> dict:
    args = [sys.executable, "-m", "benchmarks.trial_footprint", "--measure", "--model", model]
    completed = subprocess.run([*args, "--initial-peers", *initial_peers], capture_output=True, text=True, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"the measured process failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.model, args.initial_peers)))
        return

    model = str(resolve_model(args.model))
    whole = {"benchmark": "trial_footprint", "process": "whole model (local blocks)", **run_measured_process(model, [])}
    print(json.dumps(whole), flush=True)
    with LocalSwarm(model, servers=args.servers) as swarm:
        client = {
            "benchmark": "trial_footprint",
            "process": f"trial client ({args.servers}-server swarm)",
            **run_measured_process(model, swarm.initial_peers),
        }
    print(json.dumps(client), flush=True)
    print(
        json.dumps(
            {
                "benchmark": "trial_footprint_summary",
                "model": args.model,
                "rss_ratio_client_over_whole": client["peak_rss_mib"] / whole["peak_rss_mib"],
                "first_step_ratio_client_over_whole": client["start_to_first_step_s"] / whole["start_to_first_step_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
