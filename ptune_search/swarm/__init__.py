"""The swarm: frozen transformer blocks served by block servers over hivemind, and the clients that use them.

- :class:`RemoteBlockChain` (client): the model's blocks as a module/autograd function over the swarm.
- :class:`BlockServer` (server): serves a span of blocks of one checkpoint.
- :func:`run_bootstrap_peer`, :func:`run_block_server`, :func:`run_local_swarm`, :class:`LocalSwarm`: launchers.

Heavy modules are imported lazily, so ``import ptune_search.swarm`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "RemoteBlockChain": "ptune_search.swarm.client",
    "ClientSettings": "ptune_search.swarm.client",
    "BlockServer": "ptune_search.swarm.server",
    "ServerSettings": "ptune_search.swarm.server",
    "MissingBlockError": "ptune_search.swarm.routing",
    "SwarmRequestError": "ptune_search.swarm.chain_passes",
    "RequestRefused": "ptune_search.swarm.protocol",
    "RequestLimits": "ptune_search.swarm.protocol",
    "LocalSwarm": "ptune_search.swarm.launcher",
    "run_bootstrap_peer": "ptune_search.swarm.launcher",
    "run_block_server": "ptune_search.swarm.launcher",
    "run_local_swarm": "ptune_search.swarm.launcher",
}

if TYPE_CHECKING:
    from ptune_search.swarm.chain_passes import SwarmRequestError
    from ptune_search.swarm.client import ClientSettings, RemoteBlockChain
    from ptune_search.swarm.launcher import LocalSwarm, run_block_server, run_bootstrap_peer, run_local_swarm
    from ptune_search.swarm.protocol import RequestLimits, RequestRefused
    from ptune_search.swarm.routing import MissingBlockError
    from ptune_search.swarm.server import BlockServer, ServerSettings

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
