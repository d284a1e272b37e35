"""`ray job submit -- ptune-search search CONFIG --address auto` against a private head on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster.loopback_head import REPO
from tests.cluster.supervised import Supervised, free_ports, run_supervised
from tests.search.store_views import runs_by_role, trial_runs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NUM_SAMPLES = 4  # experiments/tiny.yaml


class PrivateHead:
    """`ray start --head --block` on free ports with its own token and temp dir (a Ray on the defaults may be
    someone else's); the swarm_host resource marks it for block servers."""

    def __init__(self, root: Path):
        self.root = root
        self.gcs_port, self.dashboard_port, agent, client = free_ports(4)
        token = root / "auth_token"
        token.write_text(uuid.uuid4().hex)  # what `ray get-auth-token --generate` writes
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            RAY_TMPDIR=str(root),
            RAY_USAGE_STATS_ENABLED="0",
            PTUNE_SWARM_HOST="127.0.0.1",
        )
        # The job's `ptune-search` is this Python's (the head's environment is this test's).
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.process = Supervised(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "start",
                "--head",
                "--block",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={agent}",
                f"--ray-client-server-port={client}",
                '--resources={"swarm_host": 2}',
            ],
            root / "head.log",
            env=self.env,
        )

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float) -> int:
        return run_supervised(
            [sys.executable, "-m", "ray.scripts.scripts", *args],
            self.root / "client.log",
            env=self.env,
            cwd=REPO,
            timeout=timeout,
        )

    def wait_until_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.ray("job", "list", "--address", self.address, timeout=60) != 0:
            assert self.process.process.poll() is None, f"the head exited:\n{self.process.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no Ray dashboard at {self.address}:\n{self.process.log()[-3000:]}"
            time.sleep(2)

    def log(self) -> str:
        return (self.root / "client.log").read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="ptj-", dir="/tmp"))  # short: Ray's socket paths stay below 108 bytes
    head = PrivateHead(root)
    try:
        head.wait_until_up()
        yield head
    finally:
        head.process.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_ray_job_runs_the_search_and_its_trials_are_in_mlflow(head):
    output = head.root / "search"
    submitted = head.ray(
        "job",
        "submit",
        "--address",
        head.address,
        "--working-dir",
        ".",
        "--submission-id",
        "tiny-search",
        "--",
        "ptune-search",
        "search",
        "experiments/tiny.yaml",
        "--address",
        "auto",
        "--set",
        "swarm.mode=ray",
        "--set",
        f"output_dir={output}",
        timeout=900,
    )
    assert submitted == 0, head.log()  # `ray job submit` waits for the job and exits 1 if it failed
    assert "Job 'tiny-search' succeeded" in head.log()

    parents = runs_by_role(output, "search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["swarm.mode"] == "ray"
    trials = trial_runs(output)
    assert len(trials) == NUM_SAMPLES
    assert {run.data.tags["mlflow.parentRunId"] for run in trials.values()} == {parents[0].info.run_id}
    assert {run.info.status for run in trials.values()} <= {"FINISHED", "KILLED"}


def test_more_servers_than_swarm_host_slots_is_refused_before_any_starts(head, tmp_path):
    search = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptune_search.cli",
            "search",
            "experiments/tiny.yaml",
            "--address",
            f"127.0.0.1:{head.gcs_port}",
            "--set",
            "swarm.mode=ray",
            "--set",
            "swarm.servers=4",
            "--set",
            f"output_dir={tmp_path / 'search'}",
        ],
        env=head.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert search.returncode != 0
    assert "swarm.servers is 4 but the Ray cluster has 2 'swarm_host' slots" in search.stderr, search.stderr[-3000:]
