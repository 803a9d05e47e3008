"""What does distillation do inside the student's inner loop? ``python -m tsmd_ray.diagnostics``.

Measured on seeded episodes of a TSMD (or fixed-teacher) checkpoint, with its own inner loop:

- ``kd_over_ce``: at each student inner step t (Eq. 7), the norm of the KD gradient
  ``kd_weight * grad L_KD`` over the norm of the cross-entropy gradient ``grad L_S``, and their
  cosine: whether KD steers the few inner steps at all, and in which direction (L_KD over the
  support images and, with ``kd_views``, their views);
- what KD can carry: the adapted teacher's temperature-softened support predictions, as the
  probability they leave off the true class (0 for a one-hot target: nothing beyond the labels)
  and their entropy, beside the teacher's support accuracy; the same on the views, whose argmax
  accuracy says how often the teacher mislabels them (only for ``kd_loss: kl``: RKD distils the
  teacher's embedding relations, not its predictions, and a fixed teacher's head is never trained);
- ``with_kd`` against ``without_kd``: the query accuracy of the same meta-trained student adapted
  with and without the KD term, and of the adapted teacher: what the guidance is worth at
  adaptation time, episode by episode.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .algorithms import (Outputs, adapt_student, adapt_teacher, detached, kd_outputs, parameters_of, query_logits,
                         student_inner_terms)
from .checkpoint import atomic_write, load_checkpoint
from .config import Config
from .data import ArrowFewShotDataset, EpisodeSampler
from .engine import MetaLearner, DataSpec, TaskWorker
from .errors import RequestError, entry_point
from .preflight import check_minimum, check_out_file, check_splits, resolve_data
from .training import summarise

log = logging.getLogger("tsmd_ray.diagnostics")


def _flat_grad(loss: torch.Tensor, params: dict[str, torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True,
                                retain_graph=retain_graph)
    return torch.cat([g.flatten() for g in grads])


def _gradient_terms(worker: TaskWorker, theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    teacher: Outputs, views: torch.Tensor | None) -> tuple[float, float, float]:
    """Norms of the CE and weighted KD gradients of Eq. 7 at ``theta``, and their cosine."""
    theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
    with torch.enable_grad():
        ce_loss, kd_loss = student_inner_terms(worker.student, theta, x, y, teacher, worker.objective.kd_loss, views)
        ce = _flat_grad(ce_loss, theta, retain_graph=True)
        kd = _flat_grad(worker.objective.settings.kd_weight * kd_loss, theta)
    return float(ce.norm()), float(kd.norm()), float(F.cosine_similarity(ce, kd, dim=0))


def _target_terms(logits: torch.Tensor, y: torch.Tensor, temperature: float) -> tuple[float, float, float]:
    p = F.softmax(logits / temperature, dim=-1)
    return (float(1 - p.gather(1, y[:, None]).mean()), float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()),
            float((logits.argmax(-1) == y).float().mean()))


def soft_targets(teacher: Outputs, y: torch.Tensor, temperature: float) -> dict[str, float]:
    """On the support rows and, with KD views (which follow them, ``y`` repeated), on the views."""
    n = y.shape[0]
    mass, entropy, acc = _target_terms(teacher.logits[:n], y, temperature)
    terms = {"off_target_mass": mass, "entropy": entropy, "teacher_support_acc": acc}
    if teacher.logits.shape[0] > n:
        views_y = y.repeat(teacher.logits.shape[0] // n - 1)
        mass, entropy, acc = _target_terms(teacher.logits[n:], views_y, temperature)
        terms |= {"views_off_target_mass": mass, "views_entropy": entropy, "teacher_views_acc": acc}
    return terms


@torch.no_grad()
def diagnose_episode(worker: TaskWorker, episode: Any) -> dict[str, Any]:
    """Every measurement of the module docstring on one episode."""
    s = dataclasses.replace(worker.objective.settings, first_order_teacher=True, first_order_student=True)
    sx, sy, qx, qy = (t.to(worker.device) for t in (episode.support_x, episode.support_y, episode.query_x,
                                                     episode.query_y))
    sx, qx = sx.to(worker.dtype), qx.to(worker.dtype)
    views = None if episode.support_views is None else episode.support_views.to(worker.device, worker.dtype)
    psi, theta = detached(parameters_of(worker.teacher)), detached(parameters_of(worker.student))
    psi_task = adapt_teacher(worker.teacher, psi, sx, sy, s) if s.adapt_teacher else psi
    teacher = Outputs(*(t.detach() for t in kd_outputs(worker.teacher, psi_task, sx, views)))
    steps = []
    for t in range(s.steps + 1):  # theta_t: t inner steps of Eq. 7 (re-run from theta, t = 0..k)
        theta_t = adapt_student(worker.student, theta, sx, sy, teacher, worker.objective.kd_loss,
                                dataclasses.replace(s, steps=t), views)
        steps.append(_gradient_terms(worker, theta_t, sx, sy, teacher, views))

    def student_acc(guide: Outputs | None) -> float:
        adapted = adapt_student(worker.student, theta, sx, sy, guide, worker.objective.kd_loss, s, views)
        return float((query_logits(worker.student, adapted, sx, qx, s.query_statistics).argmax(-1) == qy).float().mean())

    accuracy = {"with_kd": student_acc(teacher), "without_kd": student_acc(None)}
    if s.adapt_teacher:
        logits = query_logits(worker.teacher, psi_task, sx, qx, s.query_statistics)
        accuracy["teacher"] = float((logits.argmax(-1) == qy).float().mean())
    targets = soft_targets(teacher, sy, worker.cfg.kd_temperature) if worker.cfg.resolved_kd_loss == "kl" else {}
    return {"steps": steps, "accuracy": accuracy, "soft_targets": targets}


def diagnose(checkpoint: str, split: str = "val", episodes: int = 100, **overrides: Any) -> dict[str, Any]:
    """Diagnostics of ``checkpoint`` over ``episodes`` seeded episodes of ``split``, averaged."""
    check_minimum("--episodes", episodes, 1)
    payload = load_checkpoint(checkpoint)
    cfg = Config.from_checkpoint(payload["config"], backend="local", **{k: v for k, v in overrides.items()
                                                                         if v is not None})
    if not (cfg.has_teacher and cfg.has_student):
        raise RequestError("checkpoint.method", f"{checkpoint} was meta-trained with method={cfg.method!r}: "
                           "diagnostics need a teacher and a student; accepted: a tsmd or fixed-teacher checkpoint")
    dataset = ArrowFewShotDataset(resolve_data(cfg))
    check_splits(cfg, dataset, [split])
    learner = MetaLearner(cfg, DataSpec.of(dataset))
    learner.load_state_dict(payload["learner"])
    worker = TaskWorker(cfg, dataset)
    worker.load_weights(learner.weights())
    sampler = EpisodeSampler(dataset, split, cfg.ways, cfg.shots, cfg.query, cfg.seed, views=cfg.kd_views)
    per_episode = [diagnose_episode(worker, sampler.sample(i)) for i in tqdm(range(episodes), desc="diagnostics")]
    steps = [{"step": t, **{name: summarise([e["steps"][t][j] for e in per_episode])
                            for j, name in enumerate(("ce_grad_norm", "kd_grad_norm", "cosine"))},
              "kd_over_ce": summarise([e["steps"][t][1] / max(e["steps"][t][0], 1e-12) for e in per_episode])}
             for t in range(cfg.inner_steps + 1)]
    accuracy = {k: summarise([e["accuracy"][k] for e in per_episode]) for k in per_episode[0]["accuracy"]}
    accuracy["with_kd_minus_without"] = summarise([e["accuracy"]["with_kd"] - e["accuracy"]["without_kd"]
                                                   for e in per_episode])
    return {"checkpoint": checkpoint, "method": cfg.method, "split": split, "episodes": episodes,
            "kd_loss": cfg.resolved_kd_loss, "kd_weight": cfg.kd_weight, "kd_temperature": cfg.kd_temperature,
            "kd_views": cfg.kd_views, "steps": steps, "accuracy": accuracy,
            "soft_targets": {k: summarise([e["soft_targets"][k] for e in per_episode])
                             for k in per_episode[0]["soft_targets"]}}


def format_diagnostics(result: dict[str, Any]) -> str:
    """A short text report of :func:`diagnose`'s result."""
    pct = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['ci95']:.2f}"  # noqa: E731
    lines = [f"{result['method']} ({result['kd_loss']}, weight {result['kd_weight']}, T {result['kd_temperature']}, "
             f"{result.get('kd_views', 0)} views) "
             f"on {result['episodes']} {result['split']} episodes", "inner step | |grad CE| | |grad KD| | KD/CE | cos"]
    for s in result["steps"]:
        lines.append(f"{s['step']:>10} | {s['ce_grad_norm']['mean']:.4f} | {s['kd_grad_norm']['mean']:.4f} | "
                     f"{s['kd_over_ce']['mean']:.3f} | {s['cosine']['mean']:+.3f}")
    soft = result["soft_targets"]
    if soft:
        lines.append(f"teacher's soft support targets: {pct(soft['off_target_mass'])}% of the mass off the true "
                     f"class, entropy {soft['entropy']['mean']:.3f} nats, teacher support accuracy "
                     f"{pct(soft['teacher_support_acc'])}%")
    else:
        lines.append(f"no soft targets: {result['kd_loss']} distils the teacher's embedding relations")
    if "teacher_views_acc" in soft:
        lines.append(f"on the views: {pct(soft['views_off_target_mass'])}% of the mass off the true class, entropy "
                     f"{soft['views_entropy']['mean']:.3f} nats, teacher accuracy {pct(soft['teacher_views_acc'])}%")
    lines += [f"query accuracy {name}: {pct(s)}%" for name, s in result["accuracy"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.diagnostics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or best.pt of a tsmd/fixed-teacher run")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--data-root", help="dataset location, if not the one used for training")
    parser.add_argument("--kd-weight", type=float, help="measure with another KD weight than the checkpoint's")
    parser.add_argument("--kd-temperature", type=float, help="measure with another temperature")
    parser.add_argument("--kd-views", type=int, help="measure with K augmented views per support image (kd_views)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    return parser


def _main(args: argparse.Namespace) -> int:
    check_out_file("--json", args.json)
    result = diagnose(args.checkpoint, args.split, args.episodes, data_root=args.data_root,
                      kd_weight=args.kd_weight, kd_temperature=args.kd_temperature, kd_views=args.kd_views)
    print(format_diagnostics(result))
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
