"""Client-side adaptation (tsmd_ray.adapt) on Omniglot characters training never saw.

A tiny teacher/student pair is meta-trained once on the train split; the client's support
folders hold the original 105x105 PNGs of held-out (test split) characters. Run with ``-s`` to
see the accuracy table (TSMD vs plain MAML adaptation, batch-norm policies).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from tsmd_ray.adapt import (adapt, adapt_models, build_client_models, build_parser, load_server_checkpoint, main,
                            support_files)
from tsmd_ray.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tsmd_ray.config import Config
from tsmd_ray.data import ChannelMismatchError, ImageReadError, read_meta
from tsmd_ray.engine import DataSpec, MetaLearner
from tsmd_ray.export import freeze_batchnorm
from tsmd_ray.predict import AdaptedModel, ClientError, load_images

# Test-split alphabets of the "background small" profile and the zip that holds each.
HELD_OUT = {"Early_Aramaic": "images_background_small1.zip", "Tagalog": "images_background_small2.zip"}
QUERY_DRAWINGS = 15  # the last 15 of each character's 20 drawings; support comes from the first 5
TINY_PAIR = dict(backend="local", mlflow=False, method="tsmd", teacher="conv4", teacher_widths=[32] * 4,
                 student_widths=[16] * 4, ways=5, shots=1, query=5, meta_batch=4, inner_steps=3, alpha=0.1,
                 lam=0.1, beta=3e-3, eta=3e-3, iterations=40, eval_every=0, test_episodes=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine, OpenMP spinning makes 2 threads ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def extract_characters(source: Path, dest: Path, characters: list[tuple[str, int]], shots: int
                       ) -> tuple[Path, dict[str, list[Path]]]:
    """Original PNGs of ``(alphabet, character)`` pairs: the first ``shots`` drawings into
    ``dest/support/<alphabet>_<character>/``; the last 15 returned as query files per class."""
    support, query = dest / "support", {}
    for alphabet, number in characters:
        with zipfile.ZipFile(source / HELD_OUT[alphabet]) as archive:
            names = sorted(n for n in archive.namelist()
                           if f"/{alphabet}/character{number:02d}/" in n and n.endswith(".png"))
            name = f"{alphabet}_{number:02d}"
            query[name] = []
            for i, member in enumerate(names):
                if i < shots or i >= len(names) - QUERY_DRAWINGS:
                    folder = support / name if i < shots else dest / "query" / name
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / Path(member).name).write_bytes(archive.read(member))
                    if i >= shots:
                        query[name].append(folder / Path(member).name)
    return support, query


def write_untrained_checkpoint(path: Path, dataset: Path, **changes) -> Path:
    """A server checkpoint with freshly initialised weights (for input checks, not accuracy)."""
    cfg = Config(**{**TINY_PAIR, "student_widths": [8] * 4, "teacher_widths": [8] * 4, **changes})
    payload = {"config": cfg.to_dict(), "iteration": 0, "learner": MetaLearner(cfg, DataSpec(1, 28)).state_dict(),
               "data": {"in_channels": 1, "image_size": 28, "preprocess": read_meta(dataset)["preprocess"]}}
    return save_checkpoint(path, payload)


def with_config(checkpoint: Path, dest: Path, **changes) -> Path:
    """A copy of ``checkpoint`` whose configuration has ``changes``."""
    payload = load_checkpoint(checkpoint)
    return save_checkpoint(dest, {**payload, "config": {**payload["config"], **changes}})


def accuracy(predictions: list[dict], query: dict[str, list[Path]]) -> float:
    truth = {str(p): name for name, paths in query.items() for p in paths}
    return sum(r["class"] == truth[r["path"]] for r in predictions) / len(predictions)


@pytest.fixture(scope="module")
def server_checkpoint(omniglot_dataset, tmp_path_factory) -> Path:
    """A tiny TSMD pair (Conv-4 teacher 32 wide, student 16 wide) meta-trained 40 iterations."""
    from tsmd_ray.train import run

    out = tmp_path_factory.mktemp("server")
    started = time.perf_counter()
    run(Config(**TINY_PAIR, data_root=str(omniglot_dataset), out=str(out)))
    print(f"\nmeta-training the tiny pair took {time.perf_counter() - started:.1f} s")
    return out / "checkpoint.pt"


@pytest.fixture
def untrained(tmp_path, omniglot_dataset) -> Path:
    return write_untrained_checkpoint(tmp_path / "server.pt", omniglot_dataset)


@pytest.fixture
def small_support(tmp_path, omniglot_source) -> Path:
    support, _ = extract_characters(omniglot_source, tmp_path / "client",
                                    [("Tagalog", 1), ("Tagalog", 2), ("Tagalog", 3)], shots=1)
    return support


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def adapted(server_checkpoint, omniglot_source, tmp_path_factory):
    """Both client methods run through the CLI on one 5-way 5-shot support folder."""
    root = tmp_path_factory.mktemp("client")
    chars = [("Early_Aramaic", c) for c in (1, 2, 3)] + [("Tagalog", c) for c in (4, 5)]
    support, query = extract_characters(omniglot_source, root, chars, shots=5)
    for method in ("tsmd", "student"):
        assert main(["--checkpoint", str(server_checkpoint), "--support", str(support),
                     "--out", str(root / method), "--method", method, "--device", "cpu"]) == 0
    return root, support, query


def test_adapted_students_classify_held_out_characters(adapted):
    root, _, query = adapted
    files = [p for paths in query.values() for p in paths]
    results = {method: accuracy(AdaptedModel.load(root / method).predict(files), query)
               for method in ("tsmd", "student")}
    print(f"\n5-way 5-shot, {len(files)} query drawings: TSMD-adapted student {results['tsmd']:.3f}, "
          f"MAML-adapted student {results['student']:.3f} (chance 0.200)")
    # A 40-iteration pair reaches ~0.6-0.9 here; 0.4 is twice chance.
    assert results["tsmd"] > 0.4 and results["student"] > 0.4, results


def test_report_compares_student_with_teacher(adapted):
    root, support, _ = adapted
    report = json.loads((root / "tsmd" / "report.json").read_text())
    assert report["classes"] == sorted(p.name for p in support.iterdir())
    assert report["method"] == "tsmd" and report["teacher"]["adapted"] is True
    student, teacher = report["student"], report["teacher"]
    assert student["parameters"] < teacher["parameters"] and student["state_dict_bytes"] < teacher["state_dict_bytes"]
    for model in (student, teacher):
        assert model["cpu_latency_per_image"]["median_ms"] > 0
    assert set(report["files_bytes"]) == {"student.pt", "student.pt2"}
    assert json.loads((root / "tsmd" / "deploy.json").read_text())["classes"] == report["classes"]
    assert json.loads((root / "student" / "report.json").read_text())["teacher"]["adapted"] is False
    print(f"\nstudent {student['parameters']} parameters, {student['state_dict_bytes']} B, "
          f"{student['cpu_latency_per_image']['median_ms']:.3f} ms/image; teacher {teacher['parameters']}, "
          f"{teacher['state_dict_bytes']} B, {teacher['cpu_latency_per_image']['median_ms']:.3f} ms/image")


def test_export_runs_in_a_fresh_process_with_torch_only(adapted, tmp_path):
    root, _, query = adapted
    files = [p for paths in query.values() for p in paths]
    model = AdaptedModel.load(root / "tsmd")
    x = load_images(files, model.preprocess)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        f"program = torch.export.load({str(root / 'tsmd' / 'student.pt2')!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save({{'batch': program(x), 'one': program(x[:1])}}, {str(tmp_path / 'y.pt')!r})\n"
        "assert not any(m.startswith('tsmd_ray') for m in sys.modules), 'tsmd_ray was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    exported = torch.load(tmp_path / "y.pt")
    expected = model.logits(x)
    torch.testing.assert_close(exported["batch"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exported["one"], expected[:1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- methods and batch norm


def test_tsmd_against_maml_and_batch_norm_policies(server_checkpoint, omniglot_source, tmp_path):
    """Four held-out 5-way tasks x {1, 5} shots x {TSMD, MAML} adaptation; query accuracy with
    batch norm frozen to support statistics (deployed), with the whole query batch's statistics
    (the meta-test protocol, transductive) and with each image's own statistics (batch of one)."""
    tasks = [[("Early_Aramaic", c) for c in range(1, 6)], [("Early_Aramaic", c) for c in range(6, 11)],
             [("Tagalog", c) for c in range(1, 6)], [("Tagalog", c) for c in range(6, 11)]]
    cfg0, data = load_server_checkpoint(server_checkpoint)
    table: dict[tuple[int, str, str], list[float]] = {}
    for t, chars in enumerate(tasks):
        for shots in (1, 5):
            support, query = extract_characters(omniglot_source, tmp_path / f"{t}-{shots}", chars, shots)
            files = support_files(support)
            x = load_images([p for ps in files.values() for p in ps], data["preprocess"])
            y = torch.arange(len(files)).repeat_interleave(shots)
            qx = load_images([p for name in files for p in query[name]], data["preprocess"])
            qy = torch.arange(len(files)).repeat_interleave(QUERY_DRAWINGS)
            for method in ("tsmd", "maml"):
                teacher, student, cfg = build_client_models(cfg0, data, len(files))
                _, student, _ = adapt_models(teacher, student, cfg, x, y, cfg.test_inner_steps, torch.device("cpu"),
                                             adapt_teacher=method == "tsmd")
                with torch.no_grad():
                    frozen = freeze_batchnorm(student, x)
                    torch.testing.assert_close(frozen(x), student(x), rtol=1e-4, atol=1e-4)  # same on support
                    logits = {"frozen": frozen(qx), "query batch": student(qx),
                              "per image": torch.cat([student(q[None]) for q in qx])}
                for policy, out in logits.items():
                    acc = (out.argmax(-1) == qy).float().mean().item()
                    table.setdefault((shots, method, policy), []).append(acc)
    means = {key: sum(v) / len(v) for key, v in table.items()}
    print("\nheld-out 5-way query accuracy, mean of 4 tasks (chance 0.20)")
    for key, value in sorted(means.items()):
        print(f"  {key[0]}-shot {key[1]:5s} BN {key[2]:12s} {value:.3f}  per task {[round(a, 2) for a in table[key]]}")
    for method in ("tsmd", "maml"):
        assert means[(5, method, "frozen")] > 0.4, means
        assert means[(1, method, "frozen")] > 0.3, means


