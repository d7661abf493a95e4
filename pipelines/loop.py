"""The flywheel turns on this machine (`make run`, after the training run): the champion is served
with payload logging to the monitor service, traffic flows through the served entry while the
world shifts (the reference task's drift knobs, or a file dataset's held-out rows with its
features shifted), each window is checked against the champion's training profile, and the
drift decision fires the guarded trigger, which retrains on fresh data; the candidate is gated
and deployed if promoted. A second drift inside the cool-down starts nothing.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.config import Settings
from specs import DistributionShift, PayloadLogging

# The world after the shift: incomes down, utilisation up, more unemployment (a recession).
SHIFT = DistributionShift(income_scale=0.6, utilization_shift=0.25, unemployment_boost=0.15)
# A file dataset's world after the shift, on its own features: numbers up by most of a standard
# deviation, a third of the rows moved to each categorical column's rarest category.
FILE_SHIFT = DistributionShift(numeric_scale=1.1, numeric_offset=0.75, category_skew=0.35)
PHASES = (("steady traffic", False), ("the world shifts", True), ("still shifted", True))
BATCH_ROWS = 50


def world_shift(settings: Settings) -> DistributionShift:
    """The shift the loop applies: the reference task's recession, or the feature knobs on a file."""
    return SHIFT if settings.dataset.source == "reference" else FILE_SHIFT


def traffic(settings: Settings, rows: int, number: int, shifted: bool):
    """One window of served rows: the reference task generated afresh (shifted after the first
    window); for a file dataset, up to `rows` held-out (test split) rows, drawn without replacement
    (repeated rows would make the drift tests see more evidence than there is), shifted by
    `FILE_SHIFT` on the configured features after the first window."""
    from stages.dataset import ReferenceTask, load_dataset, shift_features, split

    dataset = settings.dataset
    if dataset.source == "reference":
        return ReferenceTask(rows=rows, seed=1000 + number, shift=SHIFT if shifted else DistributionShift()).generate()
    held_out = split(load_dataset(dataset.model_copy(update={"shift": DistributionShift()})), dataset.test_fraction,
                     dataset.seed, id_column=dataset.id_column)[1]
    if held_out.empty:
        raise RuntimeError(f"{dataset.uri}: the test split is empty, so there are no held-out rows to serve")
    frame = held_out.sample(n=min(rows, len(held_out)), random_state=1000 + number).reset_index(drop=True)
    return shift_features(frame, dataset.features, FILE_SHIFT, seed=1000 + number) if shifted else frame


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _brief(reasons: list[str]) -> str:
    """The decision's first reason whole (never cut mid-word); the rest are in the drift report."""
    more = f" (+{len(reasons) - 1} more in the drift report)" if len(reasons) > 1 else ""
    return (reasons[0] if reasons else "no reason given") + more


