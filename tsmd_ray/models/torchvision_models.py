"""torchvision classifiers as teachers: an N-way head on the penultimate embedding."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .layers import replace_batchnorm


def _strip_classifier(model: nn.Module) -> int:
    """Replace the last ``nn.Linear`` of ``model`` by the identity; return its input size."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier to replace")
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    setattr(parent, last_name.rpartition(".")[2], nn.Identity())
    return last.in_features


class TorchvisionClassifier(nn.Module):
    """A torchvision body (classifier removed) followed by an N-way linear head.

    ``adaptable=True`` swaps batch norm for per-task statistics so the body can be adapted
    with MAML; ``adaptable=False`` keeps the pretrained running statistics (fixed teachers).
    """

    def __init__(self, arch: str, ways: int, in_channels: int, weights: str | Path | None = None,
                 adaptable: bool = True) -> None:
        import torchvision  # only here: it imports torch._dynamo, about 6 s in every process

        super().__init__()
        body = torchvision.models.get_model(arch, weights=None)
        self.embedding_dim = _strip_classifier(body)
        if weights is not None:
            _load_body(body, weights)
        self.body = replace_batchnorm(body) if adaptable else body
        self.repeat_channels = 3 // in_channels if in_channels in (1, 3) else 1
        if in_channels not in (1, 3):
            raise ValueError(f"torchvision model {arch!r} takes 1- or 3-channel images, got {in_channels}")
        self.head = nn.Linear(self.embedding_dim, ways)

    def forward(self, x: torch.Tensor, with_embedding: bool = False):
        if self.repeat_channels > 1:
            x = x.expand(-1, 3, -1, -1)
        embedding = self.body(x).flatten(1)
        logits = self.head(embedding)
        return (logits, embedding) if with_embedding else logits


def _load_body(body: nn.Module, path: str | Path) -> None:
    """Load a classifier's weights into ``body``; its own classifier (any size) is ignored."""
    state = load_state_dict(path)
    own = body.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"weights file {path} lacks {len(missing)} tensors of the body, e.g. {missing[0]!r}")
    body.load_state_dict({k: state[k] for k in own})


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local weights file (a state dict, nothing unpickled beyond tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} does not hold a state dict")
    return state