def test_fewer_classes_use_the_first_rows_of_the_head(server_checkpoint, small_support, tmp_path):
    report = adapt(server_checkpoint, small_support, tmp_path / "out", device="cpu")
    assert report["head_outputs_used"] == "first 3 of 5"
    model = AdaptedModel.load(tmp_path / "out")
    assert model.model.head.out_features == 3
    theta = torch.load(server_checkpoint, weights_only=True)["learner"]["theta"]
    assert theta["head.weight"].shape[0] == 5
    files = sorted(str(p) for p in small_support.rglob("*.png"))
    assert {r["class"] for r in model.predict(files)} <= set(report["classes"])


def test_help_lists_every_option():
    text = build_parser().format_help()
    for option in ("--checkpoint", "--support", "--out", "--method", "--steps", "--device"):
        assert option in text


@pytest.mark.parametrize("method", ["tsmd", "student"])
def test_kd_views_change_the_adapted_student(omniglot_dataset, small_support, tmp_path, method):
    """``kd_views`` in the checkpoint's config reaches the client's adaptation (and nothing else does):
    labelled by the adapted teacher (tsmd) or, for a student-only checkpoint, by the labels."""
    server = write_untrained_checkpoint(tmp_path / "server.pt", omniglot_dataset, method=method)
    students = {}
    for views in (0, 2, 2):
        out = tmp_path / f"views{views}-{len(students)}"
        report = adapt(with_config(server, tmp_path / f"server{views}.pt", kd_views=views), small_support, out,
                       method=method, steps=2, device="cpu")
        assert report["kd_views"] == views
        students[out.name] = AdaptedModel.load(out).model.state_dict()
    zero, two, again = students.values()
    assert all(torch.equal(two[k], again[k]) for k in two)
    assert not all(torch.equal(zero[k], two[k]) for k in zero)


