"""The paper's benchmarks: tiny fake copies of each release layout, prepared and checked."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tsmd_ray.data import (
    PREPARERS,
    ArrowFewShotDataset,
    DataRootError,
    ImageReadError,
    SplitError,
    load_image,
    normalise,
    resolve_dataset,
)
from tsmd_ray.data.__main__ import main
from tsmd_ray.data.paper_datasets import DATASETS
from tsmd_ray.data.split_files import load_split, random_split, split_file

COUNTS = {
    "mini_imagenet": (64, 16, 20),
    "cifar_fs": (64, 16, 20),
    "fc100": (60, 20, 20),
    "fgvc_aircraft": (50, 25, 25),
    "cub200": (100, 50, 50),
    "stanford_dogs": (60, 30, 30),
}
PER_CLASS = 2  # images per class in the fake releases


def _classes(name: str) -> list[str]:
    split = load_split(name)
    return split["train"] + split["val"] + split["test"]


def _colour(cls_index: int, j: int) -> tuple[int, int, int]:
    """A solid colour per (class, image), so stored pixels can be traced back to their class."""
    return (37 * cls_index) % 256, (11 * j + 60) % 256, (cls_index * 7 + 3 * j) % 256


def _save(path: Path, colour, size=(9, 7), fmt=None, mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else (*colour, 128)).save(path, format=fmt, quality=95)


def _arrays(n_classes: int, size: int) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for c in range(n_classes):
        for j in range(PER_CLASS):
            images.append(np.full((size, size, 3), _colour(c, j), np.uint8))
            labels.append(c)
    return np.stack(images), labels


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


# ------------------------------------------------------------------------------ fake releases


def fake_mini_pickles(root: Path) -> Path:
    index = {c: i for i, c in enumerate(_classes("mini_imagenet"))}
    for split, suffix in (("train", "train"), ("val", "validation"), ("test", "test")):
        images, class_dict = [], {}
        for cls in load_split("mini_imagenet")[split]:
            class_dict[cls] = list(range(len(images), len(images) + PER_CLASS))
            images += [np.full((84, 84, 3), _colour(index[cls], j), np.uint8) for j in range(PER_CLASS)]
        _pickle(
            root / f"mini-imagenet-cache-{suffix}.pkl",
            {"image_data": np.stack(images), "class_dict": class_dict},
        )
    return root


def fake_mini_csv(root: Path) -> Path:
    index = {c: i for i, c in enumerate(_classes("mini_imagenet"))}
    for split, names in load_split("mini_imagenet").items():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for cls in names:
                for j in range(PER_CLASS):
                    writer.writerow([f"{cls}{j:08d}.jpg", cls])
                    _save(root / "images" / f"{cls}{j:08d}.jpg", _colour(index[cls], j), size=(20, 16))
    return root


def fake_cifar_python(root: Path) -> Path:
    names = sorted(_classes("cifar_fs"))  # CIFAR-100 fine_label_names are alphabetical
    folder = root / "cifar-100-python"
    images, labels = _arrays(len(names), 32)
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # the release stores CHW rows
    for part, rows in (("train", slice(0, None, 2)), ("test", slice(1, None, 2))):  # image j=0 / j=1
        _pickle(
            folder / part, {"data": flat[rows], "fine_labels": labels[rows], "coarse_labels": labels[rows]}
        )
    _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": []})
    return root


def fake_cifar_png(root: Path) -> Path:
    names = sorted(_classes("cifar_fs"))
    for i, cls in enumerate(names):
        for j in range(PER_CLASS):
            _save(root / "cifar100" / "data" / cls / f"{cls}_{j}.png", _colour(i, j), size=(32, 32))
    for split, classes in load_split("cifar_fs").items():
        path = root / "cifar100" / "splits" / "bertinetto" / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{c}\n" for c in classes))
    return root


def fake_fc100_pickles(root: Path) -> Path:
    names = json.loads(split_file("fc100").read_text())["pickle_label_names"]
    for split, classes in load_split("fc100").items():
        ids = [names.index(c) for c in classes]
        images = np.stack(
            [np.full((32, 32, 3), _colour(i, j), np.uint8) for i in ids for j in range(PER_CLASS)]
        )
        _pickle(
            root / f"FC100_{split}.pickle",
            {"data": images, "labels": [i for i in ids for _ in range(PER_CLASS)]},
        )
    return root


def fake_aircraft(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    lines = {"train": [], "val": [], "test": []}
    for i, variant in enumerate(sorted(_classes("fgvc_aircraft"))):
        for j in range(PER_CLASS):
            image_id = f"{1000000 + PER_CLASS * i + j}"
            _save(data / "images" / f"{image_id}.jpg", _colour(i, j), size=(30, 20))
            lines[("train", "val", "test")[(i + j) % 3]].append(f"{image_id} {variant}\n")
    for split, rows in lines.items():
        (data / f"images_variant_{split}.txt").write_text("".join(rows))
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in sorted(_classes("fgvc_aircraft"))))
    return root


def fake_cub(root: Path) -> Path:
    base = root / "CUB_200_2011"
    classes, images = [], []
    for i, cls in enumerate(sorted(_classes("cub200"))):
        classes.append(f"{i + 1} {cls}\n")
        for j in range(PER_CLASS):
            rel = f"{cls}/{cls.split('.')[1]}_{j:04d}.jpg"
            images.append(f"{len(images) + 1} {rel}\n")
            _save(base / "images" / rel, _colour(i, j), size=(25, 18))
    (base / "classes.txt").write_text("".join(classes))
    (base / "images.txt").write_text("".join(images))
    return root


def fake_dogs(root: Path) -> Path:
    for i, cls in enumerate(sorted(_classes("stanford_dogs"))):
        for j in range(PER_CLASS):
            wnid = cls.split("-")[0]
            _save(root / "Images" / cls / f"{wnid}_{j}.jpg", _colour(i, j), size=(22, 30))
    return root


# (dataset, layout, builder, exact pixels?)
RELEASES: dict[str, tuple[str, Callable[[Path], Path], bool]] = {
    "mini_pickle": ("mini_imagenet", fake_mini_pickles, True),
    "mini_csv": ("mini_imagenet", fake_mini_csv, False),
    "cifar_fs_python": ("cifar_fs", fake_cifar_python, True),
    "cifar_fs_png": ("cifar_fs", fake_cifar_png, True),
    "fc100_pickle": ("fc100", fake_fc100_pickles, True),
    "fc100_python": ("fc100", fake_cifar_python, True),
    "aircraft": ("fgvc_aircraft", fake_aircraft, False),
    "cub": ("cub200", fake_cub, False),
    "dogs": ("stanford_dogs", fake_dogs, False),
}


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fake release, built once (copy one before breaking it)."""
    base = tmp_path_factory.mktemp("releases")
    return {key: builder(base / key) for key, (_, builder, _) in RELEASES.items()}


