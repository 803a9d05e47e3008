"""The meta-training loop (Algorithm 1), independent of where task gradients are computed.

A *runner* computes outer-gradient sums for a list of task ids: :class:`LocalRunner` in this
process, ``tsmd_ray.distributed.RayRunner`` on Ray actors. The loop owns the weights, applies
the outer update, validates, checkpoints and reports metrics.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write, file_sha256, load_checkpoint, save_checkpoint
from .config import RESUMABLE_KEYS, Config, changed_keys
from .data import ArrowFewShotDataset
from .engine import DataSpec, MetaLearner, TaskWorker, Weights

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
EVAL_CHUNK = 100  # episodes per evaluation call (the progress bar's step)
BEST_NAME = "best.pt"  # with early stopping: the weights of the best meta-validation, what is tested
RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, "metrics.jsonl", "evaluation.json")  # what a run leaves in its out


class NonFiniteLossError(RuntimeError):
    """Meta-training produced a NaN or infinite loss or gradient."""


class Runner(Protocol):
    def gradients(self, weights: Weights, task_ids: Sequence[int]) -> tuple[Weights, dict[str, float]]: ...
    def evaluate(self, weights: Weights, split: str, task_ids: Sequence[int]) -> dict[str, list[float]]: ...
    def close(self) -> None: ...


class Reporter(Protocol):
    def report(self, step: int, metrics: dict[str, float]) -> None: ...


class LocalRunner:
    """Computes everything in this process with one :class:`TaskWorker`."""

    def __init__(self, cfg: Config, dataset_path: str | Path) -> None:
        self.worker = TaskWorker(cfg, ArrowFewShotDataset(dataset_path))

    def gradients(self, weights: Weights, task_ids: Sequence[int]) -> tuple[Weights, dict[str, float]]:
        return self.worker.gradients(weights, task_ids)

    def evaluate(self, weights: Weights, split: str, task_ids: Sequence[int]) -> dict[str, list[float]]:
        return self.worker.evaluate(weights, split, task_ids)

    def close(self) -> None:
        pass


def task_ids(iteration: int, meta_batch: int) -> list[int]:
    """Training tasks of an iteration: fixed by the iteration alone, whoever computes them."""
    return list(range(iteration * meta_batch, (iteration + 1) * meta_batch))


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% confidence half-width (1.96 standard errors) over episodes."""
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std(unbiased=True)) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "ci95": 1.96 * std / math.sqrt(len(values)), "episodes": len(values)}


def evaluate(runner: Runner, weights: Weights, split: str, episodes: int) -> dict[str, dict[str, Any]]:
    """Meta-test: adapt on each of ``episodes`` seeded episodes, score the query sets.

    Per model: mean, 95% CI, episode count and the per-episode accuracies (episode i is the same
    seeded task for every method, so two runs can be compared episode by episode).
    """
    per_episode: dict[str, list[float]] = {}
    with tqdm(total=episodes, desc=f"meta-test ({split})", unit="episode", leave=split == "test",
              dynamic_ncols=True) as bar:
        for start in range(0, episodes, EVAL_CHUNK):  # episodes are seeded by id: chunking changes nothing
            ids = list(range(start, min(start + EVAL_CHUNK, episodes)))
            for name, values in runner.evaluate(weights, split, ids).items():
                per_episode.setdefault(name, []).extend(values)
            bar.update(len(ids))
    return {name.replace("/acc", ""): {**summarise(values), "per_episode": values}
            for name, values in per_episode.items() if name.endswith("/acc")}


def _check_finite(iteration: int, grads: Weights, metrics: dict[str, float], last_good: int | None) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    bad += [f"gradient of {key}.{name}" for key, g in grads.items() for name, t in g.items()
            if not torch.isfinite(t).all()]
    if bad:
        kept = f"the last good checkpoint (iteration {last_good}) is kept" if last_good is not None \
            else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"non-finite {', '.join(bad[:3])} at iteration {iteration}; "
                                 f"stopping, {kept}. Lower the learning rates (alpha, lam, beta, eta).")


