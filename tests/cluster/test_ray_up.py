"""`ray up` / `ray submit` / `ray down` with ray_cluster.yaml against a head on this machine (over SSH on loopback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from tests.cluster.loopback_head import REPO, LoopbackHead, remove_ssh_control_dirs
from tests.cluster.supervised import run_supervised
from tests.search.store_views import mlflow_client, runs_by_role, trial_runs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NUM_SAMPLES = 4  # experiments/tiny.yaml


@pytest.fixture
def loopback_head():
    # A short folder: Ray's socket paths under <root>/ray must stay below the 108-byte limit.
    root = Path(tempfile.mkdtemp(prefix="ptc-", dir="/tmp"))
    head = LoopbackHead(root)
    cluster_name = f"ptune-test-{uuid.uuid4().hex[:8]}"
    try:
        head.start()
        yield head, cluster_name
    finally:
        head.stop()
        remove_ssh_control_dirs(cluster_name)
        shutil.rmtree(root, ignore_errors=True)


def ray_cli(head: LoopbackHead, *args: str, timeout: float) -> int:
    """The `ray` command on the user's side, with its own home (the token ray_cluster.yaml mounts) and temp dirs."""
    client = head.root / "client"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(client), TMPDIR=str(client / "tmp"), RAY_TMPDIR=str(client / "tmp"))
    env.update(RAY_USAGE_STATS_ENABLED="0")
    return run_supervised(
        [sys.executable, "-m", "ray.scripts.scripts", *args],
        head.root / "client.log",
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.mark.timeout(2400)  # its waits: 600 + 900 + 300 + 300 s
def test_ray_up_submit_down_records_the_search_in_the_heads_mlflow(loopback_head):
    head, cluster_name = loopback_head
    # ray down runs `ray stop` on the head: it must reach the head's own stop, never Ray's (which stops every Ray here).
    which = head.session("command -v ray")
    assert which.stdout.strip() == str(head.bin / "ray"), which
    token = head.root / "client" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text(uuid.uuid4().hex)  # what `ray get-auth-token --generate` writes
    (head.root / "client" / "tmp").mkdir()
    config = head.root / "cluster.yaml"
    config.write_text(yaml.safe_dump(head.cluster_config(cluster_name)))

    def log() -> str:
        return (head.root / "client.log").read_text(errors="replace")[-6000:]

    assert ray_cli(head, "up", str(config), "-y", timeout=600) == 0, log()
    assert (head.home / ".ray" / "auth_token").read_text() == token.read_text()
    submitted = ray_cli(
        head,
        "submit",
        str(config),
        str(REPO / "experiments" / "search_job.py"),
        "--",
        "experiments/tiny.yaml",
        "--tracking-uri",
        head.mlflow_uri,
        timeout=900,
    )
    assert submitted == 0, log()
    # The best prompt comes back through the head's MLflow server (reached here without a tunnel: same machine).
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptune_search.cli",
            "export",
            "--tracking-uri",
            head.mlflow_uri,
            "--experiment",
            "tiny",
            "--out",
            str(head.root / "best-prompt"),
        ],
        env=dict(os.environ, PTUNE_SEARCH_CACHE=str(head.root / "client" / "cache")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (head.root / "best-prompt" / "prompt.safetensors").is_file()
    assert ray_cli(head, "down", str(config), "-y", timeout=300) == 0, log()
    assert not head.ray_processes(), "ray down left the head's Ray running"

    store = head.mlflow_dir  # the head's MLflow server store: mlflow.db and artifacts/
    experiment = mlflow_client(store).get_experiment_by_name("tiny")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    parents = runs_by_role(store, "search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["swarm.mode"] == "ray"
    trials = trial_runs(store)
    assert len(trials) == NUM_SAMPLES
    assert {run.data.tags["mlflow.parentRunId"] for run in trials.values()} == {parents[0].info.run_id}
    assert {run.info.status for run in trials.values()} <= {"FINISHED", "KILLED"}
    prompts = list((store / "artifacts").rglob("prompt.safetensors"))  # uploaded through the server
    assert len(prompts) >= NUM_SAMPLES, prompts
