"""Classify raw images with a client-adapted student: ``python -m tsmd_ray.predict --model DIR IMAGES...``.

DIR is the output of ``python -m tsmd_ray.adapt``. Each image gets the server checkpoint's
preprocessing (size, channels, inversion, normalisation) and is predicted on its own: batch norm
uses the statistics frozen on the support set, so results do not depend on the other images.
Prints one ``PATH<TAB>CLASS`` line per image, or a JSON list with ``--json``.
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

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_checkpoint
from .data.transforms import image_channels, normalise, open_image, to_array
from .errors import entry_point
from .export import frozen_structure
from .models import build_model
from .preflight import check_torch_device

log = logging.getLogger("tsmd_ray.predict")

MODEL_FILE = "student.pt"  # state dict of the deployed student + what is needed to rebuild it
EXPORT_FILE = "student.pt2"  # torch.export program, loads with torch alone
DEPLOY_FILE = "deploy.json"  # classes and preprocessing, for runtimes without tsmd_ray
REPORT_FILE = "report.json"
MODEL_KIND = "tsmd-ray adapted student"
BATCH_NORM_POLICY = "frozen support-set statistics"


class ClientError(ValueError):
    """Bad client input: support folder, images, model directory or checkpoint."""


def load_images(paths: Sequence[Path], preprocess: dict[str, Any]) -> Tensor:
    """Read raw image files and apply ``preprocess``; a float NCHW batch.

    Gray and RGB sources are converted to the expected channel count as at dataset preparation
    (with a warning); other layouts (alpha, CMYK, ...) raise ``ChannelMismatchError`` naming the file.
    """
    want = int(preprocess["channels"])
    images, converted = [], []
    for path in paths:
        image = open_image(path, str(path))
        if image_channels(image) != want:
            converted.append(f"{path} ({image.mode})")
        array = to_array(image, preprocess, str(path))
        images.append(normalise(torch.from_numpy(array).permute(2, 0, 1), preprocess))
    if converted:
        log.warning("%d image(s) converted to %d channel(s) as the checkpoint expects: %s%s", len(converted),
                    want, ", ".join(converted[:3]), " ..." if len(converted) > 3 else "")
    return torch.stack(images)


@dataclass
class AdaptedModel:
    """A deployed student with its class names and preprocessing."""

    model: nn.Module
    classes: list[str]
    preprocess: dict[str, Any]

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "AdaptedModel":
        """Rebuild the student written by ``tsmd_ray.adapt`` into ``directory``."""
        path = Path(directory) / MODEL_FILE
        if not Path(directory).is_dir():
            raise ClientError(f"model directory {directory} does not exist")
        payload = load_checkpoint(path)
        if payload.get("kind") != MODEL_KIND:
            raise CheckpointError(f"{path} is not an adapted student written by tsmd_ray.adapt")
        spec = payload["model"]
        model = build_model(spec["arch"], spec["ways"], spec["in_channels"], spec["image_size"],
                            widths=spec.get("widths"))
        frozen_structure(model).load_state_dict(payload["state_dict"])
        model.to(device).eval().requires_grad_(False)
        return cls(model, list(payload["classes"]), dict(payload["preprocess"]))

    @torch.inference_mode()
    def logits(self, x: Tensor, batch_size: int = 64) -> Tensor:
        """Logits of a preprocessed batch (computed in chunks; each image independently)."""
        device = next(self.model.parameters()).device
        return torch.cat([self.model(chunk.to(device)).cpu() for chunk in x.split(batch_size)])

    def predict(self, paths: Sequence[str | Path]) -> list[dict[str, Any]]:
        """``{"path", "class", "probability"}`` for each raw image file."""
        probs = self.logits(load_images([Path(p) for p in paths], self.preprocess)).softmax(dim=-1)
        best, index = probs.max(dim=-1)
        return [{"path": str(p), "class": self.classes[i], "probability": round(float(b), 6)}
                for p, i, b in zip(paths, index.tolist(), best)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="DIR", help="output directory of tsmd_ray.adapt")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="raw image files (any size; e.g. PNG, JPEG)")
    parser.add_argument("--json", action="store_true",
                        help='print a JSON list of {"path", "class", "probability"} instead of lines')
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    return parser


def _main(args: argparse.Namespace) -> int:
    check_torch_device("--device", args.device)
    results = AdaptedModel.load(args.model, args.device).predict(args.images)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['path']}\t{r['class']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return entry_point(log.name, lambda: _main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
