"""Your own data: ``prepare folder`` / ``prepare manifest`` on generated image files and on Omniglot."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from tsmd_ray.data import (
    ArrowFewShotDataset,
    DataError,
    DataRootError,
    EpisodeSampler,
    ImageReadError,
    NotEnoughClassesError,
    PrepareOptions,
    SplitError,
    prepare_folder,
    prepare_manifest,
    resolve_dataset,
)
from tsmd_ray.data.__main__ import main
from tsmd_ray.data.transforms import to_array

SERIAL = PrepareOptions(image_size=16, workers=1)


def _picture(rng: np.random.Generator, cls: int, size: tuple[int, int], gray: bool) -> Image.Image:
    """A noisy image whose mean colour depends on the class."""
    height, width = size
    base = np.array([(37 * cls) % 256, (91 * cls) % 256, (53 * cls) % 256], float)
    pixels = np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert("L") if gray else image


def make_photos(root: Path, classes: int = 6, per_class: int = 5, seed: int = 0) -> Path:
    """``root/<class>/<image>``: PNG and JPEG, several sizes, RGB and grayscale."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = _picture(rng, c, (20 + 7 * i, 30 + 5 * (i % 3)), gray=i % 3 == 2)
            image.save(folder / f"img{i}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x 5 images, plus a corrupt file, an exact duplicate, a 1-image class and non-images."""
    root = make_photos(tmp_path_factory.mktemp("photos") / "photos")
    (root / "class02" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    # class04 precedes class01 in label order (the seed-0 split), so the copy in class01 is the duplicate
    shutil.copy(root / "class04" / "img0.png", root / "class01" / "copy_of_class04.png")
    (root / "tiny").mkdir()
    _picture(np.random.default_rng(1), 9, (25, 25), gray=False).save(root / "tiny" / "only.png")
    (root / "README.txt").write_text("not an image")
    (root / "class00" / "notes.txt").write_text("not an image either")
    (root / "class00" / ".DS_Store").write_bytes(b"hidden")
    return root


@pytest.fixture(scope="module")
def prepared(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_folder(photos, tmp_path_factory.mktemp("out") / "photos", options=SERIAL)


def _manifest_rows(root: Path) -> list[tuple[str, str]]:
    """``(path relative to root, label)`` of every image file, in the folder reader's order."""
    return [(p.relative_to(root).as_posix(), p.parent.name) for p in sorted(root.glob("*/*"))
            if p.suffix in (".png", ".jpg")]


# ---------------------------------------------------------------------------------- folder


def test_folder_skips_and_reports_bad_files(prepared: Path, photos: Path) -> None:
    ds = ArrowFewShotDataset(prepared)
    assert sorted(ds.class_names) == [f"class{c:02d}" for c in range(6)]  # 'tiny' left out
    sizes = dict(zip(ds.class_names, (ds.class_ranges[:, 1] - ds.class_ranges[:, 0]).tolist(), strict=True))
    assert sizes == {f"class{c:02d}": 5 for c in range(6)}  # corrupt file and duplicate not stored
    assert ds.shape == (16, 16, 3) and ds.meta["sampling"] == {"small_classes": "leave_out"}
    report = json.loads((prepared / "report.json").read_text())
    assert report["files"] == 33 and report["images"] == 30 and report["ignored_files"] == 2
    assert report["unreadable"]["count"] == 1
    assert str(photos / "class02" / "corrupt.jpg") in report["unreadable"]["examples"][0]
    assert report["duplicates"] == {"count": 1, "examples": [
        f"{photos / 'class01' / 'copy_of_class04.png'} (same pixels as {photos / 'class04' / 'img0.png'})"]}
    assert report["left_out_classes"] == {"tiny": 1} and report["min_images"] == 2
    assert [p.name for p in prepared.parent.iterdir()] == ["photos"]  # no temp dir left


def test_split_files_are_written_and_hold_every_class(prepared: Path) -> None:
    meta = ArrowFewShotDataset(prepared).meta
    chosen = {s: (prepared / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert sorted(sum(chosen.values(), [])) == sorted([f"class{c:02d}" for c in range(6)] + ["tiny"])
    for split, names in meta["splits"].items():
        assert names == [c for c in chosen[split] if c != "tiny"]
    assert meta["source"]["ratios"] == [0.6, 0.2, 0.2] and meta["source"]["seed"] == 0


def test_ratio_splits_are_deterministic_and_disjoint(photos: Path, tmp_path: Path) -> None:
    def splits(seed: int, name: str) -> dict[str, list[str]]:
        options = PrepareOptions(image_size=8, workers=1, seed=seed, ratios=(0.5, 0.25, 0.25))
        return ArrowFewShotDataset(prepare_folder(photos, tmp_path / name, options=options)).meta["splits"]

    first, again, other = splits(0, "a"), splits(0, "b"), splits(5, "c")
    assert first == again and first != other
    for split in (first, other):
        names = sum(split.values(), [])
        assert len(names) == len(set(names)) == 6
        assert [len(split[s]) for s in ("train", "val", "test")] in ([3, 2, 1], [3, 1, 2])  # 'tiny' had a place


def test_stored_pixels_follow_exif_orientation_and_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    wide = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    for c, name in enumerate(("rotated", "gray", "alpha")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(2):
            image = {"rotated": wide, "gray": wide.convert("L"), "alpha": wide.convert("RGBA")}[name]
            image.save(tmp_path / "src" / name / f"{i}.png", exif=exif if name == "rotated" else None)
            wide = Image.fromarray(np.asarray(wide)[::-1].copy())  # the second image differs
    for channels in (1, 3):
        options = PrepareOptions(image_size=12, channels=channels, workers=1, ratios=(1, 0, 0))
        ds = ArrowFewShotDataset(prepare_folder(tmp_path / "src", tmp_path / f"out{channels}", options=options))
        for label, name in enumerate(ds.class_names):
            for row, file in zip(range(*ds.class_ranges[label]), ("0.png", "1.png"), strict=True):
                source = ImageOps.exif_transpose(Image.open(tmp_path / "src" / name / file))
                expected = to_array(source.convert("RGB") if name == "alpha" else source, ds.preprocess, file)
                np.testing.assert_array_equal(ds.images[row], expected)
        report = json.loads((ds.path / "report.json").read_text())
        assert report["converted"]["count"] == 2 and "(RGBA)" in report["converted"]["examples"][0]
    rotated = ImageOps.exif_transpose(Image.open(tmp_path / "src" / "rotated" / "0.png"))
    assert rotated.size == (20, 40)  # the orientation tag was really applied


def test_parallel_decoding_gives_the_same_dataset(photos: Path, prepared: Path, tmp_path: Path) -> None:
    options = PrepareOptions(image_size=16, workers=2)
    parallel = prepare_folder(photos, tmp_path / "photos", options=options)
    assert (parallel / "images.arrow").read_bytes() == (prepared / "images.arrow").read_bytes()
    assert (parallel / "report.json").read_text() == (prepared / "report.json").read_text()


def test_nested_classes_with_depth(tmp_path: Path) -> None:
    make_photos(tmp_path / "src" / "Latin", classes=2, per_class=2)
    make_photos(tmp_path / "src" / "Greek", classes=2, per_class=2, seed=1)
    (tmp_path / "src" / "Greek" / "class00" / "more").mkdir()
    _picture(np.random.default_rng(2), 0, (9, 9), gray=True).save(tmp_path / "src/Greek/class00/more/x.png")
    options = PrepareOptions(image_size=8, workers=1, ratios=(1, 0, 0))
    ds = ArrowFewShotDataset(prepare_folder(tmp_path / "src", tmp_path / "out", depth=2, options=options))
    assert ds.class_names == ["Greek/class00", "Greek/class01", "Latin/class00", "Latin/class01"]
    assert (ds.class_ranges[:, 1] - ds.class_ranges[:, 0]).tolist() == [3, 2, 2, 2]  # sub-folders belong


def test_class_emptied_by_bad_files_is_left_out_after_decoding(tmp_path: Path, caplog) -> None:
    make_photos(tmp_path / "src", classes=3, per_class=2)
    (tmp_path / "src" / "class02" / "img1.jpg").write_bytes(b"garbage")
    options = PrepareOptions(image_size=8, workers=1, ratios=(1, 0, 0))
    with caplog.at_level(logging.WARNING):
        ds = ArrowFewShotDataset(prepare_folder(tmp_path / "src", tmp_path / "out", options=options))
    assert ds.class_names == ["class00", "class01"]
    assert json.loads((ds.path / "report.json").read_text())["left_out_classes"] == {"class02": 1}
    assert "class02/img1.jpg" in caplog.text and "'class02' (1)" in caplog.text


def test_strict_refuses_the_corrupt_file_and_leaves_nothing(photos: Path, tmp_path: Path) -> None:
    options = PrepareOptions(image_size=8, workers=1, strict=True)
    with pytest.raises(ImageReadError, match=r"class02/corrupt\.jpg"):
        prepare_folder(photos, tmp_path / "out", options=options)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- split files


ALL = [f"class{c:02d}" for c in range(6)] + ["tiny"]


def _write_splits(folder: Path, **splits: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        (folder / f"{split}.txt").write_text("".join(f"{c}\n" for c in splits.get(split, [])))
    return folder


def test_split_files_fix_the_split_and_label_order(photos: Path, tmp_path: Path) -> None:
    split_dir = _write_splits(tmp_path / "s", train=["class03", "class00", "tiny", "class05"],
                              val=["class01"], test=["class04", "class02"])
    options = PrepareOptions(image_size=8, workers=1, split_dir=split_dir)
    ds = ArrowFewShotDataset(prepare_folder(photos, tmp_path / "out", options=options))
    assert ds.meta["splits"] == {"train": ["class03", "class00", "class05"], "val": ["class01"],
                                 "test": ["class04", "class02"]}
    assert (ds.path / "train.txt").read_text().split() == ["class03", "class00", "tiny", "class05"]


@pytest.mark.parametrize(
    ("splits", "error", "match"),
    [
        ({"train": ["class00"]}, SplitError, r"class 'class01' is in no split file .* \(6 such classes\)"),
        ({"train": [*ALL, "ghost"]}, DataRootError, r"train\.txt: class 'ghost' is not in the source"),
        ({"train": ALL, "test": ["class00"]}, SplitError, r"'class00' is listed in both .*train\.txt and .*test"),
    ],
)
def test_split_file_errors(photos: Path, tmp_path: Path, splits, error, match) -> None:
    options = PrepareOptions(workers=1, split_dir=_write_splits(tmp_path / "s", **splits))
    with pytest.raises(error, match=match):
        prepare_folder(photos, tmp_path / "out", options=options)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_manifest_gives_the_same_dataset_as_the_folder(photos: Path, prepared: Path, tmp_path: Path,
                                                       suffix: str) -> None:
    rows = _manifest_rows(photos)  # paths relative to the table's folder: "photos/<class>/<file>"
    columns = {"path": [f"photos/{p}" for p, _ in rows], "label": [label for _, label in rows],
               "camera": ["phone"] * len(rows)}  # other columns are ignored
    manifest = photos.parent / f"labels.{suffix}"
    if suffix == "csv":
        with open(manifest, "w", newline="") as f:
            csv.writer(f).writerows([list(columns), *zip(*columns.values(), strict=True)])
    else:
        pq.write_table(pa.table(columns), manifest)
    out = prepare_manifest(manifest, tmp_path / "photos", options=SERIAL)
    assert (out / "images.arrow").read_bytes() == (prepared / "images.arrow").read_bytes()
    assert json.loads((out / "report.json").read_text())["duplicates"]["count"] == 1
    assert ArrowFewShotDataset(out).meta["source"]["kind"] == "manifest"


def test_manifest_errors_name_the_table(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("file,class\nx.png,cat\n")
    with pytest.raises(DataRootError, match=r"a\.csv lacks the column\(s\) \['label', 'path'\]"):
        prepare_manifest(tmp_path / "a.csv", tmp_path / "out")
    (tmp_path / "b.csv").write_text("path,label\nx.png,cat\ny.png,\n")
    with pytest.raises(DataRootError, match=r"b\.csv, row 2: empty path or label"):
        prepare_manifest(tmp_path / "b.csv", tmp_path / "out")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(DataRootError, match=r"c\.json: expected a \.csv or \.parquet file"):
        prepare_manifest(tmp_path / "c.json", tmp_path / "out")


# ---------------------------------------------------------------------------------- CLI


def test_cli_prepare_folder_and_errors(photos: Path, tmp_path: Path, capsys, caplog) -> None:
    out = tmp_path / "cli"
    args = ["prepare", "folder", "--source", str(photos), "--out", str(out), "--workers", "1"]
    assert main([*args, "--image-size", "10", "--channels", "1", "--split", "1,1,1", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ds = ArrowFewShotDataset(out)
    assert ds.shape == (10, 10, 1) and ds.meta["source"]["ratios"] == [1, 1, 1]

    def refused(argv: list[str]) -> str:  # exit 2 and the one error line
        caplog.clear()
        assert main(argv) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "tsmd_ray.data"]
        assert len(errors) == 1, errors
        return errors[0]

    assert "corrupt.jpg" in refused([*args, "--strict"]) and ArrowFewShotDataset(out).shape == (10, 10, 1)  # kept
    assert "--depth applies to folder and manifest only" in refused(
        ["prepare", "omniglot", "--source", str(photos), "--out", str(out), "--depth", "2"])
    assert "nowhere is not a folder" in refused(["prepare", "folder", "--source", str(tmp_path / "nowhere"),
                                                 "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--split", "0.5,0.5"])
    assert exit_info.value.code == 2 and "TRAIN,VAL,TEST" in capsys.readouterr().err


def test_bad_options_are_refused(photos: Path, tmp_path: Path) -> None:
    for options, match in ((PrepareOptions(channels=2), "channels must be 1 or 3"),
                           (PrepareOptions(ratios=(0, 1, 1)), "train > 0"),
                           (PrepareOptions(min_images=0), "min_images must be a positive integer")):
        with pytest.raises(DataError, match=match):
            prepare_folder(photos, tmp_path / "out", options=options)
    with pytest.raises(DataError, match="depth must be a positive integer"):
        prepare_folder(photos, tmp_path / "out", depth=0)


# ---------------------------------------------------------------------------------- using it


def test_sampler_leaves_out_classes_smaller_than_shots_plus_query(prepared: Path, caplog) -> None:
    ds = ArrowFewShotDataset(prepared)
    train = ds.split_labels("train")
    with caplog.at_level(logging.WARNING):
        sampler = EpisodeSampler(ds, "train", ways=2, shots=2, query=2, seed=0)
    assert sampler.left_out == {} and "left out" not in caplog.text
    ranges = ds.class_ranges[train]
    assert ((ranges[:, 1] - ranges[:, 0]) == 5).all()
    with pytest.raises(NotEnoughClassesError, match=r"only 0 classes with shots\+query=6 images \(3 left out\)"):
        EpisodeSampler(ds, "train", ways=2, shots=3, query=3, seed=0)
    assert "left out 3 of 3 classes with fewer than shots+query=6 images" in caplog.text


def test_sampler_keeps_the_large_classes(tmp_path: Path, caplog) -> None:
    make_photos(tmp_path / "src", classes=3, per_class=4)
    make_photos(tmp_path / "big", classes=1, per_class=6, seed=4)
    shutil.move(tmp_path / "big" / "class00", tmp_path / "src" / "large")
    options = PrepareOptions(image_size=8, workers=1, ratios=(1, 0, 0))
    ds = ArrowFewShotDataset(prepare_folder(tmp_path / "src", tmp_path / "out", options=options))
    with caplog.at_level(logging.WARNING):
        sampler = EpisodeSampler(ds, "train", ways=1, shots=2, query=3, seed=0)
    assert sampler.left_out == {"class00": 4, "class01": 4, "class02": 4}
    assert "left out 3 of 4 classes with fewer than shots+query=5 images: 'class00' (4)" in caplog.text
    assert sampler.sample(0).query_x.shape == (3, 3, 8, 8)
    with pytest.raises(NotEnoughClassesError, match=r"ways=2 .* only 1 classes with shots\+query=5 images"):
        EpisodeSampler(ds, "train", ways=2, shots=2, query=3, seed=0)


def test_resolve_dataset_folder_prefix(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(prepared.parent)
    omniglot_raw = tmp_path  # any data root that is not this dataset is ignored
    assert resolve_dataset("folder:photos", omniglot_raw, tmp_path / "cache") == prepared.resolve()
    copy = shutil.copytree(prepared, tmp_path / "elsewhere" / "photos")
    assert resolve_dataset("folder:photos", copy, tmp_path / "cache") == copy.resolve()  # e.g. Tune trials
    with pytest.raises(DataRootError, match=r"prepared at 16x16, not 28x28"):
        resolve_dataset("folder:photos", None, tmp_path / "cache", image_size=28)
    with pytest.raises(DataRootError, match=r"missing is not a prepared dataset.*prepare folder --source"):
        resolve_dataset("folder:missing", None, tmp_path / "cache")
    with pytest.raises(DataRootError, match=r"folder:PATH"):
        resolve_dataset("photos2", tmp_path, tmp_path / "cache")


# ---------------------------------------------------------------------------------- Omniglot


def test_omniglot_tree_prepared_as_a_folder_equals_the_omniglot_reader(
    omniglot_source: Path, omniglot_dataset: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    for archive in sorted(omniglot_source.glob("images_background_small*.zip")):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if member.endswith(".png"):  # <root>/<Alphabet>/<character>/<drawing>.png, root dropped
                    target = tree.joinpath(*member.split("/")[1:])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(member))
    reader = ArrowFewShotDataset(omniglot_dataset)
    split_dir = _write_splits(tmp_path / "splits", **reader.meta["splits"])
    options = PrepareOptions(image_size=28, channels=1, invert=True, split_dir=split_dir, workers=2)
    ours = ArrowFewShotDataset(prepare_folder(tree, tmp_path / "omniglot", depth=2, options=options))
    assert len(ours.class_names) == len(reader.class_names) == 242 and len(ours) == len(reader) == 4840
    assert ours.class_names == reader.class_names
    np.testing.assert_array_equal(ours.class_ranges, reader.class_ranges)
    np.testing.assert_array_equal(ours.images, reader.images)  # same pixels: same to_array path
    assert ours.preprocess == reader.preprocess


# ---------------------------------------------------------------------------------- training on it


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``folder:`` dataset of 16 classes (5 train + a 3-image one, 5 val, 5 test) x 6 images, 16x16 RGB."""
    root = tmp_path_factory.mktemp("shapes")
    make_photos(root / "images", classes=15, per_class=6)
    make_photos(root / "more", classes=1, per_class=3, seed=7)
    shutil.move(root / "more" / "class00", root / "images" / "small")
    names = [f"class{c:02d}" for c in range(15)]
    split_dir = _write_splits(root / "splits", train=[*names[:5], "small"], val=names[5:10], test=names[10:])
    options = PrepareOptions(image_size=16, workers=1, split_dir=split_dir)
    return prepare_folder(root / "images", root / "data" / "shapes", options=options)


def _tiny(shapes: Path, out: Path, **changes):
    from tsmd_ray.config import Config

    values = dict(backend="local", mlflow=False, teacher="conv4", teacher_widths=[16, 16, 16, 16],
                  student_widths=[8, 8, 8, 8], meta_batch=2, inner_steps=1, eval_every=0, test_episodes=8,
                  query=5, iterations=1, dataset=f"folder:{shapes}", out=str(out))
    return Config(**{**values, **changes})


def test_train_evaluate_adapt_predict_on_a_folder_dataset(shapes: Path, tmp_path: Path, caplog) -> None:
    from tsmd_ray.adapt import adapt
    from tsmd_ray.evaluate import evaluate_checkpoint
    from tsmd_ray.predict import AdaptedModel
    from tsmd_ray.train import run

    with caplog.at_level(logging.WARNING):
        result = run(_tiny(shapes, tmp_path / "run"))  # $TSMD_DATA_ROOT (Omniglot) is not used
    assert result["dataset"] == f"folder:{shapes}" and result["results"]["student"]["episodes"] == 8
    assert "left out 1 of 6 classes with fewer than shots+query=6 images: 'small' (3)" in caplog.text
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    evaluation = evaluate_checkpoint(str(checkpoint), episodes=4, split="val")
    assert evaluation["results"]["student"]["episodes"] == 4 and evaluation["split"] == "val"

    support = tmp_path / "support"  # the client's own classes: raw files, any size
    photos = shapes.parent.parent / "images"
    for name in ("class10", "class11", "class12"):
        shutil.copytree(photos / name, support / name, ignore=shutil.ignore_patterns("img5.*"))
    adapt(checkpoint, support, tmp_path / "student", device="cpu")
    predictions = AdaptedModel.load(tmp_path / "student", "cpu").predict([photos / "class11" / "img5.jpg"])
    assert predictions[0]["class"] in ("class10", "class11", "class12")
