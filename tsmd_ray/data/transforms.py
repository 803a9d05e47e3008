"""Image preprocessing (PIL: prepare time and client side) and batched torch augmentation."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import ChannelMismatchError, ImageReadError

_SUPPORTED_CHANNELS = (1, 3)
_LUMA = (0.299, 0.587, 0.114)


# ------------------------------------------------------------------------- preprocessing (PIL)


def open_image(file: str | os.PathLike | IO[bytes], name: str) -> Image.Image:
    """Open and fully decode an image, upright by its EXIF orientation (phone photos);
    ``ImageReadError`` naming ``name`` if that fails."""
    try:
        image = Image.open(file)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise ImageReadError(f"cannot read image {name}: {exc}") from exc
    return image


def image_channels(image: Image.Image) -> int:
    """Channel count of a PIL image (palette images count as RGB)."""
    return 3 if image.mode == "P" else len(image.getbands())


def to_array(image: Image.Image, preprocess: Mapping[str, Any], name: str) -> np.ndarray:
    """Apply ``preprocess`` (channels, LANCZOS resize to ``size``, invert) to a PIL image.

    Returns uint8 ``(H, W, C)``. Grayscale and RGB (or palette) sources are accepted for 1- or
    3-channel datasets: gray -> RGB replicates, RGB -> gray uses PIL's ITU-R 601-2 luma.
    Anything else (alpha, CMYK, ...) raises ``ChannelMismatchError`` naming ``name``.
    """
    want, have = int(preprocess["channels"]), image_channels(image)
    if want not in _SUPPORTED_CHANNELS or have not in _SUPPORTED_CHANNELS:
        raise ChannelMismatchError(
            f"{name}: image has {have} channel(s) (mode {image.mode}), the dataset expects {want}; "
            f"only 1- and 3-channel images can be converted"
        )
    image = image.convert("L" if want == 1 else "RGB")
    height, width = (int(v) for v in preprocess["size"])
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8).reshape(height, width, want)
    return 255 - array if preprocess.get("invert", False) else array.copy()


def load_image(path: str | os.PathLike, preprocess: Mapping[str, Any]) -> torch.Tensor:
    """Read a raw image file and apply a dataset's preprocessing; returns normalised float CHW."""
    path = Path(path)
    array = to_array(open_image(path, str(path)), preprocess, str(path))
    return normalise(torch.from_numpy(array).permute(2, 0, 1), preprocess)


def normalise(x: torch.Tensor, preprocess: Mapping[str, Any]) -> torch.Tensor:
    """``(x - mean) / std`` with channels at dim -3; uint8 input is first scaled to [0, 1]."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    mean = torch.as_tensor(preprocess["mean"], dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(preprocess["std"], dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------- augmentation (torch)


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    padding: int | None = None,
    flip_p: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
) -> torch.Tensor:
    """Per-image random crop (zero padding, default ``H // 8``), horizontal flip and colour jitter.

    ``x`` is a float NCHW batch in [0, 1]; the result is too. Brightness and contrast apply to any
    channel count, saturation only to 3 channels. All randomness comes from the CPU ``generator``.
    """
    pad = x.shape[-2] // 8 if padding is None else padding
    x = _random_crop(x, pad, generator)
    x = _random_flip(x, flip_p, generator)
    x = (x * _factors(x, brightness, generator)).clamp_(0, 1)
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = ((x - mean) * _factors(x, contrast, generator) + mean).clamp_(0, 1)
    if x.shape[1] == 3:
        gray = _gray(x)
        x = ((x - gray) * _factors(x, saturation, generator) + gray).clamp_(0, 1)
    return x


def augmented_views(x: torch.Tensor, count: int, seed: int, preprocess: Mapping[str, Any]) -> torch.Tensor:
    """``count`` views (:func:`augment`) of each normalised CPU image of ``x`` ``(N, C, H, W)``, normalised,
    view-major: row ``v * N + i`` is view ``v`` of image ``i``.

    An image's views depend only on ``seed`` and the image's own values, not on the other images or
    their order: an episode's support image and the same image in a client's support folder get the
    same views.
    """
    mean = torch.as_tensor(preprocess["mean"], dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(preprocess["std"], dtype=x.dtype).view(-1, 1, 1)
    pixels = (x * std + mean).clamp(0, 1)
    views = [augment(image.expand(count, -1, -1, -1), _image_generator(image, seed)) for image in pixels]
    return normalise(torch.stack(views, dim=1).flatten(0, 1), preprocess)


def _image_generator(image: torch.Tensor, seed: int) -> torch.Generator:
    """A generator seeded by ``seed`` and ``image`` (pixels in [0, 1]) re-quantised to 8 bits, so that the
    last bits of a float pipeline do not change an image's views."""
    quantised = (image * 255).round().to(torch.uint8)
    digest = hashlib.blake2b(quantised.numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _factors(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    u = torch.rand(x.shape[0], generator=generator)
    return (low + (high - low) * u).to(x.device, x.dtype).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    top = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    rows = (top + torch.arange(h)).to(x.device)[:, None, :, None]
    cols = (left + torch.arange(w)).to(x.device)[:, None, None, :]
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return F.pad(x, (pad, pad, pad, pad))[batch, chans, rows, cols]


def _random_flip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)
