"""``RayRunner``: the Runner protocol of :mod:`tsmd_ray.training` over Ray worker actors.

The driver (the process running :class:`~tsmd_ray.training.Trainer`) owns psi, theta and their
optimizers. Each meta-iteration it

1. puts the current weights into the object store **once** (``ray.put`` of float32 numpy arrays),
2. splits the iteration's task ids into contiguous blocks, one per actor, in actor order,
3. each actor samples its own tasks from the memory-mapped Arrow file, runs Eq. 6-8 and returns
   the *sums* of the outer gradients over its block (CPU numpy) and metric sums,
4. the driver adds the blocks in actor order; the Trainer divides by ``meta_batch`` and steps.

Which actor computes which task changes only how a sum is grouped; with the per-task engine the
partial sums are float64 and exact, so the trajectory is bit-identical for any number of workers
(see :mod:`.actors`), and a retried call gives bit-identical results.

Faults: actors are created with ``max_restarts``/``max_task_retries`` so Ray restarts an actor
that dies (process killed, node lost: the actor is rescheduled on a node that has room) and
re-runs its pending calls; if Ray gives up, the driver replaces the actor and resubmits the
block itself. Calls are idempotent (weights in, gradient sums out), so a retry is exact.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..engine import Weights
from .actors import NumpyWeights, TaskActor, to_numpy

log = logging.getLogger(__name__)

# Ray restarts a dead actor up to MAX_RESTARTS times and re-runs its pending calls up to
# MAX_TASK_RETRIES times; beyond that the driver replaces the actor, DRIVER_RETRIES times per call.
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 4
DRIVER_RETRIES = 3
# How long to wait for all actors to start (an autoscaling cluster may first add nodes).
ACTOR_START_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class WorkerPlan:
    """How many actors, and what each one asks Ray for."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    def describe(self) -> str:
        gpus = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return f"{self.workers} worker actor(s) x ({self.cpus_per_worker:g} CPU{gpus})"


def plan_workers(cfg: Config, resources: dict[str, float]) -> WorkerPlan:
    """Actor count and resources from ``--workers``/``--gpus-per-worker`` and the cluster.

    ``--workers 0`` (the default) means: on a cluster with GPUs (and ``--device`` not ``cpu``),
    one actor per ``--gpus-per-worker`` GPUs (1 GPU each when that is 0, i.e. one per GPU); on a
    CPU cluster, one actor per ``--threads-per-worker`` CPUs. Either way no more actors than
    tasks per meta-iteration (``--meta-batch``): more would sit idle while training.
    An explicit ``--workers N`` is used as given.
    """
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    per_gpu = float(cfg.gpus_per_worker)
    use_gpus = gpus > 0 and cfg.device != "cpu"
    if cfg.workers > 0:
        workers = cfg.workers
    elif use_gpus:
        per_gpu = per_gpu or 1.0
        workers = min(max(1, math.floor(gpus / per_gpu + 1e-9)), cfg.meta_batch)
    else:
        workers = min(max(1, math.floor(cpus / cfg.threads_per_worker + 1e-9)), cfg.meta_batch)
    return WorkerPlan(workers=workers, cpus_per_worker=float(cfg.threads_per_worker), gpus_per_worker=per_gpu)


def split_blocks(ids: Sequence[int], parts: int) -> list[list[int]]:
    """``ids`` cut into ``parts`` contiguous blocks, sizes differing by at most one (larger first).

    Blocks may be empty when there are fewer ids than parts.
    """
    ids = list(ids)
    base, extra = divmod(len(ids), parts)
    blocks, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        blocks.append(ids[start:start + size])
        start += size
    return blocks


def numpy_nbytes(tree: NumpyWeights) -> int:
    return sum(a.nbytes for group in tree.values() for a in group.values())


@dataclass
class CallStats:
    """Timings (seconds) and object-store traffic (bytes) of the runner's calls."""

    calls: int = 0
    put_s: float = 0.0          # numpy conversion + ray.put of the weights
    wait_s: float = 0.0         # the driver waits for the actors
    aggregate_s: float = 0.0    # adding the blocks' gradient sums, converting to torch
    put_bytes: int = 0          # weights written to the object store (once per call)
    result_bytes: int = 0       # gradient sums the actors return
    retries: int = 0            # blocks the driver resubmitted
    history: list[dict[str, float]] = field(default_factory=list)

    def add(self, **values: float) -> None:
        self.calls += 1
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)
        self.history.append(dict(values))


