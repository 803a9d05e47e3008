"""``python -m tsmd_ray.predict`` on a client-adapted student (untrained weights: format and errors)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_adapt import extract_characters, write_untrained_checkpoint
from tsmd_ray.adapt import adapt
from tsmd_ray.checkpoint import CheckpointError
from tsmd_ray.data import ImageReadError
from tsmd_ray.predict import AdaptedModel, ClientError, build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, omniglot_dataset, omniglot_source) -> tuple[Path, list[Path], Path]:
    """An adapted 3-class model directory, raw query PNGs (105x105) and the server checkpoint."""
    root = tmp_path_factory.mktemp("predict")
    checkpoint = write_untrained_checkpoint(root / "server.pt", omniglot_dataset)
    support, query = extract_characters(omniglot_source, root, [("Tagalog", c) for c in (1, 2, 3)], shots=2)
    adapt(checkpoint, support, root / "model", steps=2, device="cpu")
    return root / "model", [p for paths in query.values() for p in paths][::5], checkpoint


def test_one_line_per_image_with_its_class(model_dir, capsys):
    model, images, _ = model_dir
    assert main(["--model", str(model), *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    assert {line.split("\t")[1] for line in lines} <= {"Tagalog_01", "Tagalog_02", "Tagalog_03"}


def test_json_form_matches_the_lines(model_dir, capsys):
    model, images, _ = model_dir
    main(["--model", str(model), *map(str, images)])
    lines = capsys.readouterr().out.splitlines()
    assert main(["--model", str(model), "--json", *map(str, images)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [f"{r['path']}\t{r['class']}" for r in results] == lines
    assert all(0.33 <= r["probability"] <= 1 for r in results)


def test_each_image_is_predicted_independently_of_its_batch(model_dir):
    model_path, images, _ = model_dir
    model = AdaptedModel.load(model_path)
    together = model.predict(images)
    alone = [model.predict([p])[0] for p in images]
    assert together == alone


def test_checkpoint_preprocessing_travels_with_the_model(model_dir):
    model_path, _, checkpoint = model_dir
    expected = torch.load(checkpoint, weights_only=True)["data"]["preprocess"]
    assert AdaptedModel.load(model_path).preprocess == expected
    assert json.loads((model_path / "deploy.json").read_text())["preprocess"] == expected


def test_cli_module_prints_json(model_dir):
    model, images, _ = model_dir
    proc = subprocess.run([sys.executable, "-m", "tsmd_ray.predict", "--model", str(model), "--json", str(images[0])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["path"] == str(images[0])


def test_help_lists_every_option():
    text = build_parser().format_help()
    for option in ("--model", "IMAGE", "--json", "--device"):
        assert option in text


def test_unreadable_image_is_named(model_dir, tmp_path, caplog):
    model, images, _ = model_dir
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(ImageReadError, match="broken.png"):
        AdaptedModel.load(model).predict([images[0], bad])
    with caplog.at_level(logging.ERROR):
        assert main(["--model", str(model), str(bad)]) == 2
    assert "broken.png" in caplog.text


def test_missing_model_directory(tmp_path):
    with pytest.raises(ClientError, match="model directory .*nowhere does not exist"):
        AdaptedModel.load(tmp_path / "nowhere")


def test_server_checkpoint_directory_is_not_a_model(model_dir):
    _, _, checkpoint = model_dir
    with pytest.raises(CheckpointError, match="student.pt does not exist"):
        AdaptedModel.load(checkpoint.parent)


def test_model_from_another_version(model_dir, tmp_path):
    model, _, _ = model_dir
    payload = torch.load(model / "student.pt", weights_only=True)
    payload["format_version"] = 99
    (tmp_path / "old").mkdir()
    torch.save(payload, tmp_path / "old" / "student.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        AdaptedModel.load(tmp_path / "old")
