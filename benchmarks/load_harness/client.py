"""One load client: a process that trains prompts through the swarm until a deadline and reports what it did.

Forked by :mod:`benchmarks.load_harness.launcher`, :func:`run_client` builds a sequence classifier whose
blocks run on the swarm, takes the warm-up steps, writes ``ready_path``, waits for ``go_path`` to hold the
deadline (epoch seconds), trains on one fixed batch until then, and writes a :class:`ClientResult` as JSON to
``result_path``, also when it fails. Every exception is counted, kept in the result and printed with its
traceback to the client's log: a load client never fails quietly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

KEPT_ERRORS = 5  # error messages kept in a result; all are counted
MAX_CONSECUTIVE_FAILURES = 3  # a client that fails this many steps in a row stops


@dataclasses.dataclass
class ClientSpec:
    """What one client trains, and where it talks to the runner."""

    client: int
    model: str
    initial_peers: list[str]
    tuning_mode: str
    pre_seq_len: int
    batch: int
    length: int
    num_labels: int
    warmup_steps: int
    threads: int
    ready_path: str
    go_path: str
    result_path: str
    log_path: str
    go_timeout_s: float  # how long a ready client waits for the deadline before giving up


@dataclasses.dataclass
class ClientResult:
    """Measured steps of one client; ``chain_stats`` are the swarm client's retry counters (ChainPasses.stats)."""

    client: int
    tuning_mode: str
    pid: int = 0
    steps: int = 0
    tokens_per_step: int = 0
    started_at: float = 0.0  # epoch seconds of the first measured step
    ended_at: float = 0.0  # epoch seconds when the last measured step finished
    max_step_s: float = 0.0
    chain_stats: dict[str, int] = dataclasses.field(default_factory=dict)
    exceptions: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def elapsed_s(self) -> float:
        return max(self.ended_at - self.started_at, 0.0)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def record_exception(self, error: BaseException) -> None:
        self.exceptions += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append(f"{type(error).__name__}: {error}")
        print(f"load client {self.client}: exception {self.exceptions}", file=sys.stderr, flush=True)
        traceback.print_exception(error, file=sys.stderr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ClientResult":
        return cls(**values)


class PromptTraining:
    """AdamW steps of a swarm classifier's prompts and head on one fixed random batch."""

    def __init__(self, spec: ClientSpec):
        from ptune_search.models.registry import AutoDistributedModelForSequenceClassification

        self.model = AutoDistributedModelForSequenceClassification.from_pretrained(
            spec.model,
            initial_peers=spec.initial_peers,
            num_labels=spec.num_labels,
            tuning_mode=spec.tuning_mode,
            pre_seq_len=spec.pre_seq_len,
        )
        generator = torch.Generator().manual_seed(spec.client)
        self.batch = {
            "input_ids": torch.randint(0, self.model.config.vocab_size, (spec.batch, spec.length), generator=generator),
            "attention_mask": torch.ones(spec.batch, spec.length, dtype=torch.long),
            "labels": torch.randint(0, spec.num_labels, (spec.batch,), generator=generator),
        }
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.model(**self.batch).loss.backward()
        self.optimizer.step()

    @property
    def chain_stats(self) -> dict[str, int]:
        return dict(self.model.model.layers.passes.stats)

    def close(self) -> None:
        self.model.close()


def wait_for_deadline(go_path: Path, timeout: float) -> float:
    give_up = time.monotonic() + timeout
    while not go_path.exists():
        if time.monotonic() > give_up:
            raise TimeoutError(f"no deadline in {go_path} within {timeout:.0f} s of the warm-up")
        time.sleep(0.05)
    return float(go_path.read_text())


def train_until_deadline(spec: ClientSpec, result: ClientResult) -> None:
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.client)
    training = PromptTraining(spec)
    try:
        for _ in range(spec.warmup_steps):
            training.step()
        Path(spec.ready_path).write_text("ready\n")
        deadline = wait_for_deadline(Path(spec.go_path), spec.go_timeout_s)
        result.started_at = result.ended_at = time.time()
        consecutive_failures = 0
        while time.time() < deadline and consecutive_failures < MAX_CONSECUTIVE_FAILURES:
            step_started = time.perf_counter()
            try:
                training.step()
            except Exception as e:  # noqa: BLE001 - counted and reported, the load goes on
                result.record_exception(e)
                consecutive_failures += 1
                continue
            consecutive_failures = 0
            result.steps += 1
            result.ended_at = time.time()
            result.max_step_s = max(result.max_step_s, time.perf_counter() - step_started)
    finally:
        result.chain_stats = training.chain_stats
        training.close()


def write_result(spec: ClientSpec, result: ClientResult) -> None:
    staging = Path(f"{spec.result_path}.tmp")
    staging.write_text(json.dumps(result.to_dict()))
    os.replace(staging, spec.result_path)


def run_client(spec: ClientSpec) -> int:
    """Train as ``spec`` says and write the result; the exit code is 1 if anything raised."""
    result = ClientResult(spec.client, spec.tuning_mode, pid=os.getpid(), tokens_per_step=spec.batch * spec.length)
    try:
        train_until_deadline(spec, result)
    except BaseException as e:  # noqa: BLE001 - reported in the result, then the process fails
        result.record_exception(e)
    finally:
        write_result(spec, result)
    return 1 if result.exceptions else 0
