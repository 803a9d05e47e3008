"""Augmentation, normalisation and load_image on files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tsmd_ray.data import ChannelMismatchError, ImageReadError, augment, augmented_views, load_image, normalise

GRAY = {"size": [8, 8], "channels": 1, "invert": False, "mean": [0.5], "std": [0.25]}
RGB = {"size": [8, 8], "channels": 3, "invert": False, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def _batch(channels: int) -> torch.Tensor:
    return torch.rand(6, channels, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_deterministic_per_seed_and_changes_images(channels: int) -> None:
    x = _batch(channels)
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 1


def test_augment_crop_and_flip_only_move_pixels() -> None:
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    out = augment(x, torch.Generator().manual_seed(0), padding=2, brightness=0, contrast=0)
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.full((4,), 4.0))  # the blob moves, stays whole


@pytest.mark.parametrize("preprocess", [GRAY, RGB])
def test_views_depend_on_each_image_and_the_seed_alone(preprocess: dict) -> None:
    x = normalise(_batch(preprocess["channels"]), preprocess)
    views = augmented_views(x, 3, 7, preprocess)
    assert views.shape == (18, *x.shape[1:])
    assert torch.equal(views, augmented_views(x, 3, 7, preprocess))
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    shuffled = augmented_views(x[order], 3, 7, preprocess).unflatten(0, (3, 6))  # view-major
    assert torch.equal(shuffled, views.unflatten(0, (3, 6))[:, order])
    assert torch.equal(augmented_views(x[:1], 3, 7, preprocess), views.unflatten(0, (3, 6))[:, 0])
    assert not torch.equal(views, augmented_views(x, 3, 8, preprocess))
    assert not torch.equal(views[:6], views[6:12]) and not torch.equal(views[:6], x)


@pytest.mark.parametrize("preprocess", [GRAY, RGB])
def test_views_ignore_the_last_bits_of_a_float_pipeline(preprocess: dict) -> None:
    x = normalise(_batch(preprocess["channels"]), preprocess)
    nudged = torch.nextafter(x, torch.full_like(x, float("inf")))  # one ulp up: another machine's rounding
    assert not torch.equal(nudged, x)
    views = augmented_views(x, 2, 7, preprocess)
    assert torch.allclose(augmented_views(nudged, 2, 7, preprocess), views, atol=1e-5)


def test_normalise_uint8_and_float_agree() -> None:
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = (x.float() / 255 - 0.5) / 0.25
    assert torch.allclose(normalise(x, RGB), expected)
    assert torch.allclose(normalise(x.float() / 255, RGB), expected)


def test_load_image_resizes_and_inverts(tmp_path: Path) -> None:
    path = tmp_path / "white.png"
    Image.new("L", (20, 20), 255).save(path)
    out = load_image(path, {**GRAY, "invert": True})
    assert out.shape == (1, 8, 8) and torch.allclose(out, torch.full((1, 8, 8), -2.0))


def test_load_image_converts_gray_and_rgb(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 51).save(tmp_path / "gray.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    rgb = load_image(tmp_path / "gray.png", RGB)
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], rgb[2])  # replicated
    gray = load_image(tmp_path / "red.png", GRAY)
    assert gray.shape == (1, 8, 8)
    assert gray[0, 0, 0].item() == pytest.approx((76 / 255 - 0.5) / 0.25)  # ITU-R 601-2 luma of red


def test_load_image_channel_mismatch_names_file_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8)).save(path)
    with pytest.raises(ChannelMismatchError, match=r"alpha\.png: image has 4 channel.*expects 1"):
        load_image(path, GRAY)


@pytest.mark.parametrize("content", [None, b"definitely not an image"])
def test_load_image_unreadable_names_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        load_image(path, GRAY)
