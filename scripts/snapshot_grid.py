"""Table, validation curves and the small per-cell records of a grid's finished cells, without training.

    python scripts/snapshot_grid.py --grid configs/omniglot-claim.yaml --out runs/claim/grid \
        --dest docs/results/omniglot-claim

Long grids outlive a working session: this commits what has finished (evaluation.json with the
per-episode accuracies, config.yaml, wall.json, metrics.jsonl for the curves) so that the table and
the curves can be rebuilt and extended later: copy ``DEST/cells/*`` back into ``--out`` and
``reproduce --resume`` skips them.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tsmd_ray.grid import expand, load_grid
from tsmd_ray.tables import collect, markdown_table, plot_table, plot_validation_curves

RECORDS = ("evaluation.json", "config.yaml", "wall.json", "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True)
    parser.add_argument("--out", required=True, help="the grid's output folder (reproduce --out)")
    parser.add_argument("--dest", required=True, help="where the snapshot is written")
    args = parser.parse_args()
    grid = load_grid(args.grid)
    cells = expand(grid, args.out)
    data = collect(cells)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    title = grid.get("description") or grid["name"]
    (dest / "results.md").write_text(markdown_table(data, title))
    (dest / "results.json").write_text(json.dumps(data, indent=2))
    if any("mean" in e for row in data["table"].values() for e in row.values()):
        plot_table(data, dest / "results.png", title)
    plot_validation_curves(cells, dest / "validation_curves.png", title)
    for cell in cells:
        if (cell.out / "evaluation.json").is_file():
            target = dest / "cells" / cell.out.relative_to(args.out)
            target.mkdir(parents=True, exist_ok=True)
            for name in RECORDS:
                if (cell.out / name).is_file():
                    shutil.copy(cell.out / name, target / name)
    print((dest / "results.md").read_text())


if __name__ == "__main__":
    main()
