"""The search as a job on a running Ray cluster: the script for ``ray submit`` (and for ``ray job submit``).

    ray submit ray_cluster.yaml experiments/search_job.py -- experiments/smollm2_bbc_news.yaml [--set KEY=VALUE ...]

It runs on the head node (``ray submit`` copies it to the head's home folder and runs it there), joins the
running cluster and:

- prepares the config's model on every node (an alias is converted or generated in each node's cache; a
  checkpoint folder must exist at the same path on every node), so trials and servers find it anywhere;
- places the swarm as Ray actors on the nodes with the ``swarm_host`` resource when the config asks for a
  managed swarm (``swarm.mode: local`` or ``ray``), or joins the config's external ``initial_peers``;
- records the search in the MLflow server the cluster's head runs (``--tracking-uri``, default
  ``http://127.0.0.1:5000``, which ``ray_cluster.yaml`` starts), artifacts included, unless the config or a
  ``--set mlflow.tracking_uri=...`` names another store.

A relative CONFIG is looked up in the working directory, then in the project this package is installed
from (``~/ptune-search`` on a cluster made with ``ray_cluster.yaml``). Relative paths inside the config
(``output_dir``, data files) are taken from the working directory: the SSH user's home on the head.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import yaml

HEAD_MLFLOW_URI = "http://127.0.0.1:5000"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="search_job.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment config (YAML), e.g. experiments/tiny.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set budget.max_steps=20 (repeatable)",
    )
    parser.add_argument(
        "--tracking-uri", default=HEAD_MLFLOW_URI, help=f"MLflow server on the head (default {HEAD_MLFLOW_URI})"
    )
    parser.add_argument("--address", default="auto", help="the Ray cluster to join (default: auto, this node's)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search in its output_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from ptune_search.config import ConfigError, load_config
    from ptune_search.data import TaskDataError
    from ptune_search.search.driver import run_search

    try:
        config_path = find_config(args.config)
        given = load_config(config_path, args.overrides, check_paths=False)
        # The head's MLflow server, unless the config or a --set names a store.
        overrides = (
            [] if names_tracking_uri(config_path, args.overrides) else [f"mlflow.tracking_uri={args.tracking_uri}"]
        )
        overrides += args.overrides
        if given.swarm.mode == "local":  # a managed swarm: on a cluster, its servers are Ray actors
            overrides.append("swarm.mode=ray")
        config = load_config(config_path, overrides)
    except ConfigError as error:
        sys.exit(f"search_job.py: invalid config {args.config}:\n{error}")
    if config.tracking_uri.startswith(("http://", "https://")):
        wait_for_mlflow(config.tracking_uri)
    prepare_model_on_every_node(config.model, args.address)
    try:
        outcome = run_search(config, address=args.address, resume=args.resume)
    except TaskDataError as error:  # checked in the driver before the search starts anything
        print(f"search_job.py: {error}", file=sys.stderr)
        sys.exit(2)
    print(
        json.dumps(
            {
                "best_trial": outcome.best_trial,
                "baseline_accuracy": outcome.baseline_accuracy,
                "baseline_test_accuracy": (outcome.baseline or {}).get("test_accuracy"),
                "parent_run_id": outcome.parent_run_id,
                "tracking_uri": config.tracking_uri,
            },
            default=str,
        )
    )


def find_config(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    import ptune_search

    in_project = Path(ptune_search.__file__).resolve().parents[1] / path
    return in_project if in_project.exists() else path


def names_tracking_uri(config_path: Path, overrides: Sequence[str]) -> bool:
    from ptune_search.config import parse_override

    data = yaml.safe_load(config_path.read_text()) or {}
    in_file = isinstance(data.get("mlflow"), dict) and data["mlflow"].get("tracking_uri") is not None
    return in_file or any(parse_override(override)[0] == ["mlflow", "tracking_uri"] for override in overrides)


def wait_for_mlflow(uri: str, timeout: float = 120.0) -> None:
    """The head's MLflow server starts with the cluster; wait until it answers, with a clear error if never."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            if time.monotonic() > deadline:
                sys.exit(
                    f"search_job.py: no MLflow server answers at {uri} ({error}); ray_cluster.yaml starts one on "
                    "the head (see ~/ptune-mlflow/server.log there), or pass --tracking-uri"
                )
        time.sleep(1)


def prepare_model_on_every_node(model: str, address: str) -> None:
    """Resolve ``model`` on each alive node (aliases are prepared in that node's cache), all at once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ptune_search.pretrained import resolve_model

    @ray.remote(num_cpus=0, max_retries=0)
    def resolve_here(name: str) -> str:
        return str(resolve_model(name))

    ray.init(address=address, log_to_driver=True)
    try:
        nodes = [node for node in ray.nodes() if node["Alive"]]
        refs = [
            resolve_here.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                model
            )
            for node in nodes
        ]
        paths = ray.get(refs)
        for node, path in zip(nodes, paths):
            logging.info("model %s ready on %s at %s", model, node["NodeManagerAddress"], path)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
