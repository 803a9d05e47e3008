"""Screenshots of the MLflow UI for docs/tracking.md (a maintainer's script, not part of CI).

Starts ``mlflow ui`` on a temporary SQLite store, runs tiny trainings (Student once, Ours (TSMD)
with two seeds) and a tiny sweep with tsmd_ray's own commands, then screenshots three pages with
headless Chromium (Debian's ``chromium`` package) driven over the DevTools protocol:

- ``mlflow-runs.png``: the training experiment's runs table;
- ``mlflow-charts.png``: its chart view, Student and Ours overlaid;
- ``mlflow-sweep.png``: the sweep's parallel-coordinates chart.

    python scripts/mlflow_screenshots.py [--out docs/img] [--data-root DIR] [--workdir DIR]

Pages open with ``?workflowType=machine_learning`` (MLflow 3.17's switch to its model-training
pages, see docs/tracking.md). Columns and charts beyond MLflow's defaults (the Version column,
the parallel-coordinates chart) are set as a shared view of the experiment, as the UI's own
"Share" button does. Takes 5-15 minutes on a laptop CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mlflow_screenshots")

TRAIN_EXPERIMENT = "tsmd-ray"
SWEEP_EXPERIMENT = "tsmd-ray-tune"
SHARE_TAG = "mlflow.sharedViewState."  # the MLflow UI's shared views: ?viewStateShareKey=<key>
UI_QUERY = "workflowType=machine_learning"
TINY = ["--backend", "local", "--dataset", "omniglot", "--teacher", "conv4", "--teacher-widths", "16", "16", "16", "16",
        "--student-widths", "16", "16", "16", "16", "--query", "5", "--inner-steps", "1", "--meta-batch", "4",
        "--iterations", "30", "--eval-every", "5", "--val-episodes", "10", "--test-episodes", "20"]
SWEEP_SPACE = {
    "name": "tiny-sweep", "metric": "val/student_acc", "mode": "max", "samples": 6, "searcher": "optuna", "seed": 0,
    "max_concurrent": 2, "scheduler": {"type": "fifo"}, "resources": {"driver_cpus": 1}, "log_models": False,
    "experiment": SWEEP_EXPERIMENT,
    "search": {"alpha": {"loguniform": [0.01, 1.0]}, "lam": {"loguniform": [0.01, 1.0]},
               "beta": {"loguniform": [1.0e-5, 1.0e-2]}, "eta": {"loguniform": [1.0e-4, 1.0e-2]}},
    "base": {"method": "tsmd", "dataset": "omniglot", "teacher": "conv4", "teacher_widths": [16] * 4,
             "student_widths": [16] * 4, "query": 5, "inner_steps": 1, "meta_batch": 4, "iterations": 10,
             "eval_every": 5, "val_episodes": 10, "test_episodes": 20, "backend": "local", "mlflow": True},
}


# ---------------------------------------------------------------------- runs
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(work: Path, timeout: float = 240.0) -> tuple[subprocess.Popen, str]:
    """``mlflow ui`` on 127.0.0.1 over ``work/mlflow.db``, artifacts in ``work/artifacts``."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                             "--artifacts-destination", str(work / "artifacts")],
                            stdout=open(work / "ui.log", "w"), stderr=subprocess.STDOUT, cwd=work)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"mlflow ui did not start; see {work / 'ui.log'}")