@dataclass
class EarlyStopping:
    """Stops after ``patience`` meta-validations without a higher ``metric`` and keeps the best weights."""

    metric: str
    patience: int
    best: float = -math.inf
    best_iteration: int | None = None
    stale: int = 0
    best_state: dict[str, Any] | None = field(default=None, repr=False)

    def update(self, iteration: int, metrics: dict[str, float], state: dict[str, Any]) -> bool:
        """Record a validation; True when training should stop."""
        if metrics[self.metric] > self.best:
            self.best, self.best_iteration, self.stale = metrics[self.metric], iteration, 0
            self.best_state = copy.deepcopy(state)
        else:
            self.stale += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        """``patience`` validations in a row have not beaten the best one."""
        return self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "best_iteration": self.best_iteration,
                "stale": self.stale, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_iteration = state["best"], state["best_iteration"]
        self.stale, self.best_state = state["stale"], state["best_state"]


def resumes(cfg: Config) -> bool:
    """Whether a run of ``cfg`` continues from a checkpoint (``resume`` and ``checkpoint.pt`` in ``out``)."""
    return cfg.resume and (Path(cfg.out) / CHECKPOINT_NAME).is_file()


def clear_run(out: str | Path) -> list[str]:
    """Remove an earlier run's files from ``out`` before a run that starts from iteration 0 (its
    ``metrics.jsonl`` would mix both trajectories, a later resume its checkpoint); returns their names."""
    removed = [name for name in RUN_FILES if (Path(out) / name).is_file()]
    for name in removed:
        (Path(out) / name).unlink()
    return removed


