"""Table 1 from a grid's finished cells: pooled accuracies over seeds and paired differences.

Every cell (setting, method, seed) holds an ``evaluation.json`` whose per-episode accuracies come
from the same seeded test episodes for every method of that seed, so two methods can be compared
episode by episode: the paired difference ``d_i = acc_A(episode i) - acc_B(episode i)`` cancels the
difficulty of each episode and sees effects far smaller than the accuracies' own intervals.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .training import summarise

ROW_NAMES = {"student": "Student", "fixed-teacher": "Fixed teacher", "tsmd": "Ours", "oracle": "Oracle"}
# the model whose accuracy a method's row reports: the oracle has no student, it is the adapted teacher
ROW_MODEL = {"student": "student", "fixed-teacher": "student", "tsmd": "student", "oracle": "teacher"}
FAILED = "failed.json"
BASELINE = "student"
SEED_STYLES = ("-", "--", ":", "-.")  # a method's seeds in the validation curves
COLOURS = {"student": "#1f77b4", "fixed-teacher": "#2ca02c", "tsmd": "#d62728", "oracle": "#7f7f7f"}


def validation_metric(method: str) -> str:
    """The meta-validation metric of a row's model: what early stopping selects on, what curves draw."""
    return f"val/{ROW_MODEL[method]}_acc"


class CellLike(Protocol):
    setting: str
    method: str
    seed: int

    @property
    def out(self) -> Path: ...


def _summary(values: Sequence[float]) -> dict[str, Any]:
    return summarise(values) if values else {}