# ------------------------------------------------------------------------------- bad inputs


def test_empty_class_folder(untrained, small_support, tmp_path):
    (small_support / "Empty_class").mkdir()
    with pytest.raises(ClientError, match="Empty_class holds no image files"):
        adapt(untrained, small_support, tmp_path / "out")


def test_single_class(untrained, small_support, tmp_path):
    for folder in sorted(small_support.iterdir())[1:]:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    with pytest.raises(ClientError, match="1 class sub-folder.*Tagalog_01.*at least 2"):
        adapt(untrained, small_support, tmp_path / "out")


def test_unreadable_image(untrained, small_support, tmp_path):
    bad = small_support / "Tagalog_02" / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        adapt(untrained, small_support, tmp_path / "out")


def test_image_with_another_channel_count(untrained, small_support, tmp_path):
    Image.new("RGBA", (105, 105), (255, 255, 255, 0)).save(small_support / "Tagalog_01" / "alpha.png")
    with pytest.raises(ChannelMismatchError, match="alpha.png.*4 channel.*expects 1"):
        adapt(untrained, small_support, tmp_path / "out")


def test_more_classes_than_the_head(untrained, omniglot_source, tmp_path):
    support, _ = extract_characters(omniglot_source, tmp_path, [("Tagalog", c) for c in range(1, 7)], shots=1)
    with pytest.raises(ClientError, match="6 classes but the checkpoint's heads have 5 outputs"):
        adapt(untrained, support, tmp_path / "out")


