"""A cluster head reached over SSH that is this machine: everything on 127.0.0.1, everything under one folder.

- sshd (Debian's) on a free loopback port, under a supervisor, accepting only a key made for the test; its
  sessions get ``HOME=<root>/home``, so ``ray up``'s files (``~/ptune-search``, ``~/ray_bootstrap_*``,
  ``~/.ray/auth_token``, the MLflow store) land there, never in the real home.
- Ray's SSH has no port option: ``auth.ssh_proxy_command`` (``nc 127.0.0.1 PORT``) reaches the port.
- The session's ``~/.bashrc`` puts a venv (``--system-site-packages``: the machine's installed packages, and
  the mounted project installed into it alone), a ``ray`` that keeps ``ray stop`` to this head's own Ray
  (stop_own_ray.py), and ``RAY_TMPDIR=<root>`` (this Ray lives in ``<root>/ray``; ``--address auto`` finds it).
- The cluster config is ``ray_cluster.yaml`` with the head at 127.0.0.1, no workers, the test's key and free
  ports for Ray and MLflow (a Ray on the default ports may belong to someone else).

Every process started over SSH, daemons included, descends from the supervised sshd, so stopping it stops all.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.supervised import Supervised, free_ports

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
STOP_OWN_RAY = Path(__file__).with_name("stop_own_ray.py")
RUN_SSHD = Path("/run/sshd")  # sshd's privilege separation directory


class LoopbackHead:
    def __init__(self, root: Path):
        self.root = root
        self.home, self.bin, self.venv, self.ssh_dir = root / "home", root / "bin", root / "venv", root / "ssh"
        self.key = self.ssh_dir / "id_ed25519"
        self.user = getpass.getuser()
        self.ssh_port, self.gcs_port, self.dashboard_port, self.agent_port, self.client_port, self.mlflow_port = (
            free_ports(6)
        )
        self.sshd: Supervised | None = None
        self._made_run_sshd = False

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "ptune-mlflow"

    def start(self) -> "LoopbackHead":
        for folder in (self.home, self.bin, self.ssh_dir):
            folder.mkdir(parents=True)
        self._make_keys()
        self._make_session()
        self._make_venv()
        if not RUN_SSHD.exists():
            RUN_SSHD.mkdir(mode=0o755)
            self._made_run_sshd = True
        config = self.ssh_dir / "sshd_config"
        config.write_text(
            f"Port {self.ssh_port}\nListenAddress 127.0.0.1\nHostKey {self.ssh_dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}\nPidFile {self.ssh_dir / 'sshd.pid'}\n"
            f"AllowUsers {self.user}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"SetEnv HOME={self.home}\n"
        )
        self.sshd = Supervised(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], self.root / "sshd.log")
        self._wait_for_sshd()
        return self

    def _make_venv(self) -> None:
        """A venv that sees this Python's packages (a venv's too, when the tests run in one) without its project."""
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(self.venv)], check=True)
        if sys.prefix != sys.base_prefix:  # a plain path line: the packages, not the .pth hooks (editable installs)
            (self.venv_site_packages() / "test-python.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    def venv_site_packages(self) -> Path:
        return next(self.venv.glob("lib/python3*/site-packages"))

    def _make_keys(self) -> None:
        for name in ("host_key", self.key.name):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh_dir / name)], check=True)
        shutil.copy(self.key.with_suffix(".pub"), self.ssh_dir / "authorized_keys")

    def _make_session(self) -> None:
        ray = self.bin / "ray"
        ray.write_text(
            "#!/bin/sh\n# This head's `ray stop` stops only its own Ray (the real one stops every Ray here).\n"
            f'if [ "$1" = stop ]; then exec {sys.executable} {STOP_OWN_RAY} {self.ray_dir}/; fi\n'
            f'exec {self.venv}/bin/python -m ray.scripts.scripts "$@"\n'
        )
        mlflow = self.bin / "mlflow"
        mlflow.write_text(f'#!/bin/sh\nexec {self.venv}/bin/python -m mlflow "$@"\n')
        for script in (ray, mlflow):
            script.chmod(0o755)
        (self.home / ".bashrc").write_text(
            "# The loopback head's sessions: its own tools first, its Ray in $RAY_TMPDIR/ray.\n"
            f"export PATH={self.bin}:{self.venv}/bin:$PATH\n"
            f"export RAY_TMPDIR={self.root}\nexport RAY_USAGE_STATS_ENABLED=0\n"
            "export PTUNE_SWARM_HOST=127.0.0.1  # Ray's node address is never loopback; the swarm's is\ncd ~\n"
        )

    def session(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``command`` on the head the way Ray's SSH command runner does (login shell, ~/.bashrc)."""
        wrapped = f"source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({command})"
        return subprocess.run(
            [
                "ssh",
                "-i",
                str(self.key),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                f"UserKnownHostsFile={os.devnull}",
                "-o",
                f"ProxyCommand={self.proxy_command}",
                "-o",
                "BatchMode=yes",
                f"{self.user}@127.0.0.1",
                "bash",
                "--login",
                "-c",
                "-i",
                _quote(wrapped),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    @property
    def proxy_command(self) -> str:
        return f"nc 127.0.0.1 {self.ssh_port}"

    def _wait_for_sshd(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.session("true", timeout=10).returncode == 0:
                return
            assert self.sshd is not None and self.sshd.process.poll() is None, f"sshd exited:\n{self.sshd.log()}"
            assert time.monotonic() < deadline, f"sshd does not answer on port {self.ssh_port}:\n{self.sshd.log()}"
            time.sleep(0.5)

    def cluster_config(self, cluster_name: str) -> dict[str, Any]:
        """ray_cluster.yaml with this head, no workers, the test's key and free ports."""
        config = yaml.safe_load(CLUSTER_YAML.read_text())
        config["cluster_name"] = cluster_name
        config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
        config["auth"] = {
            "ssh_user": self.user,
            "ssh_private_key": str(self.key),
            "ssh_proxy_command": self.proxy_command,
        }
        ray_ports = (
            f"--port={self.gcs_port} --node-ip-address=127.0.0.1 --dashboard-port={self.dashboard_port} "
            f"--dashboard-agent-listen-port={self.agent_port} --ray-client-server-port={self.client_port}"
        )
        config["head_start_ray_commands"] = [
            _replace_once(_replace_once(command, "--port=6379", ray_ports), "--port 5000", f"--port {self.mlflow_port}")
            if ("--port=6379" in command or "--port 5000" in command)
            else command
            for command in config["head_start_ray_commands"]
        ]
        joined = "\n".join(config["head_start_ray_commands"])
        assert f"--port={self.gcs_port}" in joined and f"--port {self.mlflow_port}" in joined, joined
        return config

    def ray_processes(self) -> list[str]:
        """Command lines of processes of this head's Ray that are still running."""
        import psutil

        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if f"{self.ray_dir}/" in cmdline and str(STOP_OWN_RAY) not in cmdline:
                found.append(f"{process.pid}: {cmdline[:160]}")
        return found

    def stop(self) -> None:
        if self.sshd is not None:
            self.sshd.stop()
        if self._made_run_sshd:
            try:
                RUN_SSHD.rmdir()
            except OSError:
                pass


def ssh_control_dirs(cluster_name: str) -> list[Path]:
    """The folders of Ray's SSH ControlMaster sockets for ``cluster_name`` (/tmp/ray_ssh_<user>/<cluster>)."""
    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    cluster_hash = hashlib.sha256(cluster_name.encode()).hexdigest()[:HASH_MAX_LENGTH]
    return list(Path("/tmp").glob(f"ray_ssh_*/{cluster_hash}"))


def remove_ssh_control_dirs(cluster_name: str) -> None:
    """Ray's ControlMaster folders for ``cluster_name``, and their parent when nothing else is left in it."""
    for folder in ssh_control_dirs(cluster_name):
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()
        except OSError:
            pass


def _replace_once(text: str, old: str, new: str) -> str:
    if old not in text:
        return text
    assert text.count(old) == 1, f"{old!r} occurs more than once in {text!r}"
    return text.replace(old, new)


def _quote(text: str) -> str:
    from shlex import quote

    return quote(text)
