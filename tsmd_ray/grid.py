"""A grid file (``configs/*.yaml``) and its cells: one :class:`~tsmd_ray.config.Config` per (setting,
method, seed), where it trains, how far it has come and whether it has finished (format:
``configs/README.md``). ``tsmd_ray.reproduce`` trains the cells; ``tsmd_ray.tables`` turns them into
the table."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import load_checkpoint
from .config import METHODS, RESUMABLE_KEYS, Config, changed_keys, load_yaml
from .errors import RequestError, one_line
from .tables import FAILED, ROW_MODEL, ROW_NAMES, md_row, validation_metric

log = logging.getLogger("tsmd_ray.grid")


@dataclass(frozen=True)
class Cell:
    setting: str
    method: str
    cfg: Config

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.method}/seed {self.seed}"

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


GRID_KEYS = ("name", "description", "base_from", "base", "methods", "settings", "method_overrides", "runner", "notes",
             "mlflow", "seeds")


def _grid_error(path: str | Path, key: str, accepted: str, got: Any) -> RequestError:
    return RequestError("grid", f"grid {path}: {key} must be {accepted}, got {got!r}")


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read and check a grid file (the cells' configs are checked by :func:`expand`)."""
    grid = load_yaml(path)
    grid["base"], grid["method_overrides"] = _inherited(path, grid)
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise _grid_error(path, "every key", f"one of {', '.join(GRID_KEYS)}", unknown[0])
    settings = grid.get("settings")
    if not settings or not isinstance(settings, list) or not all(isinstance(s, dict) for s in settings):
        raise _grid_error(path, "settings", "a non-empty list of mappings (table columns)", settings)
    methods = grid.setdefault("methods", list(METHODS))
    bad = [m for m in methods if m not in METHODS] if isinstance(methods, list) else [methods]
    if bad:
        raise _grid_error(path, "methods", f"a list of {', '.join(METHODS)}", bad[0])
    seeds = grid.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(type(k) is int for k in seeds)):
        raise _grid_error(path, "seeds", "a non-empty list of integers", seeds)
    for setting in settings:
        overrides = setting.get("method_overrides", {})
        if not (isinstance(overrides, dict) and all(isinstance(v, dict) for v in overrides.values())):
            raise _grid_error(path, f"method_overrides of setting {setting_label(setting)!r}",
                              "a mapping of methods to mappings", overrides)
    grid.setdefault("name", Path(path).stem)
    if grid.get("runner", "tasks") not in ("tasks", "inline"):
        raise _grid_error(path, "runner", "tasks or inline", grid["runner"])
    return grid


