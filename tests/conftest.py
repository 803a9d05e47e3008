"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def omniglot_source() -> Path:
    """Directory holding the Omniglot "background small" zips, from ``$TSMD_OMNIGLOT``."""
    value = os.environ.get("TSMD_OMNIGLOT")
    if not value or not Path(value).is_dir():
        pytest.fail(
            "set TSMD_OMNIGLOT to the directory holding images_background_small1.zip and "
            f"images_background_small2.zip (e.g. /work/shared/data/omniglot); got {value!r}"
        )
    return Path(value)


@pytest.fixture(scope="session")
def omniglot_dataset(omniglot_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Omniglot data prepared once (28x28) for the session; returns the dataset dir."""
    from tsmd_ray.data import prepare_omniglot

    return prepare_omniglot(omniglot_source, tmp_path_factory.mktemp("prepared") / "omniglot")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance (2 CPUs) for one test module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()