class RayRunner:
    """Computes gradient sums and evaluation episodes on Ray worker actors.

    ``ray.init()`` without an address when Ray is not initialised: it joins the cluster named by
    ``RAY_ADDRESS`` or the latest ``ray start`` on this machine, else starts a local one (which
    :meth:`close` shuts down again).
    """

    def __init__(self, cfg: Config, dataset_path: str | Path) -> None:
        import ray

        self.cfg = cfg
        self.dataset_path = str(dataset_path)
        self._owns_ray = False
        if not ray.is_initialized():
            ray.init()
            self._owns_ray = True
        self.plan = plan_workers(cfg, ray.cluster_resources())
        self._check_resources(ray.cluster_resources())
        self._remote = ray.remote(TaskActor)
        self._cfg_dict = cfg.to_dict()
        self.actors = [self._new_actor() for _ in range(self.plan.workers)]
        self.stats = CallStats()
        self.eval_stats = CallStats()
        self.inflight: dict[int, Any] = {}  # actor index -> ObjectRef of the latest call (monitoring, tests)
        self.infos = self._wait_for_actors()
        nodes = sorted({info["node_id"][:8] for info in self.infos})
        log.info("Ray: %s on %d node(s) %s; devices %s", self.plan.describe(), len(nodes), nodes,
                 sorted({info["device"] for info in self.infos}))

    # ------------------------------------------------------------------ actors
    def _new_actor(self) -> Any:
        return self._remote.options(
            num_cpus=self.plan.cpus_per_worker,
            num_gpus=self.plan.gpus_per_worker,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        ).remote(self._cfg_dict, self.dataset_path)

    def _check_resources(self, resources: dict[str, float]) -> None:
        need_cpu = self.plan.workers * self.plan.cpus_per_worker
        need_gpu = self.plan.workers * self.plan.gpus_per_worker
        have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        if need_cpu > have_cpu or need_gpu > have_gpu:
            log.warning("%s need %g CPU and %g GPU; the cluster has %g CPU and %g GPU now: actors wait "
                        "until an autoscaler adds nodes (at most %.0f s)", self.plan.describe(),
                        need_cpu, need_gpu, have_cpu, have_gpu, ACTOR_START_TIMEOUT_S)

    def _wait_for_actors(self) -> list[dict[str, Any]]:
        import ray

        refs = [actor.info.remote() for actor in self.actors]
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=30.0)
            if pending and time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{len(pending)} of {len(refs)} Ray worker actors did not start within "
                                   f"{ACTOR_START_TIMEOUT_S:.0f} s ({self.plan.describe()}; cluster has "
                                   f"{ray.cluster_resources()})")
            if pending:
                log.info("waiting for %d of %d worker actors to start", len(pending), len(refs))
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            self.close()
            raise RuntimeError(f"a Ray worker actor failed to start (dataset {self.dataset_path}; on a "
                               f"multi-node cluster it must be on storage every node sees): {exc}") from exc

    def _replace_actor(self, index: int) -> None:
        import ray

        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone, nothing to stop
            log.debug("killing worker actor %d: %s", index, exc)
        self.actors[index] = self._new_actor()

    # ------------------------------------------------------------------ calls
    def _map(self, method: str, weights_ref: Any, blocks: list[list[int]], *args: Any) -> list[Any]:
        """Run ``actor.method(weights, *args, block)`` for the non-empty blocks; results in block order.

        A block whose actor died is retried: Ray first (restart + task retry), then the driver,
        which replaces the actor and resubmits, up to ``DRIVER_RETRIES`` times per block.
        """
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        def submit(i: int) -> Any:
            return getattr(self.actors[i], method).remote(weights_ref, *args, blocks[i])

        refs = {i: submit(i) for i, block in enumerate(blocks) if block}
        self.inflight = dict(refs)
        results: dict[int, Any] = {}
        attempts = dict.fromkeys(refs, 0)
        while refs:
            for i in list(refs):
                try:
                    results[i] = ray.get(refs.pop(i))
                except RayActorError as exc:
                    attempts[i] += 1
                    if attempts[i] > DRIVER_RETRIES:
                        raise RuntimeError(f"worker actor {i} failed {attempts[i]} times on tasks "
                                           f"{blocks[i][:3]}...: {exc}") from exc
                    log.warning("worker actor %d failed (%s); resubmitting its %d task(s), attempt %d",
                                i, type(exc).__name__, len(blocks[i]), attempts[i] + 1)
                    if isinstance(exc, ActorDiedError):
                        self._replace_actor(i)
                    self.stats.retries += 1
                    refs[i] = submit(i)
                    self.inflight = {**self.inflight, i: refs[i]}
        return [results[i] for i in sorted(results)]

    def gradients(self, weights: Weights, task_ids: Sequence[int]) -> tuple[Weights, dict[str, float]]:
        """Sums over ``task_ids`` of the outer gradients (``{"psi", "theta"}``) and of the metrics."""
        import ray

        started = time.perf_counter()
        arrays = to_numpy(weights)
        weights_ref = ray.put(arrays)
        put_done = time.perf_counter()
        results = self._map("gradients", weights_ref, split_blocks(task_ids, len(self.actors)))
        waited = time.perf_counter()
        grads, metrics = _add_blocks(results)
        done = time.perf_counter()
        self.stats.add(put_s=put_done - started, wait_s=waited - put_done, aggregate_s=done - waited,
                       put_bytes=numpy_nbytes(arrays),
                       result_bytes=sum(numpy_nbytes(g) for g, _ in results))
        return grads, metrics

    def evaluate(self, weights: Weights, split: str, task_ids: Sequence[int]) -> dict[str, list[float]]:
        """Per-episode metrics of ``task_ids`` (in order), the episodes spread over the actors."""
        import ray

        started = time.perf_counter()
        arrays = to_numpy(weights)
        weights_ref = ray.put(arrays)
        put_done = time.perf_counter()
        results = self._map("evaluate", weights_ref, split_blocks(task_ids, len(self.actors)), split)
        waited = time.perf_counter()
        merged: dict[str, list[float]] = {}
        for part in results:
            for name, values in part.items():
                merged.setdefault(name, []).extend(values)
        self.eval_stats.add(put_s=put_done - started, wait_s=waited - put_done,
                            aggregate_s=time.perf_counter() - waited, put_bytes=numpy_nbytes(arrays))
        return merged

    def actor_info(self) -> list[dict[str, Any]]:
        """``info()`` of every actor now (pid, node, threads, device)."""
        import ray

        return ray.get([actor.info.remote() for actor in self.actors])

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            for actor in getattr(self, "actors", []):
                try:
                    ray.kill(actor, no_restart=True)
                except Exception as exc:  # noqa: BLE001 - already dead, nothing to stop
                    log.debug("killing a worker actor: %s", exc)
        self.actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


def _add_blocks(results: list[tuple[NumpyWeights, dict[str, float]]]) -> tuple[Weights, dict[str, float]]:
    """Sum the blocks' gradient sums (in their precision, float64 from exact actors) and metric sums
    in block order; gradients are returned as CPU float32 tensors, rounded once at the end."""
    totals: dict[str, dict[str, np.ndarray]] = {key: {} for key in results[0][0]}
    metrics: dict[str, float] = {}
    for grads, sums in results:
        for key, group in grads.items():
            acc = totals.setdefault(key, {})
            for name, array in group.items():
                if name in acc:
                    np.add(acc[name], array, out=acc[name])
                else:  # own, writable copy (object-store arrays are read-only); keeps float64 partials
                    acc[name] = np.array(array, copy=True)
        for name, value in sums.items():
            metrics[name] = metrics.get(name, 0.0) + value
    return {key: {name: torch.from_numpy(a.astype(np.float32, copy=False)) for name, a in group.items()}
            for key, group in totals.items()}, metrics