def _copy(releases: dict[str, Path], key: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(releases[key], tmp_path / key))


# ------------------------------------------------------------------------------ split files


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_split_files_have_the_papers_counts(name: str) -> None:
    split = load_split(name)
    assert tuple(len(split[s]) for s in ("train", "val", "test")) == COUNTS[name]
    assert len(set(_classes(name))) == sum(COUNTS[name])  # disjoint
    table = json.loads(split_file(name).read_text())
    if table["seed"] is not None:  # the "random" splits are reproducible from the stored seed
        assert random_split(_classes(name), COUNTS[name], table["seed"]) == split


def test_fc100_split_is_by_superclass_and_cifar_fs_covers_cifar100() -> None:
    table = json.loads(split_file("fc100").read_text())
    assert (
        sorted(sum(table["superclasses"].values(), []))
        == table["pickle_label_names"]
        == sorted(_classes("fc100"))
    )
    for split, supers in table["superclass_split"].items():
        assert sorted(c for s in supers for c in table["superclasses"][s]) == table[split]
    assert [len(table["superclass_split"][s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(_classes("cifar_fs")) == sorted(_classes("fc100"))


def test_fine_grained_class_lists_match_learn2learn() -> None:
    aircraft = pytest.importorskip("learn2learn.vision.datasets.fgvc_aircraft")
    cub = pytest.importorskip("learn2learn.vision.datasets.cu_birds200")
    assert sorted(_classes("fgvc_aircraft")) == sorted(aircraft.SPLITS["all"])
    assert sorted(_classes("cub200")) == sorted(sum(cub.SPLITS.values(), []))


# ------------------------------------------------------------------------------ preparation


@pytest.mark.parametrize("key", sorted(RELEASES))
def test_prepare_each_layout(key: str, releases: dict[str, Path], tmp_path: Path) -> None:
    name, _, exact = RELEASES[key]
    spec = DATASETS[name]
    assert PREPARERS[name].is_raw(releases[key])
    ds = ArrowFewShotDataset(PREPARERS[name].prepare(releases[key], tmp_path / name, spec.default_image_size))
    split = load_split(name)
    size = spec.default_image_size
    assert ds.name == name and ds.shape == (size, size, 3) and ds.images.dtype == np.uint8
    assert ds.images.shape == (sum(COUNTS[name]) * PER_CLASS, size, size, 3)
    for s in ("train", "val", "test"):
        assert [ds.class_names[label] for label in ds.split_labels(s)] == split[s]
    sizes = ds.class_ranges[:, 1] - ds.class_ranges[:, 0]
    assert (sizes == PER_CLASS).all()
    # pixels: every image is the solid colour of its class (fake builders index classes alphabetically,
    # mini-ImageNet in split-file order)
    order = _classes(name) if name == "mini_imagenet" else sorted(_classes(name))
    for label in (0, len(ds.class_names) - 1):
        start = ds.class_ranges[label, 0]
        colours = {tuple(_colour(order.index(ds.class_names[label]), j)) for j in range(PER_CLASS)}
        got = tuple(int(v) for v in ds.images[start].reshape(-1, 3).mean(0).round())
        assert min(np.abs(np.subtract(got, c)).max() for c in colours) <= (0 if exact else 4)
    meta = ds.meta
    assert meta["preprocess"]["size"] == [size, size] and len(meta["preprocess"]["mean"]) == 3
    assert meta["source"]["split_file"] == f"tsmd_ray/data/splits/{name}.json"


def test_pickles_are_named_in_a_warning(releases, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tsmd_ray.data.releases"):
        DATASETS["mini_imagenet"].prepare(releases["mini_pickle"], tmp_path / "out")
    warned = [r.getMessage() for r in caplog.records if "unpickling" in r.getMessage()]
    assert len(warned) == 3 and "mini-imagenet-cache-validation.pkl" in " ".join(warned)


def test_image_size_resizes_and_rgba_is_converted(releases, tmp_path, caplog) -> None:
    root = _copy(releases, "dogs", tmp_path)
    rgba = sorted((root / "Images").glob("*/*.jpg"))[0]
    _save(rgba, (10, 20, 30), fmt="PNG", mode="RGBA")  # a PNG with alpha behind a .jpg name
    with caplog.at_level(logging.WARNING, logger="tsmd_ray.data.paper_datasets"):
        ds = ArrowFewShotDataset(DATASETS["stanford_dogs"].prepare(root, tmp_path / "out", image_size=40))
    assert ds.shape == (40, 40, 3)
    assert any(str(rgba) in r.getMessage() and "RGBA" in r.getMessage() for r in caplog.records)


def test_cli_and_resolve_dataset(releases, tmp_path, caplog) -> None:
    assert main(["prepare", "cub200", "--source", str(releases["cub"]), "--out", str(tmp_path / "cub")]) == 0
    ds = ArrowFewShotDataset(tmp_path / "cub")
    assert ds.shape == (84, 84, 3)
    first = sorted((releases["cub"] / "CUB_200_2011" / "images").glob("*/*.jpg"))[0]  # row 0 of label 0
    stored = normalise(torch.from_numpy(ds.images[0].copy()).permute(2, 0, 1), ds.preprocess)
    assert torch.equal(load_image(first, ds.preprocess), stored)  # same preprocessing as load_image
    assert (
        main(["prepare", "cub200", "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    )
    assert "no cub200 release found" in caplog.text  # the one error line
    # a raw release as --data-root is prepared once into the cache
    path = resolve_dataset("fc100", releases["fc100_python"], tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and ArrowFewShotDataset(path).name == "fc100"
    with pytest.raises(DataRootError, match="cannot be downloaded"):
        resolve_dataset("stanford_dogs", None, tmp_path / "cache")


# ------------------------------------------------------------------------------ broken releases


def _break_mini_pickle(root: Path) -> None:
    (root / "mini-imagenet-cache-test.pkl").unlink()


def _corrupt_pickle(root: Path) -> None:
    (root / "mini-imagenet-cache-train.pkl").write_bytes(b"not a pickle")


def _first_image(root: Path, pattern: str) -> Path:
    path = sorted(root.glob(pattern))[0]
    path.write_bytes(b"\xff\xd8 truncated")
    return path


def _extra_class(folder: Path, cls: str, name: str = "x.jpg") -> None:
    _save(folder / cls / name, (1, 2, 3))


BROKEN = [
    # (release, how to break it, error, message pattern)
    ("mini_pickle", _break_mini_pickle, DataRootError, "mini-imagenet-cache-test.pkl is missing"),
    ("mini_pickle", _corrupt_pickle, DataRootError, "cannot unpickle .*mini-imagenet-cache-train.pkl"),
    ("mini_csv", lambda r: shutil.rmtree(r / "images"), DataRootError, "images folder .* is missing"),
    ("mini_csv", lambda r: (r / "val.csv").unlink(), DataRootError, "val.csv is missing"),
    (
        "mini_csv",
        lambda r: _first_image(r, "images/*.jpg"),
        ImageReadError,
        r"cannot read image .*images/n\d+",
    ),
    (
        "cifar_fs_python",
        lambda r: (r / "cifar-100-python" / "meta").unlink(),
        DataRootError,
        "meta is missing",
    ),
    ("cifar_fs_png", lambda r: _first_image(r, "cifar100/data/*/*.png"), ImageReadError, "apple_0.png"),
    (
        "cifar_fs_png",
        lambda r: _extra_class(r / "cifar100" / "data", "unicorn"),
        SplitError,
        "'unicorn'.* in no split",
    ),
    (
        "fc100_pickle",
        lambda r: (r / "FC100_val.pickle").unlink(),
        DataRootError,
        "FC100_val.pickle is missing",
    ),
    (
        "aircraft",
        lambda r: shutil.rmtree(r / "fgvc-aircraft-2013b/data/images"),
        DataRootError,
        "images folder",
    ),
    (
        "aircraft",
        lambda r: (r / "fgvc-aircraft-2013b/data/images_variant_val.txt").unlink(),
        DataRootError,
        "images_variant_val.txt is missing",
    ),
    (
        "aircraft",
        lambda r: _first_image(r, "fgvc-aircraft-2013b/data/images/*.jpg"),
        ImageReadError,
        "1000000.jpg",
    ),
    (
        "aircraft",
        lambda r: open(r / "fgvc-aircraft-2013b/data/images_variant_test.txt", "a").write(
            "1999999 Concorde\n"
        ),
        SplitError,
        "'Concorde'.* in no split .*fgvc_aircraft.json",
    ),
    (
        "aircraft",
        lambda r: open(r / "fgvc-aircraft-2013b/data/images_variant_test.txt", "a").write("1999999\n"),
        DataRootError,
        r"images_variant_test.txt:\d+: expected",
    ),
    ("cub", lambda r: (r / "CUB_200_2011/classes.txt").unlink(), DataRootError, "classes.txt is missing"),
    ("cub", lambda r: shutil.rmtree(r / "CUB_200_2011/images"), DataRootError, "images folder"),
    (
        "cub",
        lambda r: _first_image(r, "CUB_200_2011/images/*/*.jpg"),
        ImageReadError,
        "Black_footed_Albatross_0000.jpg",
    ),
    (
        "cub",
        lambda r: open(r / "CUB_200_2011/classes.txt", "a").write("201 201.Dodo\n"),
        SplitError,
        "'201.Dodo'.* in no split",
    ),
    ("dogs", lambda r: shutil.rmtree(r / "Images"), DataRootError, "no stanford_dogs release found"),
    (
        "dogs",
        lambda r: _extra_class(r / "Images", "n00000001-Wolf"),
        SplitError,
        "'n00000001-Wolf'.* in no split",
    ),
    (
        "dogs",
        lambda r: shutil.rmtree(sorted((r / "Images").iterdir())[0]),
        DataRootError,
        "1 of the 120 .*Chihuahua",
    ),
    ("dogs", lambda r: _first_image(r, "Images/*/*.jpg"), ImageReadError, "n02085620_0.jpg"),
]


@pytest.mark.parametrize(
    "key, breaker, error, pattern", BROKEN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)]
)
def test_broken_release_raises_a_clear_error(key, breaker, error, pattern, releases, tmp_path) -> None:
    name = RELEASES[key][0]
    root = _copy(releases, key, tmp_path)
    breaker(root)
    with pytest.raises(error, match=pattern):
        DATASETS[name].prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_release_split_disagreeing_with_the_split_file(releases, tmp_path) -> None:
    root = _copy(releases, "cifar_fs_png", tmp_path)
    lists = root / "cifar100" / "splits" / "bertinetto"
    first_val, *rest = (lists / "val.txt").read_text().splitlines(True)
    (lists / "val.txt").write_text("".join(rest))
    (lists / "train.txt").write_text(
        (lists / "train.txt").read_text() + first_val
    )  # a val class moved to train
    with pytest.raises(SplitError, match=f"puts class '{first_val.strip()}' in 'train', .* in 'val'"):
        DATASETS["cifar_fs"].prepare(root, tmp_path / "out")
    # FC100 pickle labels are CIFAR-100 fine ids: a test class inside the train pickle is refused
    root = _copy(releases, "fc100_pickle", tmp_path)
    pickled = pickle.loads((root / "FC100_train.pickle").read_bytes())
    pickled["labels"][0] = json.loads(split_file("fc100").read_text())["pickle_label_names"].index("baby")
    (root / "FC100_train.pickle").write_bytes(pickle.dumps(pickled))
    with pytest.raises(
        SplitError, match="FC100_test.pickle: class 'baby' is listed in both 'train' and 'test'"
    ):
        DATASETS["fc100"].prepare(root, tmp_path / "out")
