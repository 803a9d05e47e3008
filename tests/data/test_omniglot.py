"""Omniglot preparation (real data via $TSMD_OMNIGLOT), resolve_dataset and the CLI."""

from __future__ import annotations

import json
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image, ImageDraw

from tsmd_ray.data import (
    ArrowFewShotDataset,
    DataRootError,
    ImageReadError,
    SplitError,
    load_image,
    normalise,
    prepare_omniglot,
    resolve_dataset,
)
from tsmd_ray.data.__main__ import main
from tsmd_ray.data.omniglot import SPLIT_FILE

SMALL_ALPHABETS = {
    "train": {"Balinese": 24, "Greek": 24, "Japanese_(katakana)": 47, "Latin": 26, "Sanskrit": 42},
    "val": {"Korean": 40},
    "test": {"Early_Aramaic": 22, "Tagalog": 17},
}


def make_fake_release(
    root: Path, alphabets=("Greek", "Korean", "Tagalog"), folder_name: str = "images_background_small1"
) -> Path:
    """A tiny extracted release ``root/<folder_name>/<Alphabet>/characterNN/*.png``, 2x4 per alphabet."""
    rng = np.random.default_rng(0)
    for alphabet in alphabets:
        for c in range(1, 3):
            folder = root / folder_name / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for d in range(1, 5):
                image = Image.new("1", (105, 105), 1)
                ImageDraw.Draw(image).line(
                    [tuple(rng.integers(10, 95, 2)) for _ in range(3)], fill=0, width=4
                )
                image.save(folder / f"{c:04d}_{d:02d}.png")
    return root


