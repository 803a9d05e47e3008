"""Checkpoints: atomic writes, and one clear line for every file that is not a checkpoint."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tsmd_ray.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint


class NotATensor:
    pass


def test_round_trip_adds_the_format_version(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"iteration": 3, "w": torch.ones(2)})
    payload = load_checkpoint(path)
    assert payload["format_version"] == 1 and payload["iteration"] == 3 and torch.equal(payload["w"], torch.ones(2))


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.pt"
    path.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


@pytest.mark.parametrize("content, reason", [
    (b"just some notes\n", "not a complete file written by torch.save"),
    (b"", "not a complete file written by torch.save"),
    ("truncated", "not a complete file written by torch.save"),
    ("objects", "it holds Python objects other than tensors"),
    ("state dict", "it holds no format_version .*--teacher-init"),
])
def test_files_that_are_not_checkpoints_are_named_in_one_line(tmp_path, content, reason):
    path = tmp_path / "model.pt"
    if content == "truncated":
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif content == "objects":
        torch.save({"w": NotATensor()}, path)
    elif content == "state dict":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"model.pt is not a tsmd-ray checkpoint: {reason}") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_evaluate_cli_says_a_text_file_is_not_a_checkpoint(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("not a model\n")
    proc = subprocess.run([sys.executable, "-m", "tsmd_ray.evaluate", "--checkpoint", str(notes)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "notes.pt is not a tsmd-ray checkpoint" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