def _inherited(path: str | Path, grid: dict[str, Any],
               seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The grid's ``base`` and ``method_overrides``: with ``base_from: other.yaml`` (beside this file),
    that grid's, with this one's keys on top (per method for ``method_overrides``). ``base_from`` is
    taken out of ``grid``: the copy reproduce writes to ``OUT/grid.yaml`` then stands on its own."""
    base, overrides = grid.get("base") or {}, grid.get("method_overrides") or {}
    if not isinstance(base, dict):
        raise _grid_error(path, "base", "a mapping", base)
    if not (isinstance(overrides, dict) and all(isinstance(v, dict) for v in overrides.values())):
        raise _grid_error(path, "method_overrides", "a mapping of methods to mappings", overrides)
    if "base_from" not in grid:
        return base, overrides
    parent, seen = Path(path).parent / str(grid.pop("base_from")), (*seen, Path(path).resolve())
    if parent.resolve() in seen:
        raise _grid_error(path, "base_from", "a grid that does not lead back to this one", str(parent))
    if not parent.is_file():
        raise _grid_error(path, "base_from", "a grid file beside this one", str(parent))
    parent_base, parent_overrides = _inherited(parent, load_yaml(parent), seen)
    methods = {**parent_overrides, **overrides}
    return {**parent_base, **base}, {m: {**parent_overrides.get(m, {}), **overrides.get(m, {})} for m in methods}


def setting_label(setting: dict[str, Any]) -> str:
    if "label" in setting:
        return str(setting["label"])
    return f"{setting.get('ways', 5)}-way {setting.get('shots', 1)}-shot"


def grid_out(grid: dict[str, Any], out: str | Path | None = None) -> Path:
    """Where the grid's cells train: ``out``, by default ``runs/<grid name>``."""
    return Path(out or Path("runs") / grid["name"])


def expand(grid: dict[str, Any], out: str | Path, resume: bool = False) -> list[Cell]:
    """The grid's cells, settings-major (the order of the table's columns, then rows, then seeds).

    A cell's config is ``base``, then its setting, then its method's ``method_overrides`` (the grid's,
    then the setting's own). With ``seeds: [...]`` every (setting, method) is trained once per seed in
    ``.../seed<k>/``; a method's ``seeds`` in ``method_overrides`` replaces the list for that method.
    """
    cells = []
    for setting in grid["settings"]:
        label = setting_label(setting)
        values = {k: v for k, v in setting.items() if k not in ("label", "method_overrides")}
        for method in grid["methods"]:
            overrides = {**grid["method_overrides"].get(method, {}),
                         **setting.get("method_overrides", {}).get(method, {})}
            seeds = overrides.pop("seeds", grid.get("seeds"))
            for seed in seeds or [None]:
                folder = Path(out) / slug(label) / method
                data = {**grid["base"], **values, **overrides, "method": method,
                        "out": str(folder / f"seed{seed}" if seed is not None else folder), "resume": resume}
                if seed is not None:
                    data["seed"] = seed
                cells.append(Cell(label, method, _cell_config(grid, f"{label}/{method}/seed {seed}", data)))
    return cells


def _cell_config(grid: dict[str, Any], cell: str, data: dict[str, Any]) -> Config:
    """A cell's Config; a refusal names the grid and the cell."""
    try:
        return Config.from_dict(data)
    except RequestError as exc:
        raise RequestError(exc.rule, f"grid {grid['name']!r}, cell {cell}: {exc}") from None


def saved_evaluation(cell: Cell) -> tuple[dict[str, Any] | None, list[str]]:
    """The cell's ``evaluation.json`` (None if absent or unreadable) and the keys in which the
    ``config.yaml`` beside it differs from the cell's config."""
    evaluation, config = cell.out / "evaluation.json", cell.out / "config.yaml"
    if not evaluation.is_file():
        return None, []
    try:
        data = json.loads(evaluation.read_text())
        saved = yaml.safe_load(config.read_text()) if config.is_file() else {}
    except (json.JSONDecodeError, yaml.YAMLError):
        return None, []
    return data, changed_keys(saved, cell.cfg)


def finished(cell: Cell) -> bool:
    """The cell's ``evaluation.json`` exists and its ``config.yaml`` is the cell's config."""
    evaluation, differ = saved_evaluation(cell)
    if evaluation is not None and differ:
        log.warning("cell %s has results from another config (%s differ): training it again",
                    cell.name, ", ".join(differ[:5]))
    return evaluation is not None and not differ


def stale_checkpoint(cell: Cell) -> list[str]:
    """The keys in which the cell's ``checkpoint.pt`` was trained otherwise than the grid asks (beyond
    those a resumed run may change, such as ``patience``): such a checkpoint must not be resumed."""
    path = cell.out / "checkpoint.pt"
    return changed_keys(load_checkpoint(path)["config"], cell.cfg, RESUMABLE_KEYS) if path.is_file() else []


def progress(cell: Cell) -> dict[str, Any]:
    """Where a cell stands, from its files: ``state`` (finished, failed, unfinished, not started), the
    last meta-iteration logged, the best and the last meta-validation of its row's model (the one the
    table reports), and once finished its test accuracy and the iteration whose weights were tested."""
    from .plots import read_metrics, series  # matplotlib only when asked

    metrics = cell.out / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    row: dict[str, Any] = {"state": "unfinished" if records else "not started", "iterations": cell.cfg.iterations,
                           "iteration": max((int(r["step"]) for r in records if any(k.startswith("train/") for k in r)),
                                            default=0)}
    curve = series(records).get(validation_metric(cell.method))
    if curve:
        steps, values = curve
        best = max(range(len(values)), key=values.__getitem__)
        row.update(best_val=values[best], best_at=steps[best], last_val=values[-1], last_at=steps[-1])
    evaluation, differ = saved_evaluation(cell)
    if evaluation is not None and not differ:
        result = evaluation["results"][ROW_MODEL[cell.method]]
        row.update(state="finished", test=result["mean"], test_ci95=result.get("ci95"),
                   tested_at=evaluation.get("tested_iteration"))
    elif evaluation is not None:
        row["state"] = f"results of another config ({', '.join(differ[:3])})"
    elif (cell.out / FAILED).is_file():
        row.update(state="failed", error=json.loads((cell.out / FAILED).read_text())["error"])
    return row


def progress_table(cells: Sequence[Cell]) -> str:
    """A markdown table of :func:`progress`, one line per cell (accuracies in percent)."""
    def pct(value: float | None, at: int | None, ci95: float | None = None) -> str:
        if value is None:
            return "—"
        ci = f" ± {100 * ci95:.2f}" if ci95 is not None else ""
        return f"{100 * value:.2f}{ci}" + (f" (at {at:,})" if at is not None else "")

    lines = [md_row("Cell", ["State", "Iteration", "Best validation", "Last validation", "Test (weights of)"]),
             md_row("---", ["---"] * 5)]
    for cell in cells:
        p = progress(cell)
        state = (p["state"] + (f": {one_line(p['error'])[:80]}" if "error" in p else "")).replace("|", "\\|")
        lines.append(md_row(f"{cell.setting} / {ROW_NAMES[cell.method]} / seed {cell.seed}",
                            [state, f"{p['iteration']:,} / {p['iterations']:,}",
                             pct(p.get("best_val"), p.get("best_at")), pct(p.get("last_val"), p.get("last_at")),
                             pct(p.get("test"), p.get("tested_at"), p.get("test_ci95"))]))
    return "\n".join(lines) + "\n"


def check_methods(grid: dict[str, Any], methods: Sequence[str] | None, grid_path: str | Path) -> None:
    """Refuse ``--methods`` that are not rows of the grid."""
    unknown = sorted(set(methods or ()) - set(grid["methods"]))
    if unknown:
        raise RequestError("grid", f"--methods {', '.join(unknown)}: accepted the grid's methods "
                           f"({', '.join(grid['methods'])}) in {grid_path}")


def write_configs(grid_path: str | Path, folder: str | Path, out: str | Path | None = None,
                  methods: Sequence[str] | None = None) -> list[Path]:
    """One ``python -m tsmd_ray.train --config`` YAML per cell of the grid (of ``methods`` if given)."""
    grid = load_grid(grid_path)
    check_methods(grid, methods, grid_path)
    paths = []
    for cell in expand(grid, grid_out(grid, out)):
        if methods and cell.method not in methods:
            continue
        seed = f"-seed{cell.seed}" if grid.get("seeds") else ""
        path = Path(folder) / f"{grid['name']}-{slug(cell.setting)}-{cell.method}{seed}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        cell.cfg.to_yaml(path)
        paths.append(path)
    return paths
