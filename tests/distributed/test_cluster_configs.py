"""cluster/: the launcher YAML and the KubeRay RayJob parse, and the training command each names
fits the resources each provides (no cloud, no Kubernetes needed)."""
from __future__ import annotations

import importlib.util
import math
import shlex
from pathlib import Path

import pytest
import yaml

from tsmd_ray.config import Config
from tsmd_ray.flags import config_from_args
from tsmd_ray.train import build_parser

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def parse_entrypoint(entrypoint: str) -> Config:
    """``python -m tsmd_ray.train FLAGS``: the module exists and the flags make a valid Config."""
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "tsmd_ray.train"], words[:3]
    assert importlib.util.find_spec(words[2]) is not None
    return config_from_args(build_parser().parse_args(words[3:]))  # unknown flags exit here


def check_fits(cfg: Config, per_node: dict[str, float], nodes: int, shared: str) -> None:
    """The actors the command asks for fit on ``nodes`` nodes with ``per_node`` CPUs/GPUs each."""
    assert cfg.backend == "ray" and cfg.workers > 0 and cfg.gpus_per_worker > 0
    assert cfg.gpus_per_worker <= per_node["GPU"], "an actor must fit on one node"
    actors_per_node = math.floor(per_node["GPU"] / cfg.gpus_per_worker + 1e-9)
    assert actors_per_node * cfg.threads_per_worker <= per_node["CPU"], "CPUs per node too few for its actors"
    assert actors_per_node * nodes >= cfg.workers, "fewer GPU slots than --workers"
    assert cfg.workers <= cfg.meta_batch  # more would idle while training
    for path in (cfg.out, cfg.data_root, cfg.cache_dir):  # outputs and data on the shared disk
        assert Path(path).is_relative_to(shared), f"{path} is not on the shared storage {shared}"


# ---------------------------------------------------------------------- cluster launcher
@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())


def test_launcher_config_is_valid_for_ray(launcher: dict) -> None:
    """What `ray up` checks before it starts anything: Ray's schema, after its defaults."""
    ray_util = pytest.importorskip("ray.autoscaler._private.util")
    ray_util.validate_config(ray_util.prepare_config(launcher))


def test_launcher_resources_match_the_training_command(launcher: dict) -> None:
    meta = launcher["metadata"]["tsmd_ray"]
    cfg = parse_entrypoint(meta["entrypoint"])
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")  # no actors on the head
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert len(gpu_types) == 1
    gpu = gpu_types[0]
    nodes = min(gpu["max_workers"], launcher["max_workers"])
    check_fits(cfg, gpu["resources"], nodes, meta["shared_storage"])
    # the shared disk is mounted on every host and into the container; auth is on everywhere
    assert any(meta["shared_storage"] in cmd for cmd in launcher["initialization_commands"])
    assert any(f"{meta['shared_storage']}:{meta['shared_storage']}" in opt for opt in launcher["docker"]["run_options"])
    for command in launcher["head_start_ray_commands"][-1:] + launcher["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in command


# ---------------------------------------------------------------------- KubeRay
@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())


def test_rayjob_runs_the_training_entrypoint_on_its_resources(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    cfg = parse_entrypoint(spec["entrypoint"])
    cluster = spec["rayClusterSpec"]
    ray = pytest.importorskip("ray")
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = cluster["workerGroupSpecs"]
    assert len(groups) == 1
    group = groups[0]
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    per_pod = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    check_fits(cfg, per_pod, group["replicas"], "/mnt/shared")
    # every pod runs the same Ray and mounts the same ReadWriteMany claim at /mnt/shared
    pods = [head["template"]["spec"], group["template"]["spec"]]
    for pod in pods:
        for c in pod["containers"]:
            assert c["image"].endswith(f":{cluster['rayVersion']}-gpu")
            assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert claims == {"shared": "tsmd-shared"}
    assert "--resume" in spec["entrypoint"]  # a resubmitted job continues from its checkpoint


def test_dockerfile_matches_ray_version() -> None:
    ray = pytest.importorskip("ray")
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert "pip install" in text and "tsmd_ray" in text
