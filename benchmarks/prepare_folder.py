#!/usr/bin/env python
"""Throughput and peak memory of ``prepare folder`` (issue 12) on a generated ImageFolder tree.

Generates ``max(--images)`` images once (random sizes 28-84 px, half PNG half JPEG, a quarter
grayscale, ``--per-class`` per class) under ``--work``; a run on N images reads a tree of symbolic
links to the first N / per-class classes. Each run is ``python -m tsmd_ray.data prepare folder`` in a
child process (output ``--image-size``, RGB, ``--workers`` decoding processes), sampled every 50 ms:

- ``images_per_s``: images / wall seconds of the preparation itself, listing the files included
  (from the child's first log line, after its imports, to its summary line; ``startup_s`` is the
  imports);
- ``cpu_s``: CPU seconds of the whole run (imports and decoding processes included), which
  depends much less than wall time on what else runs on the machine: the difference between two
  runs divided by the difference in images is the CPU cost of one image;
- ``main_anon_before_mb``: the main process's anonymous memory (``RssAnon``) once imported, before
  the first image; ``peak_main_anon_mb``: its largest sampled value, so the difference is what
  preparing costs in that process;
- ``peak_main_rss_mb``: the main process's peak RSS (``VmHWM``). It is dominated by torch, which
  ``tsmd_ray.data`` imports (about 760 MB resident, 470 MB of it library files, and a transient
  ~170 MB more of library pages while the interpreter exits), so it varies by that much between runs;
- ``peak_tree_pss_anon_mb`` / ``peak_tree_pss_mb``: the largest sum of anonymous / all PSS over
  the process tree (main and decoding processes; pages shared after ``fork`` counted once).

Usage: ``python benchmarks/prepare_folder.py [--images 5000 20000] [--workers 2] [--json-out F]``;
prints one JSON object per run and a summary. Needs Linux (``/proc``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _make_class(args: tuple[Path, int, int]) -> None:
    folder, cls, count = args
    rng = np.random.default_rng(cls)
    folder.mkdir(parents=True, exist_ok=True)
    colour = rng.integers(0, 256, 3)
    for i in range(count):
        height, width = rng.integers(28, 85, 2)
        pixels = np.clip(colour + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        image = image.convert("L") if i % 4 == 3 else image
        image.save(folder / f"{i:04d}.{'png' if i % 2 else 'jpg'}")


def generate(root: Path, images: int, per_class: int) -> Path:
    """``root/all/classNNNNN/<image>`` holding at least ``images`` files (kept between runs)."""
    full = root / "all"
    missing = [c for c in range(images // per_class)
               if len(list((full / f"class{c:05d}").glob("*"))) != per_class]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make_class, [(full / f"class{c:05d}", c, per_class) for c in missing], chunksize=8))
    return full


def subset(root: Path, full: Path, images: int, per_class: int) -> Path:
    """A tree of links to the first ``images // per_class`` classes of ``full``."""
    folder = root / f"first{images}"
    folder.mkdir(exist_ok=True)
    for c in range(images // per_class):
        link = folder / f"class{c:05d}"
        if not link.exists():
            link.symlink_to(full / link.name, target_is_directory=True)
    return folder


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key)), 0)
    except OSError:  # the process ended
        return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/*/stat``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


class Sampler(threading.Thread):
    """Samples the memory of a process tree every ``interval`` seconds until ``done`` is set."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.done = pid, interval, threading.Event()
        self.main_hwm = self.main_anon = self.tree_pss = self.tree_pss_anon = 0

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            self.main_hwm = max(self.main_hwm, _kb(f"/proc/{self.pid}/status", "VmHWM:"))
            self.main_anon = max(self.main_anon, _kb(f"/proc/{self.pid}/status", "RssAnon:"))
            self.tree_pss = max(self.tree_pss, sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))
            pss_anon = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss_Anon:") for p in pids)
            self.tree_pss_anon = max(self.tree_pss_anon, pss_anon)
            time.sleep(self.interval)


def _children_cpu() -> float:
    """User + system CPU seconds of the finished children (and their reaped children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(source: Path, out: Path, images: int, image_size: int, workers: int) -> dict:
    cmd = [sys.executable, "-m", "tsmd_ray.data", "prepare", "folder", "--source", str(source),
           "--out", str(out), "--image-size", str(image_size), "--workers", str(workers)]
    start, cpu_start = time.perf_counter(), _children_cpu()
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)
    sampler = Sampler(child.pid)
    sampler.start()
    first_line = end = None
    before = 0
    for line in child.stderr:  # the first log line comes once the imports are done, the summary at the end
        if first_line is None and "listing the image files" in line:
            first_line, before = time.perf_counter(), _kb(f"/proc/{child.pid}/status", "RssAnon:")
        elif "(report: " in line:
            end = time.perf_counter()
    child.wait()
    sampler.done.set()
    sampler.join()
    if child.returncode != 0 or first_line is None or end is None:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {child.returncode}")
    return {
        "images": images, "workers": workers, "image_size": image_size,
        "images_per_s": round(images / (end - first_line), 1),
        "prepare_s": round(end - first_line, 2), "startup_s": round(first_line - start, 2),
        "cpu_s": round(_children_cpu() - cpu_start, 2),
        "main_anon_before_mb": round(before / 1024, 1),
        "peak_main_anon_mb": round(sampler.main_anon / 1024, 1),
        "peak_main_rss_mb": round(sampler.main_hwm / 1024, 1),
        "peak_tree_pss_anon_mb": round(sampler.tree_pss_anon / 1024, 1),
        "peak_tree_pss_mb": round(sampler.tree_pss / 1024, 1),
        "arrow_mb": round((out / "images.arrow").stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--workers", type=int, nargs="+", default=[len(os.sched_getaffinity(0))])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tsmd-prepare-bench"))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    full = generate(args.work, max(args.images), args.per_class)
    results = []
    for _ in range(args.repeat):
        for workers in args.workers:
            for images in args.images:
                source = subset(args.work, full, images, args.per_class)
                result = run_once(source, args.work / "out", images, args.image_size, workers)
                result["load_average"] = round(os.getloadavg()[0], 1)
                print(json.dumps(result), flush=True)
                results.append(result)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": results}
    print(json.dumps(summary, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
