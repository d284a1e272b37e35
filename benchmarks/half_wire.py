"""What 16-bit hidden states on the wire (``ClientSettings.wire_dtype``) do to training and to a step's time.

The same classifier (SmolLM2-135M, BBC News, ``ptune``) is trained from the same initial prompts and head on
the same batches through one 2-server swarm with float32, float16 and bfloat16 on the wire, in turns per step
so that load from elsewhere hits all alike. Prints one JSON line per wire dtype (losses, validation loss and
accuracy, median step time) and a summary with the largest loss difference from float32::

    {"benchmark": "half_wire", "wire_dtype": "float16", "losses": [...], "val_accuracy": 0.4, ...}
    {"benchmark": "half_wire_summary", "max_loss_difference": {"float16": 1e-4, "bfloat16": 2e-3}, ...}

Run: ``python -m benchmarks.half_wire [--model smollm2-135m] [--steps 10] [--validation-size 40]``
(``tests/test_benchmarks.py`` runs it on ``--model tiny-llama`` for 2 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
from transformers import AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.models.ptune import PTuneConfig
from ptune_search.pretrained import resolve_model
from ptune_search.search.trial import build_classifier
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.training.steps import evaluate, train_step, trainable_parameters

WIRE_DTYPES = (None, "float16", "bfloat16")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--validation-size", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    path = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = load_task(TaskSpec(), tokenizer, 64, 400, args.validation_size, 0)
    with LocalSwarm(path, servers=2) as swarm:
        runs = {}
        for wire in WIRE_DTYPES:
            torch.manual_seed(0)  # the same initial prompts and head for every wire dtype
            client = ClientConfig(initial_peers=swarm.initial_peers, request_timeout=300.0, wire_dtype=wire)
            model = build_classifier(path, task.num_labels, tokenizer.pad_token_id, PTuneConfig(16, "ptune"), client)
            optimizer = torch.optim.AdamW(trainable_parameters(model), lr=args.lr)
            runs[wire] = (model, optimizer, task.train_batches(8, 0), [], [])
        for _ in range(args.steps):
            for model, optimizer, batches, losses, times in runs.values():
                result = train_step(model, optimizer, next(batches))
                losses.append(result.loss)
                times.append(result.seconds)
        reference = runs[None][3]
        differences = {}
        for wire, (model, _, _, losses, times) in runs.items():
            evaluation = evaluate(model, task.validation, 8)
            name = wire or "float32"
            differences[name] = max(abs(a - b) for a, b in zip(losses, reference))
            print(
                json.dumps(
                    {
                        "benchmark": "half_wire",
                        "wire_dtype": name,
                        "losses": [round(loss, 5) for loss in losses],
                        "val_loss": round(evaluation.loss, 5),
                        "val_accuracy": evaluation.accuracy,
                        "median_step_s": round(statistics.median(times), 3),
                    }
                ),
                flush=True,
            )
            model.model.layers.close()
    summary = {
        "benchmark": "half_wire_summary",
        "model": args.model,
        "steps": args.steps,
        "max_loss_difference": differences,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