def collect(cells: Sequence[CellLike]) -> dict[str, Any]:
    """Table data from the cells' ``evaluation.json`` files (missing cells are left out).

    ``table[method][setting]``: per model, the accuracy pooled over the finished seeds' episodes, and
    each seed's own summary; ``paired[method][setting]``: ``method - student`` per seed and pooled.
    """
    settings = list(dict.fromkeys(c.setting for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    episodes: dict[tuple[str, str], dict[int, dict[str, list[float]]]] = {}
    failures: dict[tuple[str, str], list[str]] = {}
    walls: dict[tuple[str, str], float] = {}
    teacher_files: dict[str, dict[str, list[str]]] = {}  # setting -> teacher file sha256 -> cells
    for cell in cells:
        key = (cell.method, cell.setting)
        path = cell.out / "evaluation.json"
        if path.is_file():
            evaluation = json.loads(path.read_text())
            results = evaluation["results"]
            if cell.method != "student":
                sha = evaluation.get("teacher_init_sha256") or "unrecorded"
                teacher_files.setdefault(cell.setting, {}).setdefault(sha, []).append(
                    f"{ROW_NAMES[cell.method]} seed {cell.seed}")
            episodes.setdefault(key, {})[cell.seed] = {m: r["per_episode"] for m, r in results.items()}
            wall = cell.out / "wall.json"
            if wall.is_file():
                walls[key] = walls.get(key, 0.0) + json.loads(wall.read_text())["wall_s"]
        elif (cell.out / FAILED).is_file():
            failures.setdefault(key, []).append(f"seed {cell.seed}: " + json.loads((cell.out / FAILED).read_text())["error"])
    table: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for (method, setting), by_seed in episodes.items():
        models = sorted({m for per_model in by_seed.values() for m in per_model})
        pooled = {m: _summary([v for s in by_seed.values() for v in s.get(m, [])]) for m in models}
        entry = {**pooled[ROW_MODEL[method]], "model": ROW_MODEL[method], "all": pooled,
                 "seeds": {seed: summarise(per_model[ROW_MODEL[method]]) for seed, per_model in sorted(by_seed.items())}}
        if (method, setting) in walls:
            entry["wall_s"] = walls[(method, setting)]
        if (method, setting) in failures:
            entry["partly_failed"] = failures[(method, setting)]
        table[method][setting] = entry
    for (method, setting), errors in failures.items():
        table[method].setdefault(setting, {"failed": "; ".join(errors)})
    return {"settings": settings, "methods": methods, "seeds": seeds, "table": table,
            "paired": paired_differences(episodes, methods, settings), "teacher_files": teacher_files}


def paired_differences(episodes: dict[tuple[str, str], dict[int, dict[str, list[float]]]], methods: Sequence[str],
                       settings: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``method - student`` on the row models' per-episode accuracies, per seed and pooled over seeds."""
    paired: dict[str, dict[str, Any]] = {}
    for method in (m for m in methods if m != BASELINE):
        for setting in settings:
            mine, base = episodes.get((method, setting), {}), episodes.get((BASELINE, setting), {})
            entry = pair_seeds({seed: e[ROW_MODEL[method]] for seed, e in mine.items()},
                               {seed: e[ROW_MODEL[BASELINE]] for seed, e in base.items()},
                               f"{method} and {BASELINE} ({setting}, seed {{seed}})")
            if entry:
                paired.setdefault(method, {})[setting] = entry
    return paired


def pair_seeds(mine: dict[int, list[float]], base: dict[int, list[float]], what: str) -> dict[str, Any] | None:
    """``mine - base`` episode by episode on every seed both have: per seed, pooled over the seeds'
    episodes and across seeds (``what`` names the pair in errors, ``{seed}`` filled in); None if no seed is shared."""
    per_seed = {}
    for seed in sorted(set(mine) & set(base)):
        a, b = mine[seed], base[seed]
        if len(a) != len(b):
            raise ValueError(f"{what.format(seed=seed)} were tested on {len(a)} and {len(b)} episodes: paired "
                             "differences need the same episodes")
        per_seed[seed] = [x - y for x, y in zip(a, b)]
    if not per_seed:
        return None
    means = [summarise(d)["mean"] for d in per_seed.values()]
    return {"per_seed": {seed: summarise(d) for seed, d in per_seed.items()},
            "pooled": summarise([v for d in per_seed.values() for v in d]),
            "across_seeds": across_seeds(means),
            "seed_means": {"min": min(means), "max": max(means)}}


# Student's t, 97.5% quantile, for 1-10 degrees of freedom; beyond, a Cornish-Fisher expansion
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def across_seeds(means: Sequence[float]) -> dict[str, float]:
    """Mean of the per-seed differences and its 95% t-interval over seeds: the uncertainty of what a
    new training seed gives (the pooled interval counts test episodes only, the seeds as fixed)."""
    n = len(means)
    mean = sum(means) / n
    if n < 2:
        return {"mean": mean, "ci95": float("nan"), "seeds": n}
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1))
    df, z = n - 1, 1.959964
    t = T975[df - 1] if df <= len(T975) else z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return {"mean": mean, "ci95": t * sd / math.sqrt(n), "seeds": n}


def fmt(entry: dict[str, Any] | None, signed: bool = False) -> str:
    if entry is None:
        return "—"
    if "failed" in entry:
        return "failed†"
    sign = "+" if signed else ""
    return f"{100 * entry['mean']:{sign}.2f} ± {100 * entry['ci95']:.2f}"


def _scored(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m: {s: e for s, e in row.items() if "failed" not in e} for m, row in table.items()}


def fewer_seeds(entry: dict[str, Any] | None, seeds: Sequence[int]) -> str:
    """`` (seed 0)`` for a cell pooled over fewer finished seeds than the grid has; else nothing."""
    done = sorted(entry["seeds"]) if entry and "seeds" in entry else []
    if not done or len(done) >= len(seeds):
        return ""
    return f" (seed{'s' if len(done) > 1 else ''} {', '.join(map(str, done))})"


def md_row(name: str, cells: Sequence[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def markdown_table(data: dict[str, Any], title: str | None = None) -> str:
    """Table 1 (bold: best student), the teachers inside the student runs, and the paired differences."""
    settings, table, every = data["settings"], _scored(data["table"]), data["table"]
    seeds = data.get("seeds") or []
    students = [m for m in data["methods"] if m != "oracle"]  # the oracle's row is a reference, never ranked
    partial = {(m, s) for m in students for s, e in table[m].items() if fewer_seeds(e, seeds)}
    # a cell pooled over fewer seeds than the grid's is not ranked against the others
    ranked = {s: [m for m in students if s in table[m] and (m, s) not in partial] for s in settings}
    best = {s: max((table[m][s]["mean"] for m in ranked[s]), default=None) for s in settings}
    lines = [f"### {title}", ""] if title else []
    lines += [md_row("Method", settings), "|---|" + "---|" * len(settings)]
    for method in data["methods"]:
        cells = []
        for s in settings:
            text = fmt(every[method].get(s))
            entry = table[method].get(s)
            if method in ranked[s] and entry["mean"] == best[s]:
                text = f"**{text}**"
            cells.append(text + fewer_seeds(entry, seeds))
        lines.append(md_row(ROW_NAMES[method], cells))
    episodes = sorted({e["episodes"] for row in table.values() for e in row.values()})
    pooled = (f", pooled over {len(seeds)} training seeds ({', '.join(map(str, seeds))}) or over those a cell "
              "names" if len(seeds) > 1 else "")
    lines += ["", f"Test accuracy (%), mean ± 95% confidence interval over {'/'.join(map(str, episodes)) or '?'} "
              f"test episodes per cell{pooled}; Oracle is the adapted teacher, every other row the student. "
              "Bold: best student" + (" among the cells with every seed (a cell naming its seeds is not ranked)."
                                      if partial else ".")]
    for method, row in every.items():
        for setting, entry in row.items():
            error = entry.get("failed") or "; ".join(entry.get("partly_failed", []))
            if error:
                lines.append(f"\n† {ROW_NAMES[method]}, {setting}: {error}")
    lines += _teacher_file_lines(data) + _teacher_lines(data, table) + _paired_lines(data)
    return "\n".join(lines) + "\n"


def _teacher_file_lines(data: dict[str, Any]) -> list[str]:
    """Which pre-trained teacher file (``teacher_init``, by sha256) the teacher rows started from; a
    column whose cells started from different files is flagged (its rows are not comparable)."""
    files = data.get("teacher_files") or {}
    shas = {sha for by_sha in files.values() for sha in by_sha}
    if not shas or shas == {"unrecorded"}:
        return []
    short = lambda sha: sha if sha == "unrecorded" else f"`{sha[:8]}…{sha[-6:]}`"  # noqa: E731
    if len(shas) == 1:
        return ["", f"Teacher file (sha256 of `teacher_init`): {short(shas.pop())} in every cell with a teacher."]
    lines = []
    for setting, by_sha in files.items():
        if len(by_sha) > 1:
            lines.append(f"\n**Different teacher files in {setting}**: " + "; ".join(
                f"{short(sha)} ({', '.join(names)})" for sha, names in by_sha.items()) + ".")
    return lines or ["", "Teacher files (sha256 of `teacher_init`) by setting: " + "; ".join(
        f"{setting}: {short(next(iter(by_sha)))}" for setting, by_sha in files.items()) + "."]


def _teacher_lines(data: dict[str, Any], table: dict[str, dict[str, Any]]) -> list[str]:
    rows = {m: {s: e["all"]["teacher"] for s, e in table[m].items() if "teacher" in e["all"]}
            for m in data["methods"] if m == "tsmd" and m in table}
    rows = {m: r for m, r in rows.items() if r}
    if not rows:
        return []
    lines = ["", "Teachers inside the student runs (query accuracy of the adapted teacher):", "",
             md_row("Teacher of", data["settings"]), "|---|" + "---|" * len(data["settings"])]
    return lines + [md_row(ROW_NAMES[m], [fmt(r.get(s)) for s in data["settings"]]) for m, r in rows.items()]


def _paired_lines(data: dict[str, Any]) -> list[str]:
    paired = data.get("paired") or {}
    if not paired:
        return []
    settings = data["settings"]
    lines = ["", f"Paired differences against {ROW_NAMES[BASELINE]} (percentage points, mean ± 95% CI over the "
             "same seeded test episodes; per training seed, then pooled over the seeds' episodes, which counts "
             "test-episode error only; then across seeds: the mean of the per-seed differences with a 95% "
             "t-interval over seeds, which also counts what a new training seed changes):", "",
             md_row("Difference", settings), "|---|" + "---|" * len(settings)]
    for method, by_setting in paired.items():
        name = f"{ROW_NAMES[method]} − {ROW_NAMES[BASELINE]}"
        seeds = sorted({seed for entry in by_setting.values() for seed in entry["per_seed"]})
        for seed in seeds:
            lines.append(md_row(f"{name}, seed {seed}", [fmt(by_setting.get(s, {}).get("per_seed", {}).get(seed), True)
                                                         for s in settings]))
        if len(seeds) > 1:
            lines.append(md_row(f"**{name}, pooled**", [fmt(by_setting[s]["pooled"], True) if s in by_setting else "—"
                                                         for s in settings]))
            lines.append(md_row(f"**{name}, across seeds**",
                                [fmt(by_setting[s]["across_seeds"], True) + f" (n={by_setting[s]['across_seeds']['seeds']})"
                                 if s in by_setting and by_setting[s]["across_seeds"]["seeds"] > 1 else "—"
                                 for s in settings]))
    return lines


def plot_table(data: dict[str, Any], out: str | Path, title: str | None = None) -> Path:
    """Grouped bars: one group per setting, one bar per method, 95% CI as error bars."""
    from .plots import fit_title, plt, save_figure

    settings, methods, table = data["settings"], data["methods"], _scored(data["table"])
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.55 * len(settings) * len(methods)), 4.8))
    for j, method in enumerate(methods):
        xs, means, cis = [], [], []
        for i, s in enumerate(settings):
            if s in table[method]:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                means.append(100 * table[method][s]["mean"])
                cis.append(100 * table[method][s]["ci95"])
        bars = ax.bar(xs, means, width, yerr=cis, capsize=3, label=ROW_NAMES[method], color=COLOURS.get(method))
        for bar, mean in zip(bars, means):
            ax.annotate(f"{mean:.1f}", (bar.get_x() + bar.get_width() / 2, mean), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax.set_ylim(0, 100)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings)
    ax.set_ylabel("test accuracy (%), 95% CI")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(methods), fontsize=8, frameon=False)
    if title:
        ax.set_title(fit_title(fig, title))
    return save_figure(fig, out, dpi=110)