class Trainer:
    """Algorithm 1 over a runner; writes ``checkpoint.pt``, ``metrics.jsonl`` and ``evaluation.json``.

    With all-reduce aggregation every worker runs a Trainer on identical weights; only the
    ``primary`` one writes files and calls the reporters.
    """

    def __init__(self, cfg: Config, runner: Runner, spec: DataSpec, data_meta: dict[str, Any],
                 reporters: Sequence[Reporter] = (), primary: bool = True) -> None:
        self.cfg, self.runner, self.data_meta = cfg, runner, data_meta
        self.primary = primary
        self.reporters = list(reporters)
        self.out = Path(cfg.out)
        self.learner = MetaLearner(cfg, spec)
        self.spec = spec
        self.start = 0
        self.last_checkpoint: int | None = None
        # psi's starting point: the file's bytes, as results depend on them and the path can be re-written
        self.teacher_init_sha256 = file_sha256(cfg.teacher_init) if cfg.teacher_init and cfg.has_teacher else None
        self.stopping = EarlyStopping(f"val/{'student' if cfg.has_student else 'teacher'}_acc", cfg.patience) \
            if cfg.patience else None
        if resumes(cfg):
            self.restore(load_checkpoint(self.out / CHECKPOINT_NAME), self.out / CHECKPOINT_NAME)

    def restore(self, payload: dict[str, Any], source: str | Path) -> None:
        """Continue from a checkpoint payload (see :meth:`checkpoint_payload`)."""
        changed = changed_keys(payload["config"], self.cfg, RESUMABLE_KEYS)
        if changed:
            log.warning("resuming %s under other %s than it was trained with (%s): the run goes on with the new "
                        "values", source, ", ".join(changed),
                        ", ".join(f"{k} {payload['config'].get(k)!r} -> {getattr(self.cfg, k)!r}" for k in changed[:3]))
        self.learner.load_state_dict(payload["learner"])
        if "teacher_init_sha256" in payload:  # the file it started from, not today's
            self.teacher_init_sha256 = payload["teacher_init_sha256"]
        elif self.teacher_init_sha256:
            log.warning("%s records no teacher_init file hash (an older checkpoint): recording today's file's",
                        source)
        self.start = payload["iteration"] + 1
        self.last_checkpoint = payload["iteration"]
        if self.stopping is not None and payload.get("early_stopping"):
            self.stopping.load_state_dict(payload["early_stopping"])
        log.info("resumed from %s at iteration %d", source, self.start)

    def checkpoint_payload(self, iteration: int, learner: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = {"config": self.cfg.to_dict(), "iteration": iteration,
                   "learner": learner if learner is not None else self.learner.state_dict(),
                   "data": {"in_channels": self.spec.in_channels, "image_size": self.spec.image_size,
                            "preprocess": self.data_meta.get("preprocess", {}),
                            "dataset": self.data_meta.get("name", self.cfg.dataset)},
                   "teacher_init_sha256": self.teacher_init_sha256}
        if self.stopping is not None and learner is None:
            payload["early_stopping"] = self.stopping.state_dict()
        return payload

    def save(self, iteration: int) -> Path:
        path = self.out / CHECKPOINT_NAME
        if self.primary:
            save_checkpoint(path, self.checkpoint_payload(iteration))
        self.last_checkpoint = iteration
        return path

    def _report(self, step: int, metrics: dict[str, float]) -> None:
        if not self.primary:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for reporter in self.reporters:
            reporter.report(step, metrics)

    def validate(self) -> dict[str, float]:
        summary = evaluate(self.runner, self.learner.weights(), "val", self.cfg.val_episodes)
        return {f"val/{model}_acc": s["mean"] for model, s in summary.items()}

    def step(self, iteration: int) -> dict[str, float]:
        """One meta-iteration: Eq. 6-8 for the batch of tasks, then Eq. 10."""
        started = time.perf_counter()
        grads, sums = self.runner.gradients(self.learner.weights(), task_ids(iteration, self.cfg.meta_batch))
        _check_finite(iteration, grads, sums, self.last_checkpoint)
        self.learner.outer_step(grads, self.cfg.meta_batch)
        metrics = {f"train/{k}": v / self.cfg.meta_batch for k, v in sums.items()}
        metrics["train/tasks_per_s"] = self.cfg.meta_batch / (time.perf_counter() - started)
        return metrics

    def fit(self) -> dict[str, Any]:
        """Meta-train to ``cfg.iterations``, then meta-test; returns the evaluation."""
        if self.primary:
            self.out.mkdir(parents=True, exist_ok=True)
            self.cfg.to_yaml(self.out / "config.yaml")
        if self.stopping is not None and self.stopping.stopped:  # resumed after early stopping had ended it
            log.info("early stopping had ended this run: testing the weights of iteration %d, not training on",
                     self.stopping.best_iteration + 1)
            return self.test()
        bar = tqdm(range(self.start, self.cfg.iterations), desc=f"meta-train {self.cfg.method}",
                   initial=self.start, total=self.cfg.iterations, dynamic_ncols=True,
                   disable=not self.primary)
        for iteration in bar:
            metrics = self.step(iteration)
            stop = False
            if self.cfg.eval_every and (iteration + 1) % self.cfg.eval_every == 0:
                metrics.update(self.validate())
                stop = self._early_stop(iteration, metrics)
            self._report(iteration + 1, metrics)
            bar.set_postfix({k.split("/", 1)[1]: round(v, 3) for k, v in metrics.items() if k.endswith("acc")})
            if stop or (iteration + 1) % self.cfg.checkpoint_every == 0 or iteration + 1 == self.cfg.iterations:
                self.save(iteration)
            if stop:
                log.info("%s has not risen for %d validations: stopping at iteration %d, testing the weights "
                         "of iteration %d", self.stopping.metric, self.stopping.patience, iteration + 1,
                         self.stopping.best_iteration + 1)
                break
        return self.test()

    def _early_stop(self, iteration: int, metrics: dict[str, float]) -> bool:
        """Update early stopping after a validation; writes ``best.pt`` when the metric rises."""
        if self.stopping is None:
            return False
        stop = self.stopping.update(iteration, metrics, self.learner.state_dict())
        if self.stopping.best_iteration == iteration and self.primary:
            save_checkpoint(self.out / BEST_NAME, self.checkpoint_payload(iteration, self.stopping.best_state))
        return stop

    def test(self) -> dict[str, Any]:
        """The paper's protocol: mean accuracy and 95% CI over ``test_episodes`` episodes, of the
        best-validated weights under early stopping, else of the last ones."""
        iteration = self.last_checkpoint
        if self.stopping is not None and self.stopping.best_state is not None:
            self.learner.load_state_dict(self.stopping.best_state)
            iteration = self.stopping.best_iteration
        summary = evaluate(self.runner, self.learner.weights(), "test", self.cfg.test_episodes)
        result = {"method": self.cfg.method, "meta_algorithm": self.cfg.meta_algorithm,
                  "dataset": self.cfg.dataset, "ways": self.cfg.ways, "shots": self.cfg.shots,
                  "iterations": self.cfg.iterations, "tested_iteration": None if iteration is None else iteration + 1,
                  "teacher_init_sha256": self.teacher_init_sha256, "results": summary}
        if self.primary:
            atomic_write(self.out / "evaluation.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
        self._report(self.cfg.iterations, {f"test/{m}_acc": s["mean"] for m, s in summary.items()}
                     | {f"test/{m}_ci95": s["ci95"] for m, s in summary.items()})
        return result
