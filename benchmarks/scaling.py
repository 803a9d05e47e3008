#!/usr/bin/env python
"""Scaling of Ray meta-training (issue 3): tasks/s with 1 and 2 worker actors against the
single-process engine, the driver's share of an iteration, object-store bytes per iteration.

Configuration (issue 2's configuration b): TSMD, ResNet-12 (64-128-256-512) teacher + Conv-4 (32)
student, 3x32x32 images, 5-way 1-shot 15-query, 5 inner steps, second order, meta-batch 4, on the
CPU with the per-task engine (``task_batching=loop``). The images are synthetic (uniform random
uint8) but stored as a real prepared Arrow dataset (``tsmd_ray.data.write_dataset``) in a temporary
directory, so actors sample and augment episodes from the memory-mapped file exactly as in training.

Paths, all driven like ``Trainer.step`` (weights -> runner.gradients -> MetaLearner.outer_step):

- ``ray_1w``: RayRunner, 1 actor x 1 torch thread (the single-threaded baseline);
- ``ray_2w``: RayRunner, 2 actors x 1 torch thread;
- ``local_2t``: LocalRunner in this process with 2 torch threads (the engine using both cores);
- ``local_1t`` (``--local-1t``): LocalRunner with 1 thread;
- ``allreduce_2w``: ``--aggregation allreduce``: 2 Ray Train workers x 1 thread, each running the
  meta-learner and ``AllReduceRunner`` (gloo). It runs after the round-robin paths, in its own
  Ray Train run, so it does not share their rotation (``--no-allreduce`` skips it).

The paths run round-robin, one meta-iteration each in rotating order (the actors of the path not
running sit idle), so that load from other processes on a shared machine hits all paths alike;
tasks/s is meta_batch / median iteration time, after ``--warmup`` iterations per path.
Driver share (Ray paths): the part of an iteration in which the actors wait for the driver
(weights to numpy, ``ray.put``, adding the returned sums, the Adam step), median over iterations.
Bytes: what the driver puts (the weights, once per iteration) and what the actors return.
All-reduce share: the part of a rank-0 iteration spent in ``all_reduce``, waiting for the other
rank included.
Also reports the FLOPs of one task (``torch.utils.flop_counter``), used by the projection in
docs/benchmarks.md, and the CPU seconds the computing processes used (``/proc``), which, unlike
wall time, hardly depend on what else runs on the machine.

Usage: ``python benchmarks/scaling.py [--iterations 5] [--warmup 1] [--local-1t] [--out FILE]``;
prints one JSON object.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

# Under oversubscription (a shared machine) OpenMP threads that spin while their partner thread is
# descheduled make a 2-thread torch process 5-15x slower than 1 thread; a passive wait policy
# avoids that. Must be set before torch starts OpenMP; reported in the JSON; override it in the env.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tsmd_ray.config import Config  # noqa: E402
from tsmd_ray.data import ArrowFewShotDataset, write_dataset  # noqa: E402
from tsmd_ray.engine import DataSpec, MetaLearner, TaskWorker  # noqa: E402
from tsmd_ray.training import LocalRunner, task_ids  # noqa: E402

# the ``train_loop_per_worker`` below is pickled by value into the Ray Train workers

CONFIG = dict(method="tsmd", teacher="resnet12", teacher_widths=[64, 128, 256, 512], student="conv4",
              student_widths=[32, 32, 32, 32], ways=5, shots=1, query=15, inner_steps=5, meta_batch=4,
              device="cpu", task_batching="loop", mlflow=False, threads_per_worker=1, seed=0)
TARGETS = {"efficiency_2w": 0.9, "driver_share_max": 0.05, "ray_2w_over_local_2t": 1.0}


def synthetic_dataset(root: Path, classes: tuple[int, int, int] = (32, 8, 8), per_class: int = 20,
                      size: int = 32) -> Path:
    """Random 3x32x32 images, ``per_class`` per class, as a prepared Arrow dataset."""
    rng = np.random.default_rng(0)
    splits = {split: [f"{split}{i:03d}" for i in range(n)] for split, n in zip(("train", "val", "test"), classes)}
    records = ((name, split, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
               for split, names in splits.items() for name in names for _ in range(per_class))
    return write_dataset(root / "synthetic32", "synthetic32", records,
                         {"size": [size, size], "channels": 3, "invert": False}, splits, source="benchmarks/scaling.py")


class Path_:
    """One way of computing a meta-iteration, driven like Trainer.step."""

    def __init__(self, name: str, runner, cfg: Config, spec: DataSpec) -> None:
        self.name, self.runner, self.cfg = name, runner, cfg
        self.learner = MetaLearner(cfg, spec)
        self.iteration = 0
        self.records: list[dict[str, float]] = []

    def cpu_seconds(self) -> list[float]:
        """CPU time so far of the processes that compute (the actors, or this process)."""
        infos = getattr(self.runner, "infos", None)
        if infos is None:
            return [time.process_time()]
        return [process_cpu_seconds(info["pid"]) for info in infos]

    def step(self, threads: int) -> dict[str, float]:
        torch.set_num_threads(threads)
        cpu_before = self.cpu_seconds()
        start = time.perf_counter()
        weights = self.learner.weights()
        got_weights = time.perf_counter()
        grads, _ = self.runner.gradients(weights, task_ids(self.iteration, self.cfg.meta_batch))
        got_grads = time.perf_counter()
        self.learner.outer_step(grads, self.cfg.meta_batch)
        end = time.perf_counter()
        self.iteration += 1
        cpu = [after - before for before, after in zip(cpu_before, self.cpu_seconds())]
        record = {"total_s": end - start, "weights_s": got_weights - start, "gradients_s": got_grads - got_weights,
                  "outer_step_s": end - got_grads, "compute_cpu_s": sum(cpu), "compute_cpu_max_s": max(cpu)}
        stats = getattr(self.runner, "stats", None)
        if stats is not None:  # RayRunner: what happened inside gradients()
            last = stats.history[-1]
            record.update({k: last[k] for k in ("put_s", "wait_s", "aggregate_s", "put_bytes", "result_bytes")})
            record["driver_s"] = record["total_s"] - last["wait_s"]
            record["driver_share"] = record["driver_s"] / record["total_s"]
        return record


def summarise(path: Path_, warmup: int) -> dict[str, float]:
    timed = path.records[warmup:]
    median = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    out = {"iterations_timed": len(timed), "median_iteration_s": median("total_s"),
           "tasks_per_s": path.cfg.meta_batch / median("total_s"),
           "iteration_s": [round(r["total_s"], 3) for r in timed],
           "outer_step_s": median("outer_step_s"), "weights_s": median("weights_s"),
           "cpu_s_per_task": median("compute_cpu_s") / path.cfg.meta_batch,
           "busiest_worker_cpu_s": median("compute_cpu_max_s")}
    if "driver_share" in timed[0]:
        out.update({"driver_share": median("driver_share"), "driver_s": median("driver_s"),
                    "put_s": median("put_s"), "aggregate_s": median("aggregate_s"), "wait_s": median("wait_s"),
                    "object_store_put_bytes_per_iteration": int(median("put_bytes")),
                    "object_store_result_bytes_per_iteration": int(median("result_bytes"))})
    return out


def allreduce_loop(config: dict) -> None:
    """Ray Train worker: ``rounds`` meta-iterations as Trainer.step does them, timed on every rank."""
    import ray.train

    from tsmd_ray.distributed.allreduce import AllReduceRunner

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    cfg = Config.from_dict(config["cfg"])
    runner = AllReduceRunner(cfg, config["data_path"], ctx.get_world_rank(), ctx.get_world_size())
    learner = MetaLearner(cfg, DataSpec.of(ArrowFewShotDataset(config["data_path"])))
    records = []
    for iteration in range(config["rounds"]):
        torch.distributed.barrier()
        comm_before, cpu_before, start = runner.comm_s, time.process_time(), time.perf_counter()
        grads, _ = runner.gradients(learner.weights(), task_ids(iteration, cfg.meta_batch))
        learner.outer_step(grads, cfg.meta_batch)
        records.append({"total_s": time.perf_counter() - start, "allreduce_s": runner.comm_s - comm_before,
                        "cpu_s": time.process_time() - cpu_before})
    if ctx.get_world_rank() == 0:  # Ray Train keeps only checkpointed metrics: hand them over as a file
        Path(config["records_path"]).write_text(json.dumps(records))


def run_allreduce_path(cfg: Config, data_path: Path, rounds: int, warmup: int) -> dict[str, float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    records_path = Path(cfg.out).resolve() / "allreduce_records.json"
    trainer = TorchTrainer(allreduce_loop, train_loop_config={"cfg": cfg.to_dict(), "data_path": str(data_path),
                                                             "rounds": rounds, "records_path": str(records_path)},
                           scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers,
                                                                  resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(storage_path=str(Path(cfg.out).resolve())))
    records_path.parent.mkdir(parents=True, exist_ok=True)
    trainer.fit()
    timed = json.loads(records_path.read_text())[warmup:]
    median = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    for r, record in enumerate(timed):
        print(f"allreduce_2w iteration {warmup + r}: {record['total_s']:.2f} s", file=sys.stderr, flush=True)
    return {"iterations_timed": len(timed), "median_iteration_s": median("total_s"),
            "tasks_per_s": cfg.meta_batch / median("total_s"), "iteration_s": [round(r["total_s"], 3) for r in timed],
            "allreduce_s": median("allreduce_s"), "allreduce_share": median("allreduce_s") / median("total_s"),
            "cpu_s_per_task": median("cpu_s") * cfg.workers / cfg.meta_batch}  # rank 0's process


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process on this machine (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flops_per_task(cfg: Config, dataset: ArrowFewShotDataset) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    worker = TaskWorker(cfg, dataset)
    weights = MetaLearner(cfg, DataSpec.of(dataset)).weights()
    with FlopCounterMode(display=False) as counter:
        worker.gradients(weights, [0])
    return float(counter.get_total_flops())


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=5, help="timed meta-iterations per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-iterations per path first")
    parser.add_argument("--local-1t", action="store_true", help="also time LocalRunner with 1 thread")
    parser.add_argument("--no-allreduce", action="store_true", help="skip the all-reduce path")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    import ray

    from tsmd_ray.distributed import RayRunner

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tsmd-scaling-") as tmp:
        data_path = synthetic_dataset(Path(tmp))
        dataset = ArrowFewShotDataset(data_path)
        spec = DataSpec.of(dataset)
        base = Config(**CONFIG, data_root=str(data_path), out=str(Path(tmp) / "out"))
        torch.set_num_threads(1)
        flops = flops_per_task(base, dataset)
        # 3 logical CPUs so that the idle 1-worker actor and the two 2-worker actors all exist;
        # only one path computes at a time, so at most 2 cores are busy.
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
        paths: list[tuple[Path_, int]] = []
        try:
            paths.append((Path_("ray_1w", RayRunner(base.replace(workers=1), data_path), base, spec), 2))
            paths.append((Path_("ray_2w", RayRunner(base.replace(workers=2), data_path), base, spec), 2))
            paths.append((Path_("local_2t", LocalRunner(base, data_path), base, spec), 2))
            if args.local_1t:
                paths.append((Path_("local_1t", LocalRunner(base, data_path), base, spec), 1))
            rounds = args.warmup + args.iterations
            for r in range(rounds):
                order = paths[r % len(paths):] + paths[:r % len(paths)]
                for path, threads in order:
                    record = path.step(threads)
                    path.records.append(record)
                    print(f"round {r} {path.name}: {record['total_s']:.2f} s", file=sys.stderr, flush=True)
            results = {path.name: summarise(path, args.warmup) for path, _ in paths}
            for path, _ in paths:
                path.runner.close()
            if not args.no_allreduce:
                results["allreduce_2w"] = run_allreduce_path(base.replace(workers=2, aggregation="allreduce"),
                                                             data_path, rounds, args.warmup)
        finally:
            for path, _ in paths:
                path.runner.close()
            ray.shutdown()

    one, two, local = results["ray_1w"], results["ray_2w"], results["local_2t"]
    params = {key: sum(t.numel() for t in group.values()) for key, group in MetaLearner(base, spec).weights().items()}
    report = {
        "benchmark": "scaling (Ray)", "date": datetime.date.today().isoformat(), "git": git_head(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "ray": ray.__version__, "python": platform.python_version(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "config": {k: v for k, v in CONFIG.items() if k != "mlflow"} | {"image": "3x32x32 synthetic"},
        "parameters": params, "weights_bytes": 4 * sum(params.values()), "flops_per_task": flops,
        "paths": results,
        "scaling_efficiency_2w": two["tasks_per_s"] / (2 * one["tasks_per_s"]),
        # contention-free view: CPU seconds per task (2 workers vs 1) and the wall time an
        # iteration would take with a free core per worker (driver + busiest worker)
        "cpu_per_task_ratio_2w_1w": two["cpu_s_per_task"] / one["cpu_s_per_task"],
        "idle_machine_efficiency_2w_estimate": (one["driver_s"] + one["busiest_worker_cpu_s"])
        / (2 * (two["driver_s"] + two["busiest_worker_cpu_s"])),
        "ray_2w_over_local_2t": two["tasks_per_s"] / local["tasks_per_s"],
        "driver_share_2w": two["driver_share"],
        **({"allreduce_2w_over_ray_2w": results["allreduce_2w"]["tasks_per_s"] / two["tasks_per_s"],
            "allreduce_efficiency_2w": results["allreduce_2w"]["tasks_per_s"] / (2 * one["tasks_per_s"]),
            "allreduce_share_2w": results["allreduce_2w"]["allreduce_share"]} if "allreduce_2w" in results else {}),
        "object_store_bytes_per_iteration_2w": two["object_store_put_bytes_per_iteration"]
        + two["object_store_result_bytes_per_iteration"],
        "targets": TARGETS,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
