"""Put runs that could not be tracked into MLflow later, and the ``python -m tsmd_ray.tracking`` CLI."""
from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from ..config import Config
from .datasets import dataset_input
from .models import log_models_from_checkpoint
from .naming import run_name, run_tags, source_tags
from .records import (config_params, existing_run, log_metrics, log_params, log_run_artifacts, logged_steps,
                      read_run_file, run_parent, write_run_file)
from .store import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, TrackingError, connect, ensure_experiment, log,
                    resolve_tracking_uri, short_error, ui_link)


def _run_status(out: Path) -> str:
    return "FINISHED" if (out / "evaluation.json").is_file() else "FAILED"


def upload_run(out: str | Path, *, tracking_uri: str | None = None, experiment: str | None = None,
               parent_run_id: str | None = None, log_models: bool = True) -> str:
    """Replay a run's output directory into MLflow: params from ``config.yaml``, every record of
    ``metrics.jsonl``, the dataset input and code version the run recorded, the artifacts and the
    models of ``checkpoint.pt``. A run this store already holds (partly tracked before the server
    went away) is completed, not duplicated. Returns the run id; raises :class:`TrackingError`
    when the store does not answer."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from ..plots import read_metrics

    out = Path(out).resolve()
    if not (out / "config.yaml").is_file():
        raise FileNotFoundError(f"{out} holds no config.yaml: not the output directory of a tsmd_ray run")
    cfg = Config.from_yaml(out / "config.yaml")
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    info = read_run_file(out)
    experiment = experiment or cfg.experiment
    experiment_id = ensure_experiment(client, experiment, uri)
    parent_run_id = parent_run_id or info.get("parent_run_id")
    run = existing_run(client, info, uri)
    if run and parent_run_id and run_parent(run) not in (None, parent_run_id):
        run = None  # a copy of a cell another grid has nested (shared Student cells): a run of its own
    skip: set[tuple[str, int]] = set()
    if run:
        run_id = run.info.run_id
        skip = logged_steps(client, run_id)
        if parent_run_id:  # a run tracked on its own, now nested (a grid's cell)
            client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, parent_run_id)
        log_params(client, run_id, config_params(cfg), run.data.params)
    else:
        tags = {**(info.get("source") or source_tags()), **run_tags(cfg, nested=parent_run_id is not None),
                "tsmd.uploaded": "true", "tsmd.out": str(out)}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run_id = client.create_run(experiment_id, run_name=run_name(cfg), tags=tags).info.run_id
        log_params(client, run_id, config_params(cfg))
    where = dict(tracking_uri=uri, experiment=experiment, experiment_id=experiment_id, run_id=run_id,
                 parent_run_id=parent_run_id)
    try:
        if info.get("dataset"):
            client.log_inputs(run_id, datasets=[dataset_input(info["dataset"])])
        records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
        count = log_metrics(client, run_id, [(int(r["step"]), r) for r in records], skip)
        log_run_artifacts(client, run_id, out, title=run_name(cfg))
        if log_models and (out / "checkpoint.pt").is_file():
            log_models_from_checkpoint(run_id, out / "checkpoint.pt", uri)
    except Exception as exc:  # the run stays FAILED in the store; the next upload completes it
        write_run_file(out, **where, status="pending_upload", error=short_error(exc))
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status=_run_status(out))
    write_run_file(out, **where, status="logged", error=None)
    log.info("uploaded %s as MLflow run %s (%d metric values) to %s", out, run_id, count, uri)
    return run_id


def print_where(uri: str) -> None:
    """The tracking URI, how to open the UI, and a link to each model-training experiment's runs."""
    print(uri)
    if uri.startswith("sqlite:"):
        print(f"open the UI with: mlflow ui --backend-store-uri {uri}")
        if not Path(uri[len("sqlite:///"):]).is_file():
            return  # no runs yet (and no database to create just for this)
    try:
        experiments = connect(uri).search_experiments(
            filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = '{MODEL_TRAINING_KIND}'")
    except TrackingError as exc:
        print(f"(no experiment list: {exc})")
        return
    for experiment in experiments:
        print(f"  {experiment.name}: {ui_link(uri, experiment.experiment_id)}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tsmd_ray.tracking upload RUN_DIR ...`` and ``... where``."""
    from . import __doc__ as doc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m tsmd_ray.tracking", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="put runs that could not be tracked into MLflow")
    up.add_argument("out", nargs="+", help="output directories of tsmd_ray.train runs (or Tune trials)")
    up.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the local SQLite store")
    up.add_argument("--experiment", help="default: the run's configured experiment")
    up.add_argument("--parent-run-id", help="nest the uploaded runs under this run (a sweep)")
    up.add_argument("--no-models", action="store_true", help="do not log the student/teacher models")
    sub.add_parser("where", help="print the tracking URI in use and how to open the UI")
    args = parser.parse_args(argv)
    if args.command == "where":
        print_where(resolve_tracking_uri())
        return 0
    status = 0
    for out in args.out:
        try:
            run_id = upload_run(out, tracking_uri=args.tracking_uri, experiment=args.experiment,
                                parent_run_id=args.parent_run_id, log_models=not args.no_models)
            print(f"{out}: MLflow run {run_id}")
        except (TrackingError, FileNotFoundError, ValueError) as exc:
            log.error("%s: %s", out, exc)
            status = 2
    return status