def tsmd(module: str, args: list[str], env: dict[str, str]) -> None:
    """``python -m tsmd_ray.<module> ARGS``; raises with the command's output when it fails."""
    log.info("python -m tsmd_ray.%s %s", module, " ".join(args))
    done = subprocess.run([sys.executable, "-m", f"tsmd_ray.{module}", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tsmd_ray.{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def make_runs(work: Path, uri: str, data_root: str) -> None:
    """Student (seed 0), Ours (seeds 0 and 1) and the sweep, tracked at ``uri``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TSMD_HOME": str(work / "home"),
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}
    for method, seed in (("student", 0), ("tsmd", 0), ("tsmd", 1)):
        tsmd("train", [*TINY, "--method", method, "--seed", str(seed), "--data-root", data_root,
                       "--experiment", TRAIN_EXPERIMENT, "--out", str(work / "runs" / f"{method}-{seed}")], env)
    space = work / "tiny-sweep.yaml"
    space.write_text(json.dumps(SWEEP_SPACE))  # JSON is YAML
    tsmd("tune", ["--space", str(space), "--storage", str(work / "tune"), "--set", f"data_root={data_root}"], env)


# ---------------------------------------------------------------------- views
RUN_COLUMNS = {  # the runs table's columns (ag-grid ids) and widths in pixels
    "attributes.`Run Name`": 290, "runDateAndNestInfo": 130, "attributes.`Dataset`": 300, "duration": 85,
    "attributes.`Source`": 140, "attributes.`Version`": 90, "metrics.`test/student_acc`": 180}
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'
OVERRIDE = '[data-component-id="mlflow.experiment_page.shared_view.override"]'
EXPAND_SWEEP = '.ag-row [data-component-id$="runnamecellrenderer.tsx_46"]'
FULLSCREEN = '[data-testid="experiment-view-compare-runs-card"] [data-component-id="fullscreen_button_chartcard"]'


@dataclass
class Page:
    """One screenshot: an experiment's runs page in a mode (TABLE, CHART), the shared view that
    sets it up, clicks made once that view is saved, what shows the page has drawn, clicks before
    the shot."""

    png: str
    experiment: str
    mode: str
    view: dict[str, Any]
    height: int
    ready: str
    setup: tuple[str, ...] = ()
    before: tuple[str, ...] = ()


def parallel_chart_view() -> dict[str, Any]:
    """One parallel-coordinates chart: the searched rates against val/student_acc."""
    chart = {"uuid": "sweep-parallel", "type": "PARALLEL", "runsCountToCompare": 10, "metricSectionId": "sweep",
             "deleted": False, "isGenerated": False, "selectedParams": ["alpha", "lam", "beta", "eta"],
             "selectedMetrics": ["val/student_acc"], "showAllRuns": True}
    section = {"uuid": "sweep", "name": "Sweep", "display": True, "isReordered": False, "deleted": False,
               "isGenerated": False}
    return {"compareRunCharts": [chart], "compareRunSections": [section], "isAccordionReordered": False}


PAGES = (
    Page("mlflow-runs.png", TRAIN_EXPERIMENT, "TABLE", height=420,
         view={"selectedColumns": [c for c in RUN_COLUMNS if c.startswith(("attributes.", "metrics."))
                                   and c != "attributes.`Run Name`"],
               "columnOrder": list(RUN_COLUMNS), "columnWidths": RUN_COLUMNS},
         ready="document.querySelectorAll('.ag-center-cols-container .ag-row').length >= 3"),
    Page("mlflow-charts.png", TRAIN_EXPERIMENT, "CHART", height=1640, view={"chartsSearchFilter": "student"},
         ready="document.querySelectorAll('.js-plotly-plot').length >= 4"),
    Page("mlflow-sweep.png", SWEEP_EXPERIMENT, "CHART", height=900, view=parallel_chart_view(),
         ready="document.querySelectorAll('.js-plotly-plot').length >= 1", setup=(EXPAND_SWEEP,),
         before=(FULLSCREEN,)),
)


def click(selector: str) -> str:
    """JavaScript that clicks the element ``selector`` finds, if any."""
    return f"document.querySelector({json.dumps(selector)})?.click()"


# ---------------------------------------------------------------------- the browser
class Chromium:
    """Headless Chromium on a DevTools websocket: navigate, evaluate JavaScript, capture PNGs."""

    def __init__(self, width: int = 1600, height: int = 1000) -> None:
        self.profile = tempfile.mkdtemp(prefix="tsmd-chromium-")
        self.proc = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.calls = 0

    async def __aenter__(self) -> "Chromium":
        import aiohttp

        port_file = Path(self.profile) / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.calls += 1
        call_id = self.calls
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied: {expression}")
            await asyncio.sleep(0.5)

    async def show(self, url: str, ready: str, height: int) -> None:
        """Open ``url`` in a 1600 x ``height`` viewport, wait for ``ready``, close the assistant panel."""
        await self.call("Emulation.setDeviceMetricsOverride", width=1600, height=height, deviceScaleFactor=1,
                        mobile=False)
        await self.call("Page.navigate", url=url)
        await self.until(ready)
        await self.js(click(ASSISTANT_CLOSE))

    async def capture(self, uri: str, experiment_id: str, page: Page, out: Path) -> None:
        """Open the page's shared view and save it as the browser's own (the URL then needs no share
        key), make the setup clicks, open the page again, make the last clicks, take the screenshot."""
        url = f"{uri}/#/experiments/{experiment_id}/runs?{UI_QUERY}&compareRunsMode={page.mode}"
        await self.show(f"{url}&viewStateShareKey={page.png}", f"!!document.querySelector({json.dumps(OVERRIDE)})",
                        page.height)
        for selector in (OVERRIDE, *page.setup):
            await asyncio.sleep(1.5)
            await self.js(click(selector))
        await asyncio.sleep(1.5)
        await self.show(url, page.ready, page.height)
        for selector in page.before:
            await self.js(click(selector))
        await asyncio.sleep(5)  # the toasts fade and the charts finish drawing
        data = await self.call("Page.captureScreenshot", format="png")
        (out / page.png).write_bytes(base64.b64decode(data["data"]))
        log.info("wrote %s (%d KB)", out / page.png, (out / page.png).stat().st_size // 1024)


async def capture(uri: str, out: Path) -> None:
    """Every page of :data:`PAGES`, each set up by a shared view stored in its experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    async with Chromium() as browser:
        await browser.call("Page.enable")
        for page in PAGES:
            experiment_id = client.get_experiment_by_name(page.experiment).experiment_id
            client.set_experiment_tag(experiment_id, SHARE_TAG + page.png, json.dumps(page.view))
            await browser.capture(uri, experiment_id, page, out)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/img", help="where the PNGs go (default: docs/img)")
    parser.add_argument("--data-root", default=os.environ.get("TSMD_DATA_ROOT"),
                        help="Omniglot, raw or prepared (default: $TSMD_DATA_ROOT)")
    parser.add_argument("--workdir", help="keep the store and runs here (default: a temporary directory); "
                                          "runs already made there are reused")
    args = parser.parse_args(argv)
    if not args.data_root:
        parser.error("--data-root (or $TSMD_DATA_ROOT) must name the Omniglot data")
    if shutil.which("chromium") is None:
        parser.error("chromium is not installed (Debian: apt-get install chromium)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tsmd-screenshots-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    proc, uri = start_ui(work)
    try:
        if not (work / "runs.done").is_file():
            make_runs(work, uri, str(Path(args.data_root).resolve()))
            (work / "runs.done").touch()
        asyncio.run(capture(uri, out))
    finally:
        proc.terminate()
        proc.wait()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
