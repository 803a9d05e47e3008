"""Ray-distributed meta-training: worker actors (:mod:`.actors`) and the driver's runner (:mod:`.driver`).

``RayRunner`` implements :class:`tsmd_ray.training.Runner`; ``python -m tsmd_ray.train`` uses it
unless ``--backend local``. Importing this package imports Ray.
"""
from .actors import TaskActor, to_numpy, to_torch
from .driver import (
    DRIVER_RETRIES,
    MAX_RESTARTS,
    MAX_TASK_RETRIES,
    CallStats,
    RayRunner,
    WorkerPlan,
    plan_workers,
    split_blocks,
)

__all__ = [
    "DRIVER_RETRIES",
    "MAX_RESTARTS",
    "MAX_TASK_RETRIES",
    "CallStats",
    "RayRunner",
    "TaskActor",
    "WorkerPlan",
    "plan_workers",
    "split_blocks",
    "to_numpy",
    "to_torch",
]