def curve_label(cell: CellLike) -> str:
    """A validation curve's legend entry: row name and seed; a cell without ``evaluation.json`` is unfinished."""
    running = "" if (cell.out / "evaluation.json").is_file() else ", unfinished"
    return f"{ROW_NAMES[cell.method]} (seed {cell.seed}{running})"


def plot_validation_curves(cells: Sequence[CellLike], out: str | Path, title: str | None = None) -> Path | None:
    """Meta-validation accuracy of each cell's row model against the iteration, one panel per setting,
    one line per method and seed (dots: the best validation, the weights early stopping tests); cells
    still training (no ``evaluation.json``) are drawn too, marked unfinished in the legend."""
    from .plots import fit_title, plt, read_metrics, save_figure, series

    settings = list(dict.fromkeys(c.setting for c in cells))
    curves = [(c, series(read_metrics(c.out / "metrics.jsonl")).get(validation_metric(c.method)))
              for c in cells if (c.out / "metrics.jsonl").is_file()]
    if not any(curve for _, curve in curves):
        return None
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for cell, curve in curves:
            if cell.setting != setting or not curve:
                continue
            steps, values = curve
            best = max(range(len(values)), key=values.__getitem__)
            ax.plot(steps, [100 * v for v in values], color=COLOURS[cell.method], alpha=0.8, lw=1.2,
                    label=curve_label(cell), linestyle=SEED_STYLES[cell.seed % len(SEED_STYLES)])
            ax.plot(steps[best], 100 * values[best], "o", color=COLOURS[cell.method], ms=4)
        ax.set_title(setting)
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("meta-validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(fit_title(fig, title))
    return save_figure(fig, out, dpi=100)
