"""How a client reaches the swarm: every client setting, declared once with its default.

Each family's ``Distributed<Family>Config`` mixes this dataclass in, so
``from_pretrained(path, request_timeout=10.0)`` sets it like any other config field, and the swarm client
reads these fields from the config it is given. This module imports nothing heavy: the experiment
config takes its defaults from here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class ClientConfig:
    """Times are in seconds."""

    initial_peers: Optional[list[str]] = None  # multiaddrs of any peers of the swarm
    dht_prefix: Optional[str] = None  # default: the checkpoint folder's name (see protocol.model_prefix)
    request_timeout: float = 30.0  # one server's answer; then the request goes to another replica
    max_retries: int = 5  # failed attempts per block before a pass gives up
    block_wait_timeout: float = 30.0  # a block with no online server fails the pass after this long
    ban_timeout: float = 15.0  # a failing server is avoided this long (doubling with each failure, up to 8x)
    route_update_period: float = 30.0  # server records are re-read from the DHT this often
    backoff_base: float = 0.5  # the wait before a retry doubles from this ...
    backoff_max: float = 8.0  # ... up to this
    busy_timeout: float = 600.0  # servers may refuse a hop as busy this long (retries elsewhere or later)
    stream_threshold: int = 1024 * 1024  # payloads above this many bytes are streamed
    session_timeout: float = 300.0  # servers free an inference session's caches after this long without a step
    trusted_servers: Optional[list[str]] = None  # peer ids of the only servers to use; None: any signed server
    wire_dtype: Optional[str] = None  # "float16"/"bfloat16": hidden states travel in 16 bits (wire.HALF_WIRE_DTYPES)
