"""Backbones: shapes, embeddings, and batch norm written from primitive ops."""
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tsmd_ray.models import Conv4, ResNet12, TaskBatchNorm2d, build_model, replace_batchnorm


def test_task_batchnorm_matches_torch_training_mode():
    bn = TaskBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    expected = F.batch_norm(x, None, None, bn.weight.double(), bn.bias.double(), training=True)
    torch.testing.assert_close(bn.double()(x), expected)


def test_replace_batchnorm_keeps_affine_weights_and_drops_running_buffers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[1].weight.fill_(1.5)
    replace_batchnorm(model)
    assert isinstance(model[1], TaskBatchNorm2d)
    assert float(model[1].weight[0].detach()) == 1.5
    assert not list(model.buffers())


@pytest.mark.parametrize("name,channels,size", [("conv4", 1, 28), ("resnet12", 3, 32), ("resnet18", 1, 28)])
def test_models_return_logits_and_embeddings(name, channels, size):
    model = build_model(name, 5, channels, size)
    logits, embedding = model(torch.randn(2, channels, size, size), with_embedding=True)
    assert logits.shape == (2, 5)
    assert embedding.shape == (2, model.embedding_dim)
    assert not list(model.buffers()), "adaptable models keep no running statistics"


def test_widths_are_configurable():
    assert Conv4(5, 1, 28, widths=(8, 8, 8, 8)).embedding_dim == 8
    assert ResNet12(5, 3, 32, widths=(4, 8)).embedding_dim == 8


def test_bad_model_inputs_are_named():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope", 5, 1, 28)
    with pytest.raises(ValueError, match="at least 16 px"):
        Conv4(5, 1, 8)


def test_fixed_torchvision_teacher_loads_local_weights(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(num_classes=10)
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    teacher = build_model("resnet18", 5, 3, 32, weights=tmp_path / "r18.pt", adaptable=False).eval()
    torch.testing.assert_close(teacher.body.conv1.weight, reference.conv1.weight)
    assert isinstance(teacher.body.bn1, nn.BatchNorm2d), "a fixed teacher keeps its running statistics"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model("resnet18", 5, 3, 32, weights=tmp_path / "missing.pt")


def test_only_a_torchvision_teacher_imports_torchvision():
    """torchvision imports torch._dynamo, about 6 s in every process (docs/benchmarks.md, Start-up):
    the training and its Ray actors must not pay it unless a torchvision teacher is built."""
    code = ("import sys, tsmd_ray.training, tsmd_ray.distributed.actors\n"
            "print('torchvision' in sys.modules)\n"
            "from tsmd_ray.models import build_model\n"
            "build_model('resnet18', 5, 1, 28)\n"
            "print('torchvision' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("fused", [False, True])
def test_statistics_from_first_rows_normalise_the_rest(fused):
    """Inside ``statistics_from_first(n)`` the whole batch is normalised with the first n rows'
    statistics (the fused kernel, which can only use the whole batch, steps aside)."""
    from tsmd_ray.models import statistics_from_first

    bn = TaskBatchNorm2d(3).double()
    bn.fused = fused
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    support, query = torch.randn(4, 3, 5, 5, dtype=torch.float64), 3 + torch.randn(6, 3, 5, 5, dtype=torch.float64)
    mean = support.mean(dim=(0, 2, 3), keepdim=True)
    var = support.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (query - mean) / (var + bn.eps).sqrt() * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    with statistics_from_first(4):
        out = bn(torch.cat([support, query]))
    torch.testing.assert_close(out[4:], expected)
    torch.testing.assert_close(out[:4], bn(support))
    assert not torch.allclose(bn(query), expected), "outside the block the query's own statistics apply"
