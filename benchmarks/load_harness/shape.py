"""What a load is: how many clients train for how long, on which generated model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

LOAD_MODEL_HIDDEN, LOAD_MODEL_BLOCKS = 128, 8


def make_load_model(folder: Path) -> Path:
    """The generated Llama the load runs on: 8 blocks of hidden 128, so servers compute rather than only relay."""
    from ptune_search.tiny_llama import make_tiny_llama

    return make_tiny_llama(folder / "tiny-load", hidden_size=LOAD_MODEL_HIDDEN, num_layers=LOAD_MODEL_BLOCKS)


@dataclasses.dataclass
class LoadShape:
    """How many clients train for how long, and what each step is. Client ``i`` uses ``modes[i % len(modes)]``."""

    clients: int = 8
    duration_s: float = 600.0
    modes: tuple[str, ...] = ("ptune", "deep_ptune")
    batch: int = 8
    length: int = 64
    pre_seq_len: int = 16
    num_labels: int = 5
    warmup_steps: int = 2
    client_threads: int = 1
    sample_period_s: float = 1.0
    # The servers' RSS baseline is taken this long into the load: by then every client has had requests in
    # flight at once, so the working set of that concurrency (forward graphs kept for 8 backwards, buffers) is
    # in the baseline, and growth after it means memory that the load keeps taking.
    settle_s: float = 10.0
    ready_timeout_s: float = 600.0  # for all clients to start, join the swarm and finish their warm-up
    finish_timeout_s: float = 300.0  # after the deadline, for the steps still running
