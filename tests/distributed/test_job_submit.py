"""`ray job submit -- python -m tsmd_ray.train` against a head started with `ray start --head`.

The head runs on loopback with its own ports and temp dir (so it cannot collide with any other
Ray instance on the machine, and `ray.init()` elsewhere does not pick it up) and with token
authentication on, as Ray documents it: ``RAY_AUTH_MODE=token`` and the token in
``RAY_AUTH_TOKEN`` (or ``~/.ray/auth_token``) for the head and for every client. It is started
from the project's virtual environment (PATH), so the job's ``python`` is the venv's. Teardown
stops exactly this head: ``ray start --block`` is terminated, which stops the processes it started
(``ray stop`` would stop every Ray instance on the machine).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")

from .conftest import tiny_flags  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `python`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head() -> dict:
    temp_dir = tempfile.mkdtemp(prefix="tsmdray", dir="/tmp")  # short: Ray's socket paths are limited
    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "ray-client-server-port")}
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp_dir,
               "--disable-usage-stats", *(f"--{name}={port}" for name, port in ports.items())]
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_dashboard(url, token, proc, log_path)
        yield {"url": url, "env": env, "token": token}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session `ray start` leads, nothing else
            proc.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if json.load(response).get("ray_version"):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.5)
    pytest.fail(f"the dashboard at {url} did not come up:\n{log_path.read_text()[-3000:]}")


def submit(head: dict, *entrypoint: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(BIN / "ray"), "job", "submit", "--address", head["url"], "--working-dir", str(REPO),
               "--", *entrypoint]
    return subprocess.run(command, env=env or head["env"], cwd=REPO, capture_output=True, text=True, timeout=420,
                          check=False)


def test_job_submit_trains_on_the_cluster(head: dict, omniglot_dataset: Path, tmp_path: Path) -> None:
    job = submit(head, "python", "-m", "tsmd_ray.train",
                 *tiny_flags(omniglot_dataset, tmp_path / "out", "--workers", "2", "--iterations", "4"))
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    assert "succeeded" in output
    assert "Connecting to existing Ray cluster" in output  # the job's ray.init() joined this head
    assert "2 worker actor(s)" in output
    result = json.loads(next(line for line in job.stdout.splitlines() if line.startswith('{"method"')))
    assert result["results"]["student"]["episodes"] == 8 and result["iterations"] == 4
    evaluation = json.loads((tmp_path / "out" / "evaluation.json").read_text())  # outputs at --out
    assert evaluation["results"] == result["results"]
    assert (tmp_path / "out" / "checkpoint.pt").is_file()


def test_failed_job_gives_nonzero_exit(head: dict, tmp_path: Path) -> None:
    job = submit(head, "python", "-m", "tsmd_ray.train", "--data-root", str(tmp_path / "missing"),
                 "--dataset", "no-such-dataset", "--out", str(tmp_path / "out"), "--mlflow", "false")
    assert job.returncode == 1, (job.stdout + job.stderr)[-3000:]
    assert "failed" in job.stdout + job.stderr


def test_client_needs_the_token(head: dict) -> None:
    """Without RAY_AUTH_MODE=token (and the token) the job server turns the client away."""
    no_auth = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    listing = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head["url"]], env=no_auth,
                             capture_output=True, text=True, timeout=120, check=False)
    assert listing.returncode != 0
    allowed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head["url"]], env=head["env"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
