"""Compare finished cells across grids, episode by episode: ``python -m tsmd_ray.compare BASE OTHER...``.

Each argument is ``[LABEL=]FOLDER``: one cell (a folder with ``evaluation.json``) or a row of cells
(its ``seed*/`` subfolders, as ``reproduce`` writes them), for example

    python -m tsmd_ray.compare Student=runs/claim/grid/5-way-1-shot/student \\
        "Ours, views=runs/claim/views/5-way-1-shot/tsmd"

Every row is paired with the first (the baseline) on the training seeds both have: a seed's cells
were tested on the same seeded episodes when their dataset, ways, shots, query, seed and number
of test episodes agree (read from each cell's ``config.yaml``; anything else is refused), so the
difference is taken episode by episode (``tsmd_ray.tables``), per seed, pooled and across seeds.
A row's accuracy is that of its deployed model: the student, or for the oracle the adapted teacher.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import entry_point
from .tables import ROW_MODEL, fewer_seeds, fmt, md_row, pair_seeds
from .training import summarise

log = logging.getLogger("tsmd_ray.compare")

EPISODE_KEYS = ("dataset", "ways", "shots", "query", "seed")  # with the episode count: what fixes the test episodes


@dataclass(frozen=True)
class Row:
    label: str
    folder: Path
    episodes: dict[int, list[float]]  # seed -> per-episode accuracy of the row's deployed model
    keys: dict[int, dict[str, Any]]  # seed -> the config keys that fix its test episodes


def _cell(folder: Path) -> tuple[int, list[float], dict[str, Any]]:
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file (compare reads each cell's episodes from it)")
    config = yaml.safe_load(config_path.read_text())
    evaluation = json.loads((folder / "evaluation.json").read_text())
    model = ROW_MODEL[config["method"]]
    if model not in evaluation["results"]:
        raise ValueError(f"{folder}/evaluation.json: no {model} accuracies (method {config['method']})")
    return int(config["seed"]), evaluation["results"][model]["per_episode"], {k: config.get(k) for k in EPISODE_KEYS}


def load_row(spec: str) -> Row:
    """``[LABEL=]FOLDER``: a finished cell, or a folder of finished ``seed*`` cells (unfinished ones skipped)."""
    label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{spec}: {folder} is not a folder")
    cells = [folder] if (folder / "evaluation.json").is_file() else \
        sorted(p for p in folder.glob("seed*") if (p / "evaluation.json").is_file())
    if not cells:
        raise FileNotFoundError(f"{spec}: no finished cell in {folder} (neither evaluation.json nor seed*/evaluation.json)")
    episodes, keys = {}, {}
    for cell in cells:
        seed, per_episode, cell_keys = _cell(cell)
        episodes[seed], keys[seed] = per_episode, cell_keys
    return Row(label or str(folder), folder, episodes, keys)


def compare(rows: Sequence[Row]) -> dict[str, Any]:
    """Each row's accuracy (pooled and per seed) and its paired difference from ``rows[0]``."""
    base = rows[0]
    for row in rows[1:]:
        for seed in sorted(set(row.keys) & set(base.keys)):
            if row.keys[seed] != base.keys[seed]:
                differ = [k for k in EPISODE_KEYS if row.keys[seed][k] != base.keys[seed][k]]
                raise ValueError(f"{row.label} and {base.label}, seed {seed}: not the same test episodes "
                                 f"({', '.join(f'{k} {row.keys[seed][k]} vs {base.keys[seed][k]}' for k in differ)})")
    accuracy = {r.label: {"pooled": summarise([v for e in r.episodes.values() for v in e]),
                          "seeds": {seed: summarise(e) for seed, e in sorted(r.episodes.items())},
                          "folder": str(r.folder)} for r in rows}
    paired = {r.label: pair_seeds(r.episodes, base.episodes, f"{r.label} and {base.label} (seed {{seed}})")
              for r in rows[1:]}
    return {"baseline": base.label, "accuracy": accuracy, "paired": paired}


def markdown(data: dict[str, Any]) -> str:
    """The rows' accuracies, then their paired differences from the baseline (percent, mean ± 95% CI)."""
    seeds = sorted({s for a in data["accuracy"].values() for s in a["seeds"]})
    head = [f"seed {s}" for s in seeds]
    lines = [md_row("Row", ["pooled", *head]), "|---|" + "---|" * (1 + len(seeds))]
    lines += [md_row(label, [fmt(a["pooled"]) + fewer_seeds(a, seeds), *(fmt(a["seeds"].get(s)) for s in seeds)])
              for label, a in data["accuracy"].items()]
    lines += ["", "Test accuracy (%) of the deployed model, mean ± 95% CI over each cell's test episodes.", "",
              md_row("Paired difference", [*head, "pooled", "across seeds"]), "|---|" + "---|" * (2 + len(seeds))]
    for label, entry in data["paired"].items():
        name = f"{label} − {data['baseline']}"
        if entry is None:
            lines.append(md_row(name, ["—"] * (2 + len(seeds))))
            continue
        across = entry["across_seeds"]
        lines.append(md_row(name, [*(fmt(entry["per_seed"].get(s), True) for s in seeds), fmt(entry["pooled"], True),
                                   fmt(across, True) + f" (n={across['seeds']})" if across["seeds"] > 1 else "—"]))
    lines += ["", "Percentage points on the same seeded test episodes: per training seed; pooled over the seeds' "
              "episodes (test-episode error only); across seeds, a 95% t-interval over the per-seed means "
              "(what a new training seed changes too)."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", metavar="[LABEL=]FOLDER",
                        help="the baseline, then the rows to pair with it: a cell or a folder of seed* cells")
    parser.add_argument("--out", metavar="PREFIX", help="also write PREFIX.md and PREFIX.json")
    return parser


def _main(args: argparse.Namespace) -> int:
    if len(args.rows) < 2:
        raise ValueError("rows: give a baseline and at least one row to compare with it")
    data = compare([load_row(spec) for spec in args.rows])
    text = markdown(data)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.md").write_text(text)
        Path(f"{args.out}.json").write_text(json.dumps(data, indent=2))
    print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
