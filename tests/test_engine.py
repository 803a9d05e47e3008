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
