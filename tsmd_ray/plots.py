"""Figures of a run or of several: learning curves and accuracy bars with 95% confidence intervals.

- :func:`plot_learning_curves` reads a run's ``metrics.jsonl`` (``train/...``, ``val/...``,
  ``test/...`` records written by :class:`tsmd_ray.training.Trainer`) and draws the query loss,
  the query accuracy with meta-validation accuracy on top, and tasks/s against meta-iterations.
- :func:`plot_evaluations` draws one group of bars per evaluation (``evaluation.json`` of
  ``tsmd_ray.train`` or ``tsmd_ray.evaluate``), one bar per model (student, teacher) with its
  95% confidence interval as error bar.

Matplotlib runs headless (Agg); nothing here needs a display.
"""
from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: Ray workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MODEL_ORDER = ("student", "teacher")
COLOURS = {"student": "#1f77b4", "teacher": "#ff7f0e"}


# ---------------------------------------------------------------------- reading
def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Records of a ``metrics.jsonl`` (``{"step": int, name: value, ...}`` per line).

    Lines that do not parse (a run killed while writing one) are skipped.
    """
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def series(records: Iterable[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}``; a step logged twice (a resumed run) keeps its last value."""
    by_name: dict[str, dict[int, float]] = {}
    for record in records:
        step = int(record["step"])
        for name, value in record.items():
            if name == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            by_name.setdefault(name, {})[step] = float(value)
    return {name: (sorted(values), [values[s] for s in sorted(values)]) for name, values in by_name.items()}


def _smooth(values: Sequence[float], window: int) -> list[float]:
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ---------------------------------------------------------------------- learning curves
def plot_learning_curves(metrics: str | Path | Sequence[Mapping[str, Any]], out: str | Path,
                         title: str | None = None) -> Path:
    """Write a PNG of the run's learning curves to ``out``; returns its path.

    ``metrics`` is a ``metrics.jsonl`` path or its records. Training curves are drawn raw (thin)
    and as a moving average (thick); meta-validation accuracy as markers on the accuracy panel.
    """
    records = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    data = series(records)
    train_loss = {k: v for k, v in data.items() if k.startswith("train/") and k.endswith("/loss")}
    train_acc = {k: v for k, v in data.items() if k.startswith("train/") and k.endswith("/acc")}
    val_acc = {k: v for k, v in data.items() if k.startswith("val/") and k.endswith("_acc")}
    speed = data.get("train/tasks_per_s")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    longest = max((len(s) for s, _ in data.values()), default=1)
    window = max(1, longest // 20)
    for ax, curves, ylabel in ((axes[0], train_loss, "query loss"), (axes[1], train_acc, "query accuracy")):
        for name, (steps, values) in sorted(curves.items()):
            model = name.split("/")[1]
            colour = COLOURS.get(model)
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values, window), color=colour, linewidth=2, label=f"{model} (train)")
        ax.set_xlabel("meta-iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for name, (steps, values) in sorted(val_acc.items()):
        model = name.split("/", 1)[1].removesuffix("_acc")
        axes[1].plot(steps, values, "o--", color=COLOURS.get(model), label=f"{model} (meta-val)")
    for name, (steps, values) in sorted(data.items()):
        if name.startswith("test/") and name.endswith("_acc"):
            model = name.split("/", 1)[1].removesuffix("_acc")
            axes[1].plot(steps, values, "*", markersize=14, color=COLOURS.get(model), label=f"{model} (meta-test)")
    axes[1].set_ylim(0, 1)
    if train_loss:
        axes[0].legend()
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    if speed:
        steps, values = speed
        axes[2].plot(steps, values, color="grey", alpha=0.4, linewidth=0.8)
        axes[2].plot(steps, _smooth(values, window), color="black", linewidth=2)
    axes[2].set_xlabel("meta-iteration")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_ylabel("tasks / s")
    axes[2].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def fit_title(fig: Any, title: str, fontsize: float = 12.0) -> str:
    """``title`` wrapped to the figure's width, so a long one is not clipped at its edges."""
    return textwrap.fill(title, width=max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize))))


def save_figure(fig: Any, out: str | Path, dpi: int = 100) -> Path:
    """Lay out ``fig``, write it as a PNG to ``out`` (folders created) and close it."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------- evaluations
def _load_evaluation(item: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    return json.loads(Path(item).read_text())


def evaluation_label(evaluation: Mapping[str, Any]) -> str:
    """``method`` plus the task setting, e.g. ``tsmd (omniglot 5-way 1-shot)``."""
    parts = [str(evaluation.get("method", "?"))]
    setting = []
    if "dataset" in evaluation:
        setting.append(str(evaluation["dataset"]))
    if "ways" in evaluation and "shots" in evaluation:
        setting.append(f"{evaluation['ways']}-way {evaluation['shots']}-shot")
    if setting:
        parts.append(f"({' '.join(setting)})")
    return " ".join(parts)


def plot_evaluations(evaluations: Sequence[str | Path | Mapping[str, Any]], out: str | Path,
                     labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Bar chart of several evaluations: one group per evaluation, one bar per model, error bars
    of the 95% confidence interval, accuracies in percent. Returns the PNG path.

    ``evaluations`` are ``evaluation.json`` paths or their dicts (``{"method", "results":
    {"student": {"mean", "ci95", "episodes"}, ...}, ...}``). ``labels`` name the groups
    (default: method and setting; the setting is dropped when every evaluation shares it).
    """
    loaded = [_load_evaluation(e) for e in evaluations]
    if not loaded:
        raise ValueError("plot_evaluations needs at least one evaluation")
    if labels is None:
        full = [evaluation_label(e) for e in loaded]
        settings = {label.partition(" ")[2] for label in full}
        labels = [str(e.get("method", "?")) for e in loaded] if len(settings) == 1 else full
        if len(set(labels)) < len(labels):  # same method twice: number them
            labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    if len(labels) != len(loaded):
        raise ValueError(f"{len(labels)} labels for {len(loaded)} evaluations")
    present = {m for e in loaded for m in e.get("results", {})}
    models = [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))
    if not models:
        raise ValueError("the evaluations hold no results")

    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(loaded) * len(models) + 2), 4.5))
    for j, model in enumerate(models):
        xs, means, cis = [], [], []
        for i, evaluation in enumerate(loaded):
            result = evaluation.get("results", {}).get(model)
            if result is None:
                continue
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            means.append(100 * float(result["mean"]))
            ci = float(result.get("ci95", 0.0))
            cis.append(100 * ci if math.isfinite(ci) else 0.0)
        bars = ax.bar(xs, means, width, yerr=cis, capsize=4, label=model,
                      color=COLOURS.get(model), alpha=0.9)
        for bar, mean, ci in zip(bars, means, cis):
            ax.annotate(f"{mean:.1f}±{ci:.1f}", (bar.get_x() + bar.get_width() / 2, mean + ci),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(loaded)))
    ax.set_xticklabels(labels, rotation=15 if max(len(lbl) for lbl in labels) > 12 else 0, ha="center")
    ax.set_ylabel("test accuracy (%) with 95% CI")
    ax.set_ylim(0, 118)  # room above 100% for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncol=len(models), frameon=False)
    episodes = sorted({int(r.get("episodes", 0)) for e in loaded for r in e.get("results", {}).values()})
    subtitle = f"{'/'.join(map(str, episodes))} test episodes" if episodes else ""
    ax.set_title(title or subtitle)
    return save_figure(fig, out)
