"""How a swarm's servers share a model's blocks: ``servers // replicas`` spans, each served ``replicas`` times.

The rule lives here, apart from the launchers, so that the experiment config can check a layout without
importing them.
"""

from __future__ import annotations

from typing import Optional


def replica_layout_problem(servers: int, replicas: int) -> Optional[str]:
    """Why ``servers`` servers cannot serve every block ``replicas`` times, or None when they can."""
    if replicas >= 1 and servers >= 0 and servers % replicas == 0:
        return None
    return (
        f"servers must be a multiple of replicas (got servers={servers}, replicas={replicas}): "
        "the blocks are split into servers/replicas spans, each served by `replicas` servers"
    )


def split_blocks(num_blocks: int, spans: int) -> list[tuple[int, int]]:
    """``spans`` contiguous spans of near-equal length covering ``0..num_blocks-1``."""
    if not 1 <= spans <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {spans} spans")
    bounds = [round(i * num_blocks / spans) for i in range(spans + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
