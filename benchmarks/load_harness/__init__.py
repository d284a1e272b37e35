"""Load on a swarm: many prompt-tuning clients training at once, measured (throughput, fairness, server memory).

Example::

    from benchmarks.load_harness import LoadShape, run_load

    with LocalSwarm(path, servers=2) as swarm:
        report = run_load(path, swarm, LoadShape(clients=8, duration_s=60))
    print(report.aggregate_tokens_per_s, report.fairness, report.client_exceptions)
"""

from benchmarks.load_harness.client import ClientResult
from benchmarks.load_harness.memory import MemoryTrace
from benchmarks.load_harness.report import LoadReport
from benchmarks.load_harness.runner import run_load
from benchmarks.load_harness.shape import LoadShape, make_load_model

__all__ = ["ClientResult", "LoadReport", "LoadShape", "MemoryTrace", "make_load_model", "run_load"]