class MonitorService:
    """`python -m monitoring.service` on a loopback port, for the length of a `with` block: with the
    env's rendered config file (`config`: its sink settings), or the demo's quick flushes."""

    def __init__(self, root: Path, log: Path, config: Path | None = None):
        self.root, self.log, self.config, self.port = root, log, config, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MonitorService:
        with open(self.log, "ab") as log:
            settings = ["--config", str(self.config)] if self.config else ["--flush-seconds", "0.2"]
            self.proc = subprocess.Popen([sys.executable, "-m", "monitoring.service", "--root", str(self.root),
                                          "--host", "127.0.0.1", "--port", str(self.port), *settings,
                                          "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the monitor service exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the monitor service did not start: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()  # SIGTERM: it flushes every acknowledged event, then exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _settings_for_loop(settings: Settings, root: Path, sink_url: str) -> Settings:
    """The env with its sink on loopback: windows under `root`, payload events to `sink_url`."""
    monitoring = settings.monitoring.model_copy(update={
        "sink": settings.monitoring.sink.model_copy(update={"root": str(root), "url": sink_url})})
    serving = settings.serving.model_copy(update={
        "payload_logging": PayloadLogging(url=f"{sink_url}/events", mode="all", sample_rate=1.0)})
    return settings.model_copy(update={"monitoring": monitoring, "serving": serving})


def _send(serving, frame, columns: list[str]) -> int:
    """POST the rows to the served entry (the one process, or the transformer) in batches, 4 clients at a
    time; rows answered."""
    records = json.loads(frame[columns].to_json(orient="records"))
    batches = [records[i:i + BATCH_ROWS] for i in range(0, len(records), BATCH_ROWS)]
    with ThreadPoolExecutor(4) as pool:
        return sum(len(answer["predictions"]) for answer in pool.map(serving.predict_v1, batches))


def _wait_for_rows(root: Path, version: str, expected: int, timeout: float = 30.0):
    from monitoring.windows import read_window

    deadline = time.monotonic() + timeout
    while True:
        window = read_window(str(root), model_version=version)
        if len(window) >= expected or time.monotonic() > deadline:
            return window
        time.sleep(0.1)


def _windows(settings: Settings, looped: Settings, serving, reference, work: Path, rows: int, version: str,
             steps: list) -> object:
    """The loop's windows of traffic through the champion, each checked; the last check's result."""
    from pipelines.traffic_check import check_traffic

    result, sent = None, 0
    for number, (phase, shifted) in enumerate(PHASES, start=1):
        frame = traffic(settings, rows, number, shifted)
        sent += _send(serving, frame, settings.dataset.features.columns)
        window = _wait_for_rows(work / "windows", version, sent).tail(rows)
        result, _ = check_traffic(looped, window, reference)  # and its gauges to the sink's /drift
        (work / f"report-{number}.html").write_text(result.html or "", encoding="utf-8")
        drifted = [f.feature for f in result.report.features if f.drifted]
        steps.append((f"window {number}: {phase}",
                      f"{len(window):,} rows served; drifted: {', '.join(drifted) or 'none'}; "
                      f"prediction PSI {result.report.prediction_psi:.3f}; "
                      f"{'RETRAIN' if result.retrain else 'hold'}: {_brief(result.reasons)}"))
    return result


def _challenger(settings: Settings) -> str | None:
    from stages.registry import CHALLENGER
    from stages.versions import version_behind

    return version_behind(settings.mlflow.tracking_uri, settings.mlflow.registered_model, CHALLENGER)


def turn(settings: Settings, console, rows_per_window: int | None = None) -> list[tuple[str, str]]:
    """Serve, shift, detect, retrain (and, with `evaluation.shadow`, shadow the retrained challenger
    beside the champion on the shifted traffic, promoting it when its shadow report passes): each
    step of the loop as (step, what happened)."""
    from deployment.loopback import LocalServing
    from monitoring.check import Reference
    from pipelines.local_runner import PIPELINE_ROOT
    from pipelines.retrain import guarded_trigger
    from pipelines.serving import local_champion
    from pipelines.shadow import loop_shadow
    from pipelines.traffic_check import drift_table

    rows = rows_per_window or max(settings.monitoring.min_samples * 2, 800)
    work = PIPELINE_ROOT / "loop" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="flywheel-loop-") as tmp, \
            MonitorService(work / "windows", work / "monitor.log") as sink:
        looped = _settings_for_loop(settings, work / "windows", sink.url)
        version, model_dir = local_champion(settings, tmp)
        reference = Reference.from_model_dir(model_dir, version)
        steps.append(("served", f"{settings.mlflow.registered_model} v{version}, payload events to {sink.url}/events"))
        with LocalServing(model_dir, settings.mlflow.registered_model, looped.serving, work / "serve",
                          decision_threshold=settings.evaluation.decision_threshold, model_version=version) as serving:
            result = _windows(settings, looped, serving, reference, work, rows, version, steps)
            console.print(drift_table(result.report, f"window {len(PHASES)} vs the champion's training profile"))
            steps.append(("drift reports", str(work / f"report-{len(PHASES)}.html")))
            if not result.retrain:
                steps.append(("retraining", "not triggered: the decision is to hold"))
                return steps
            # Retraining reads fresh data: the world as it is now (the shifted distributions). A file's
            # rows keep their seed, so their split (and the gate's test set) stays the one they had.
            fresh_data = {"shift": world_shift(settings)} | ({"seed": 99} if settings.dataset.source == "reference"
                                                             else {})
            fresh = looped.model_copy(update={"dataset": settings.dataset.model_copy(update=fresh_data)})
            trigger = guarded_trigger(fresh, interactive=True, state_path=str(work / "trigger.json"),
                                      lock_path=work / "retraining.lock")
            console.rule("[bold]drift detected: the guarded trigger starts a retraining run[/bold]")
            before = _challenger(settings)
            decision = trigger.fire(result.reasons, "drift", result.dedup_key)
            steps.append(("trigger", f"started a retraining run ({decision['run_id']})" if decision["started"]
                          else f"refused ({decision['guard']}): {decision['why']}"))
            if settings.evaluation.shadow is not None:
                shadow_rows = traffic(settings, settings.evaluation.shadow.rows, len(PHASES) + 1, True)
                steps += loop_shadow(looped, serving, version, shadow_rows, reference.label_mapping, work, before)
        again = trigger.fire(["drift again, minutes later"], "drift", result.dedup_key + "/again")
        steps.append(("second drift", f"{'started' if again['started'] else 'refused'} ({again['guard']}): "
                                      f"{again['why']}"))
    return steps
