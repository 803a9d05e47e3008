"""The meta-trained student (and adapted teacher) of a checkpoint as MLflow PyTorch models."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from .store import log, short_error


def input_example(in_channels: int, image_size: int, batch: int = 5) -> Any:
    """A float32 NCHW batch shaped like the network input (batch > 1 keeps the batch dim dynamic)."""
    import numpy as np

    shape = (max(2, batch), in_channels, image_size, image_size)
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


def _pip_requirements() -> list[str]:
    import mlflow
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]


def log_models_from_checkpoint(run_id: str, checkpoint: str | Path, uri: str) -> list[str]:
    """Log the student (and the adapted teacher) of ``checkpoint`` as MLflow PyTorch models.

    The models are the meta-learned initialisations (adapt them to a task before predicting);
    ``pt2`` format (``torch.export``) with an input example shaped from the checkpoint's data
    spec; where export fails, the pickle format is used instead (loading it needs tsmd_ray).
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from ..checkpoint import load_checkpoint
    from ..engine import DataSpec, MetaLearner

    payload = load_checkpoint(checkpoint)
    cfg = Config.from_checkpoint(payload["config"])
    data = payload["data"]
    learner = MetaLearner(cfg, DataSpec(int(data["in_channels"]), int(data["image_size"])))
    learner.load_state_dict(payload["learner"])
    example = input_example(int(data["in_channels"]), int(data["image_size"]), cfg.ways)
    metadata = {"iteration": int(payload["iteration"]) + 1, "dataset": data.get("dataset", cfg.dataset),
                "ways": cfg.ways, "shots": cfg.shots, "preprocess": data.get("preprocess", {}),
                "note": "meta-learned initialisation: adapt on a task's support set before predicting "
                        "(batch-norm statistics come from the batch)"}
    models = {"student": learner.student}
    if cfg.adapts_teacher:
        models["teacher"] = learner.teacher
    mlflow.set_tracking_uri(uri)
    logged = []
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        for name, module in models.items():
            if module is None:
                continue
            module = module.float().eval()
            with torch.no_grad():
                signature = infer_signature(example, module(torch.from_numpy(example)).numpy())
            kwargs = dict(name=name, input_example=example, signature=signature,
                          pip_requirements=_pip_requirements(), metadata=metadata)
            try:
                mlflow.pytorch.log_model(module, serialization_format="pt2", **kwargs)
            except Exception as exc:
                if isinstance(exc, (ConnectionError, OSError)) or "Connection" in type(exc).__name__:
                    raise
                log.warning("torch.export of the %s failed (%s); logging it in the pickle format",
                            name, short_error(exc))
                mlflow.pytorch.log_model(module, serialization_format="pickle", **kwargs)
            logged.append(name)
    return logged