def _alphabet_counts(ds: ArrowFewShotDataset, split: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in ds.split_labels(split):
        alphabet = ds.class_names[label].split("/")[0]
        counts[alphabet] = counts.get(alphabet, 0) + 1
    return counts


# ---------------------------------------------------------------------------------- real data


def test_class_counts_per_split(omniglot_dataset: Path) -> None:
    ds = ArrowFewShotDataset(omniglot_dataset)
    for split, expected in SMALL_ALPHABETS.items():
        assert _alphabet_counts(ds, split) == expected
    assert len(ds.class_names) == len(set(ds.class_names)) == 242
    sizes = ds.class_ranges[:, 1] - ds.class_ranges[:, 0]
    assert (sizes == 20).all() and len(ds) == 4840


def test_split_follows_the_split_file(omniglot_dataset: Path) -> None:
    profile = json.loads(SPLIT_FILE.read_text())["profiles"]["background_small"]
    meta = ArrowFewShotDataset(omniglot_dataset).meta
    for split in ("train", "val", "test"):
        assert {name.split("/")[0] for name in meta["splits"][split]} == set(profile[split])
    assert meta["source"]["profile"] == "background_small"
    assert meta["source"]["roots"] == ["images_background_small1.zip", "images_background_small2.zip"]


def test_greek_and_latin_counted_once(omniglot_dataset: Path) -> None:
    names = ArrowFewShotDataset(omniglot_dataset).class_names
    assert sum(n.startswith("Greek/") for n in names) == 24
    assert sum(n.startswith("Latin/") for n in names) == 26


def test_images_are_inverted_28x28_uint8(omniglot_dataset: Path) -> None:
    ds = ArrowFewShotDataset(omniglot_dataset)
    assert ds.images.shape == (4840, 28, 28, 1) and ds.images.dtype == np.uint8
    border = np.concatenate([ds.images[:, 0], ds.images[:, -1], ds.images[:, :, 0], ds.images[:, :, -1]])
    assert border.mean() < 2  # background is 0 after inversion
    assert ds.images.mean() / 255 < 0.15 and ds.images.max() == 255  # sparse bright strokes
    assert ds.preprocess["size"] == [28, 28] and ds.preprocess["channels"] == 1 and ds.preprocess["invert"]
    train_stop = ds.class_ranges[ds.split_labels("train")[-1], 1]
    train = ds.images[:train_stop] / 255.0
    np.testing.assert_allclose(ds.preprocess["mean"], [train.mean()], rtol=1e-6)
    np.testing.assert_allclose(ds.preprocess["std"], [train.std()], rtol=1e-6)


def test_load_image_matches_stored(omniglot_dataset: Path, omniglot_source: Path, tmp_path: Path) -> None:
    ds = ArrowFewShotDataset(omniglot_dataset)
    with zipfile.ZipFile(omniglot_source / "images_background_small2.zip") as archive:
        members = sorted(
            n for n in archive.namelist() if "/Sanskrit/character07/" in n and n.endswith(".png")
        )
        png = tmp_path / "drawing.png"
        png.write_bytes(archive.read(members[3]))
    assert Image.open(png).size == (105, 105)
    start = ds.class_ranges[ds.class_names.index("Sanskrit/character07"), 0]
    stored = normalise(torch.from_numpy(ds.images[start + 3].copy()).permute(2, 0, 1), ds.preprocess)
    loaded = load_image(png, ds.preprocess)
    assert loaded.shape == (1, 28, 28) and loaded.dtype == torch.float32
    tolerance = 1.0 / 255 / ds.preprocess["std"][0] + 1e-5  # one grey level
    assert (loaded - stored).abs().max() <= tolerance


# ---------------------------------------------------------------------------------- fake releases


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    source = make_fake_release(tmp_path / "raw")
    bad = source / "images_background_small1" / "Korean" / "character02" / "0002_03.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match=r"0002_03\.png"):
        prepare_omniglot(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_alphabet_is_an_error(tmp_path: Path) -> None:
    source = make_fake_release(tmp_path / "raw", alphabets=("Greek", "Klingon"))
    with pytest.raises(SplitError, match=r"Klingon.*omniglot\.json"):
        prepare_omniglot(source, tmp_path / "out")


def test_fake_folder_release_splits(tmp_path: Path) -> None:
    ds = ArrowFewShotDataset(
        prepare_omniglot(make_fake_release(tmp_path / "raw"), tmp_path / "out", image_size=14)
    )
    assert ds.images.shape == (24, 14, 14, 1)
    assert {s: [ds.class_names[i] for i in labels] for s, labels in ds.splits.items()} == {
        "train": ["Greek/character01", "Greek/character02"],
        "val": ["Korean/character01", "Korean/character02"],
        "test": ["Tagalog/character01", "Tagalog/character02"],
    }


def test_malformed_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataRootError, match=r"(?s)--data-root.*images_background.*characterNN"):
        resolve_dataset("omniglot", tmp_path / "root", tmp_path / "cache")


def test_resolve_prepares_raw_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_fake_release(tmp_path / "raw")
    first = resolve_dataset("omniglot", source, tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.name.startswith("omniglot-")
    assert (first / "meta.json").is_file() and not (source / "meta.json").exists()

    def must_not_prepare(*args):
        raise AssertionError("prepared twice")

    monkeypatch.setattr("tsmd_ray.data.omniglot.write_dataset", must_not_prepare)
    assert resolve_dataset("omniglot", source, tmp_path / "cache") == first
    assert resolve_dataset("omniglot", first, tmp_path / "other") == first  # a prepared dir
    monkeypatch.undo()
    other_size = resolve_dataset("omniglot", source, tmp_path / "cache", image_size=14)
    assert other_size != first and ArrowFewShotDataset(other_size).shape == (14, 14, 1)


def test_resolve_finds_name_subfolder(tmp_path: Path) -> None:
    prepared = prepare_omniglot(make_fake_release(tmp_path / "raw"), tmp_path / "root" / "omniglot")
    assert resolve_dataset("omniglot", tmp_path / "root", tmp_path / "cache") == prepared
    with pytest.raises(DataRootError, match="28x28, not 14x14"):
        resolve_dataset("omniglot", tmp_path / "root", tmp_path / "cache", image_size=14)


def test_resolve_without_root_reports_download_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Offline:
        folder = "omniglot-py"

        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", Offline)
    for root in (None, tmp_path / "missing"):
        with pytest.raises(DataRootError, match=r"(?s)no network.*--data-root.*images_evaluation"):
            resolve_dataset("omniglot", root, tmp_path / "cache")


def test_resolve_without_root_downloads_full_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeOmniglot:  # lays out what torchvision's download leaves behind
        def __init__(self, root: str, background: bool, download: bool) -> None:
            folder = Path(root) / "omniglot-py"
            if background:
                make_fake_release(folder, ("Greek", "Tagalog"), "images_background")
            else:
                make_fake_release(folder, ("Angelic",), "images_evaluation")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", FakeOmniglot)
    path = resolve_dataset("omniglot", None, tmp_path / "cache")
    ds = ArrowFewShotDataset(path)
    assert ds.meta["source"]["profile"] == "full"
    assert {s: _alphabet_counts(ds, s) for s in ds.splits} == {
        "train": {"Greek": 2},
        "val": {"Tagalog": 2},
        "test": {"Angelic": 2},
    }
    assert resolve_dataset("omniglot", tmp_path / "cache" / "raw", tmp_path / "cache") == path  # same source


def test_cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    source = make_fake_release(tmp_path / "raw")
    out = tmp_path / "prepared"
    assert (
        main(["prepare", "omniglot", "--source", str(source), "--out", str(out), "--image-size", "20"]) == 0
    )
    assert ArrowFewShotDataset(out).shape == (20, 20, 1)
    assert main(["prepare", "omniglot", "--source", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no Omniglot release found" in caplog.text  # the one error line
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--help"])
    assert exit_info.value.code == 0
    assert "--image-size" in capsys.readouterr().out
