"""Load on a swarm: many prompt-tuning clients training at once, measured (throughput, fairness, server memory).

Example::

    from ptune_search.swarm_load import LoadShape, run_load

    with LocalSwarm(path, servers=2) as swarm:
        report = run_load(path, swarm, LoadShape(clients=8, duration_s=60))
    print(report.aggregate_tokens_per_s, report.fairness, report.client_exceptions)
"""

from ptune_search.swarm_load.client import ClientResult
from ptune_search.swarm_load.memory import MemoryTrace
from ptune_search.swarm_load.report import LoadReport
from ptune_search.swarm_load.runner import run_load
from ptune_search.swarm_load.shape import LoadShape, make_load_model

__all__ = ["ClientResult", "LoadReport", "LoadShape", "MemoryTrace", "make_load_model", "run_load"]