def test_checkpoint_from_another_version(untrained, small_support, tmp_path):
    payload = torch.load(untrained, weights_only=True)
    payload["format_version"] = 0
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="old.pt has format version 0"):
        adapt(tmp_path / "old.pt", small_support, tmp_path / "out")


def test_cli_reports_bad_input_and_exits_2(untrained, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tsmd_ray.adapt", "--checkpoint", str(untrained),
                           "--support", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "support folder" in proc.stderr and "missing does not exist" in proc.stderr


def test_checkpoints_of_other_server_methods(small_support, omniglot_dataset, tmp_path):
    student_only = write_untrained_checkpoint(tmp_path / "s.pt", omniglot_dataset, method="student")
    with pytest.raises(ClientError, match="method 'student' and has no teacher; adapt with --method student"):
        adapt(student_only, small_support, tmp_path / "a")
    assert adapt(student_only, small_support, tmp_path / "b", method="student", steps=1)["teacher"] is None
    fixed = write_untrained_checkpoint(tmp_path / "f.pt", omniglot_dataset, method="fixed-teacher",
                                       allow_random_teacher=True)
    assert adapt(fixed, small_support, tmp_path / "c", steps=1)["teacher"]["adapted"] is False
    oracle = write_untrained_checkpoint(tmp_path / "o.pt", omniglot_dataset, method="oracle")
    with pytest.raises(ClientError, match="method 'oracle' and has no student"):
        adapt(oracle, small_support, tmp_path / "d")


# ------------------------------------------------------------------------------- evaluation = deployment


def _write_png(x: torch.Tensor, preprocess: dict, path: Path) -> None:
    """Undo ``normalise`` (and the dataset's inversion) so that ``load_images`` gives ``x`` back."""
    mean = torch.tensor(preprocess["mean"]).view(-1, 1, 1)
    std = torch.tensor(preprocess["std"]).view(-1, 1, 1)
    array = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    if preprocess.get("invert", False):
        array = 255 - array
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


@pytest.mark.parametrize("kd_views", [0, 2])
def test_evaluation_equals_deployment_image_by_image(server_checkpoint, omniglot_dataset, tmp_path, kd_views):
    """On the same seeded test episodes, ``evaluate``'s student accuracy is the accuracy of the
    student that ``adapt`` exports and ``predict`` runs: evaluation measures the deployed model.
    With ``kd_views`` the student also distils the adapted teacher on augmented views of the
    support images, which evaluation and the client make alike."""
    from tsmd_ray.data import ArrowFewShotDataset, EpisodeSampler, augmented_views
    from tsmd_ray.evaluate import evaluate_checkpoint

    episodes = 4
    server_checkpoint = with_config(server_checkpoint, tmp_path / "server.pt", kd_views=kd_views)
    evaluated = evaluate_checkpoint(str(server_checkpoint), episodes=episodes, split="test")
    per_episode = evaluated["results"]["student"]["per_episode"]
    cfg, _ = load_server_checkpoint(server_checkpoint)
    dataset = ArrowFewShotDataset(omniglot_dataset)
    sampler = EpisodeSampler(dataset, "test", cfg.ways, cfg.shots, cfg.query, cfg.seed, views=kd_views)
    for task in range(episodes):
        episode = sampler.sample(task)
        root = tmp_path / f"episode{task}"
        support = [root / "support" / f"class{int(y)}" / f"{i}.png" for i, y in enumerate(episode.support_y)]
        for x, path in zip(episode.support_x, support):
            _write_png(x, dataset.preprocess, path)
        if kd_views:  # the client's views of its PNG files are evaluation's views of the episode's images
            client_views = augmented_views(load_images(support, dataset.preprocess), kd_views, cfg.seed,
                                           dataset.preprocess)
            torch.testing.assert_close(client_views, episode.support_views, rtol=0, atol=1e-5)
        files = [root / "query" / f"{i}.png" for i in range(len(episode.query_y))]
        for x, path in zip(episode.query_x, files):
            _write_png(x, dataset.preprocess, path)
        torch.testing.assert_close(load_images(files, dataset.preprocess), episode.query_x, rtol=0, atol=1e-6)
        adapt(server_checkpoint, root / "support", root / "student", method="tsmd", device="cpu")
        predicted = [int(r["class"].removeprefix("class")) for r in AdaptedModel.load(root / "student").predict(files)]
        correct = sum(p == int(y) for p, y in zip(predicted, episode.query_y))
        assert correct == round(per_episode[task] * len(files)), (task, predicted, episode.query_y.tolist())
