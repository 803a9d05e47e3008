"""The engine picks the batch-norm kernel that is exact for its task-batching path."""
import pytest
import torch

from tsmd_ray.config import Config
from tsmd_ray.engine import DataSpec, build_models, build_objective
from tsmd_ray.models import TaskBatchNorm2d


@pytest.mark.parametrize("batching,fused", [("loop", True), ("vmap", False)])
def test_fused_batch_norm_only_on_the_per_task_loop(batching, fused):
    cfg = Config(teacher="conv4", teacher_widths=[4, 4, 4, 4], student_widths=[4, 4, 4, 4], task_batching=batching)
    teacher, student = build_models(cfg, DataSpec(1, 28))
    build_objective(cfg, teacher, student, torch.device("cpu"))
    layers = [m for model in (teacher, student) for m in model.modules() if isinstance(m, TaskBatchNorm2d)]
    assert layers and all(layer.fused is fused for layer in layers)


def test_task_workers_distil_on_kd_views_alike_on_both_batching_paths(omniglot_dataset):
    """With kd_views every split's episodes carry views (train: augmented episodes too) and they reach
    the student's meta-gradient; the per-task loop and vmap agree on it."""
    from tsmd_ray.data import ArrowFewShotDataset
    from tsmd_ray.engine import MetaLearner, TaskWorker

    dataset = ArrowFewShotDataset(omniglot_dataset)
    tiny = dict(teacher="conv4", teacher_widths=[4] * 4, student_widths=[4] * 4, ways=3, query=2, meta_batch=2,
                inner_steps=1, dtype="float64")
    weights = MetaLearner(Config(**tiny), DataSpec.of(dataset)).weights()
    grads = {}
    for views, batching in ((0, "loop"), (2, "loop"), (2, "vmap")):
        worker = TaskWorker(Config(**tiny, kd_views=views, task_batching=batching), dataset)
        assert all((worker._tasks(split, [0]).support_views is None) == (views == 0) for split in worker.samplers)
        grads[views, batching] = worker.gradients(weights, [0, 1])[0]["theta"]
    for name, g in grads[2, "loop"].items():
        torch.testing.assert_close(g, grads[2, "vmap"][name], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(grads[0, "loop"]["head.weight"], grads[2, "loop"]["head.weight"])
