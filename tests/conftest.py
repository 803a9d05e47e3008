"""Shared pytest fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Ray Train's controller checks its workers every 2 s and starts a preemption watcher per run. Faster
# checks and no watcher: tests/distributed/test_allreduce.py with tests/test_pretrain.py took 290
# against 350 s (one run each, 2026-12-07; docs/benchmarks.md, Start-up). Set before any Ray
# instance starts, so that its actors and the tests' subprocesses inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def omniglot_source() -> Path:
    """Directory holding the Omniglot "background small" zips, from ``$TSMD_OMNIGLOT``."""
    value = os.environ.get("TSMD_OMNIGLOT")
    if not value or not Path(value).is_dir():
        pytest.fail(
            "set TSMD_OMNIGLOT to the directory holding images_background_small1.zip and "
            f"images_background_small2.zip (e.g. /work/shared/data/omniglot); got {value!r}"
        )
    return Path(value)


@pytest.fixture(scope="session")
def omniglot_dataset(omniglot_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Omniglot data prepared once (28x28) for the session; returns the dataset dir."""
    from tsmd_ray.data import prepare_omniglot

    return prepare_omniglot(omniglot_source, tmp_path_factory.mktemp("prepared") / "omniglot")


@pytest.fixture(scope="module")
def ray_cluster():
    """The session's local Ray instance (2 CPUs): the first module that asks starts it, the modules
    after it share it (a Ray start costs 10-20 s), and it stops at the end of the session. Modules
    that need a cluster of their own (tests/distributed) stop it first; the next module restarts it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False,
                 log_to_driver=False)
    return ray


def stop_shared_ray() -> None:
    """Stop the instance that ``ray_cluster`` shares, if one is running in this process."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def stop_ray_at_the_end():
    yield
    stop_shared_ray()


# ---------------------------------------------------------------------- one tracking server per session
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts under ``root``."""
    port = free_port()
    log_file = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer within {timeout} s: {(root / 'server.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One real ``mlflow server`` for the whole session (its URI); each test module logs to its own
    experiments, so modules do not see each other's runs."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield uri
    stop_server(proc)
