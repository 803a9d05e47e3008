"""A node that disappears mid-run: its worker actor is rescheduled on the node that is left.

Two raylets on this machine (``ray.cluster_utils.Cluster``): the head (1 CPU, kept busy by a
pinned placeholder actor so the worker lands elsewhere) and an extra node (1 CPU) that runs the
worker. While the worker computes iteration 3 the extra node is removed and the placeholder
released: Ray restarts the worker on the head, re-runs its pending call, and the run ends where an
unfaulted run ends.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ray._raylet import Config  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from tsmd_ray.distributed import RayRunner  # noqa: E402

from .conftest import (assert_identical, fault_during, final_state, fit, restored_env,  # noqa: E402
                       stop_shared_ray, tiny_config)


@ray.remote(num_cpus=1)
class Placeholder:
    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def cluster():
    stop_shared_ray()
    with restored_env():
        # Token authentication, as ray.init() sets it up for a local cluster (environment, token
        # file if missing, Ray's cached config). Left as the environment had it, a process that
        # ran another Ray cluster before (an earlier module) cannot schedule actors on this one.
        os.environ["RAY_AUTH_MODE"] = "token"
        subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
                       check=True, capture_output=True)
        Config.initialize("")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            extra = cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address)
            cluster.wait_for_nodes()
            yield cluster, extra
        finally:
            ray.shutdown()
            cluster.shutdown()


def occupy_head() -> object:
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head
    placeholder = Placeholder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(placeholder.ready.remote())
    return placeholder


def test_worker_node_removed_mid_run(cluster, omniglot_dataset: Path, tmp_path: Path) -> None:
    cluster, extra = cluster
    placeholder = occupy_head()

    # unfaulted reference on the extra node
    cfg = tiny_config(omniglot_dataset, tmp_path / "reference", "--workers", "1")
    runner = RayRunner(cfg, omniglot_dataset)
    try:
        assert runner.infos[0]["node_id"] == extra.node_id
        fit(cfg, runner, omniglot_dataset)
    finally:
        runner.close()

    cfg = tiny_config(omniglot_dataset, tmp_path / "faulted", "--workers", "1")
    runner = RayRunner(cfg, omniglot_dataset)
    assert runner.infos[0]["node_id"] == extra.node_id
    removed_while_busy: list[bool] = []

    def remove_node(inflight: list) -> None:
        """Iteration 3's call is in flight: free the head and remove the worker's node."""
        ready, _ = ray.wait([inflight[0]], timeout=0)
        ray.kill(placeholder)
        cluster.remove_node(extra)
        removed_while_busy.append(not ready)

    fault_during(runner, 3, cfg.meta_batch, remove_node)
    try:
        result = fit(cfg, runner, omniglot_dataset)
        infos = runner.actor_info()
    finally:
        runner.close()
    assert removed_while_busy == [True], "the node went away after the call had finished"
    head = ray.get_runtime_context().get_node_id()
    assert infos[0]["node_id"] == head  # rescheduled on the node that is left
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    assert result["results"]["student"]["episodes"] == cfg.test_episodes
    assert_identical(final_state(tmp_path / "faulted"), final_state(tmp_path / "reference"), "node lost vs unfaulted")
