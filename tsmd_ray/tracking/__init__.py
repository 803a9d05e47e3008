"""MLflow tracking of training runs and sweeps, and the upload of runs that could not be tracked.

Every ``tsmd_ray.train`` run (and every Tune trial) with ``mlflow: true`` becomes one MLflow run
in a model-training experiment (tag ``mlflow.experimentKind``):

- name: ``<method>-<config digest>-seed<seed>-<dataset>-<ways>w<shots>s`` (``--run-name`` overrides);
- params: every :class:`~tsmd_ray.config.Config` value;
- metrics (stable, grouped names, stepped by meta-iteration): ``train/<model>/loss``,
  ``train/<model>/acc`` and ``train/tasks_per_s``, ``val/<model>_acc`` at each meta-validation,
  ``test/<model>_acc`` and ``test/<model>_ci95``; ``system/...`` (CPU, memory, GPU) unless
  ``--no-system-metrics``;
- the prepared dataset as an MLflow dataset input (name, digest of its files, path, splits), and
  the code version as MLflow source tags (entry point, git commit, dirty flag);
- artifacts: ``config.yaml``, ``evaluation.json``, ``metrics.jsonl``, ``learning_curves.png``;
- models: the meta-trained student (and the adapted teacher of ``tsmd``/``oracle``) as MLflow
  PyTorch models in the ``pt2`` format, with an input example shaped like the checkpoint's data.

Where: ``$MLFLOW_TRACKING_URI`` when set (a tracking server, ``http://host:5000``, for anything
multi-node), otherwise the SQLite database ``$TSMD_HOME/mlflow.db`` (``TSMD_HOME`` defaults to
``~/.tsmd_ray``) with artifacts in ``$TSMD_HOME/mlartifacts``: absolute paths, so a Ray job's
temporary working directory does not matter. The legacy ``./mlruns`` file store is never used.

When the tracking server cannot be reached, training goes on: one warning, the results stay in
the run's output directory (``checkpoint.pt``, ``metrics.jsonl``, ``evaluation.json``), and

    python -m tsmd_ray.tracking upload RUN_OUT_DIR [RUN_OUT_DIR ...]

replays them into MLflow later. ``python -m tsmd_ray.tracking where`` prints the tracking URI.

Modules: ``store`` (URI, connection, experiments), ``records`` (params, metrics, run file,
artifacts), ``naming`` (run names, tags, code version), ``datasets`` (dataset input), ``models``,
``tracker`` (the run tracker), ``ending`` (ending runs FINISHED, FAILED or KILLED with the error
as their ``tsmd.error`` tag, nested and orphaned runs included), ``upload`` (upload and the command line),
``grid`` (a results grid's parent run, its cells nested under it).
"""
from .datasets import dataset_info, dataset_input, try_dataset_info
from .grid import close_grid_run, nest_cells, open_grid_run
from .ending import ERROR_TAG, end_child_runs, end_run, end_run_in, ends_run_in
from .models import input_example, log_models_from_checkpoint
from .naming import code_version, config_digest, default_run_name, run_name, run_tags, source_tags, trial_run_name
from .records import (ARTIFACT_FILES, CURVES_FILE, RUN_FILE, config_params, log_metrics, log_params,
                      log_run_artifacts, param_value, read_run_file, write_learning_curves, write_run_file)
from .store import (EXPERIMENT_KIND_TAG, HTTP_BOUNDS, MODEL_TRAINING_KIND, PROBE_TIMEOUT_S, TrackingError,
                    artifact_location, bound_http_retries, connect, default_tracking_uri, ensure_experiment,
                    resolve_tracking_uri, short_error, tsmd_home)
from .tracker import MlflowTracker, NullTracker, tracker
from .upload import main, upload_run

__all__ = [
    "ARTIFACT_FILES", "CURVES_FILE", "ERROR_TAG", "EXPERIMENT_KIND_TAG", "HTTP_BOUNDS", "MODEL_TRAINING_KIND",
    "MlflowTracker", "NullTracker", "PROBE_TIMEOUT_S", "RUN_FILE", "TrackingError", "artifact_location",
    "bound_http_retries", "close_grid_run", "code_version", "config_digest", "config_params", "connect", "dataset_info",
    "dataset_input", "default_run_name", "default_tracking_uri", "end_child_runs", "end_run", "end_run_in",
    "ends_run_in", "ensure_experiment", "input_example", "log_metrics", "log_models_from_checkpoint", "log_params",
    "log_run_artifacts", "main", "nest_cells", "open_grid_run", "param_value", "read_run_file", "resolve_tracking_uri", "run_name", "run_tags",
    "short_error", "source_tags", "tracker", "trial_run_name", "try_dataset_info", "tsmd_home", "upload_run",
    "write_learning_curves", "write_run_file",
]
