"""The embedded default: the training pipeline on this machine through `kfp.local`.

Same pipeline, same components, same training entry point as on a cluster: kfp.local runs the
tasks as subprocesses in this venv (no per-task pip install), torchrun runs the DDP training,
MLflow keeps runs in a local SQLite store.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import Settings

PIPELINE_ROOT = Path(os.environ.get("FLYWHEEL_RUNS_DIR") or Path(__file__).resolve().parent.parent / "runs") / "local"
ERROR_LINE = re.compile(r"^[\w.]*(Error|Failed|Exception)\b: ")  # "stages.validation.outcome.ValidationFailed: ..."
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class TaskRecord:
    name: str
    parameters: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # output name -> {"uri": ..., "metadata": {...}}


@dataclass
class LocalRun:
    """What a local pipeline run left behind, read back from its executor outputs."""

    directory: Path
    seconds: float
    tasks: dict[str, TaskRecord]

    def artifact(self, task: str, name: str) -> dict:
        return self.tasks[task].artifacts[name]


def read_run(directory: Path, seconds: float = 0.0) -> LocalRun:
    tasks = {}
    for output in sorted(directory.rglob("executor_output.json")):
        data = json.loads(output.read_text())
        # tasks inside a ParallelFor live one level down: "for-loop-1-iteration-0/trial-op"
        record = TaskRecord(str(output.parent.relative_to(directory)), data.get("parameterValues", {}))
        for name, listing in data.get("artifacts", {}).items():
            artifact = listing["artifacts"][0]
            record.artifacts[name] = {"uri": artifact.get("uri", str(output.parent / name)),
                                      "metadata": artifact.get("metadata", {})}
        tasks[record.name] = record
    return LocalRun(directory, seconds, tasks)


def execute(settings: Settings, pipeline: str = "training", pipeline_root: Path = PIPELINE_ROOT,
            arguments: dict | None = None) -> LocalRun:
    """Run `pipeline` through kfp.local and return what its tasks produced."""
    from kfp import local

    from pipelines.catalog import get, pipeline_arguments
    from pipelines.task_zygote import forked_tasks

    prepare_tasks()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    with forked_tasks():
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                   raise_on_error=True)
        return run_function(get(pipeline).build(settings), arguments or pipeline_arguments(settings, pipeline),
                            pipeline_root)


def set_aside(settings: Settings) -> Path | None:
    """`flywheel run --fresh`: move an earlier run's registry (the SQLite store and the artifacts
    kept beside it, gateways/mlflow_api.py `artifact_location`) and the monitor's windows (their
    versions would be reused by the new registry) to `<store's folder>/earlier/<time>/`, so this run
    starts from no champion. Where they went, or None when there was nothing; ValueError when the
    env tracks to anything but a local SQLite file (a server's registry is not ours to move)."""
    import shutil

    uri = settings.mlflow.tracking_uri
    if not uri.startswith("sqlite:///"):
        raise ValueError(f"--fresh starts an empty SQLite registry; env {settings.env!r} tracks to {uri} "
                         "(mlflow.tracking_uri): leave --fresh out")
    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    sink = settings.monitoring.sink.root
    # SQLite's rollback journal and WAL files go with the database: a run stopped mid-write left
    # its undo there, and the next open of the moved database applies it (sqlite.org/tempfiles.html)
    companions = [db.with_name(db.name + suffix) for suffix in ("-journal", "-wal", "-shm")]
    candidates = [db, *companions, db.parent / "artifacts", None if "://" in sink else Path(sink)]
    found = [p for p in candidates if p and p.exists()]
    if not found:
        return None
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    earlier = db.parent / "earlier" / stamp
    while earlier.exists():  # two runs in one second
        n += 1
        earlier = db.parent / "earlier" / f"{stamp}-{n}"
    earlier.mkdir(parents=True)
    for path in found:
        shutil.move(str(path), earlier / path.name)
    return earlier


def prepare_tasks() -> None:
    """The environment every local task gets, and the task zygote started in it
    (pipelines.task_zygote): it imports the tasks' libraries while the pipeline is being built."""
    from pipelines.task_zygote import shared

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    shared()


def run_function(function, arguments: dict, pipeline_root: Path) -> LocalRun:
    """Call a pipeline function under the kfp.local session already initialised on
    `pipeline_root`, and read back the run directory it created."""
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    started = time.perf_counter()
    function(**arguments)
    seconds = time.perf_counter() - started
    (directory,) = [p for p in pipeline_root.iterdir() if p not in before and p.is_dir()]
    return read_run(directory, seconds)


def _short(uri: str, run: LocalRun) -> str:
    path, base = Path(uri).resolve(), run.directory.resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else uri


def summary_rows(run: LocalRun) -> list[tuple[str, str]]:
    """The lines a person wants after a run: data, validation, tuning, training, evaluation,
    the gate's decision and where things are (artifact paths relative to the run directory)."""
    rows: list[tuple[str, str]] = []
    tasks = run.tasks

    def add(label, value):
        rows.append((label, str(value)))

    if "ingest-op" in tasks:
        meta = run.artifact("ingest-op", "dataset")["metadata"]
        add("data", f"{meta.get('source')}  {meta.get('content_hash', '')[:19]}")
    if "split-op" in tasks:
        train = run.artifact("split-op", "train_data")["metadata"]
        test = run.artifact("split-op", "test_data")["metadata"]
        add("rows", f"train {int(train['rows']):,} / test {int(test['rows']):,} "
                    f"(positives {train['positive_rate']:.1%})")
    if "validate-op" in tasks:
        m = tasks["validate-op"].artifacts.get("metrics", {}).get("metadata", {})
        add("validation", f"passed {int(m.get('expectations_passed', 0))}/{int(m.get('expectations_evaluated', 0))} "
            f"expectations, {int(m.get('expectations_warned', 0))} warnings  (report: "
            f"{_short(run.artifact('validate-op', 'report')['uri'], run)})")
    if "select-op" in tasks:
        best = tasks["select-op"].parameters.get("best", {})
        trials = sum("/trial-op" in name for name in tasks)  # every rung's trial runs
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best.get("params", {}).items())
        add("tuning", f"{trials} trials, best #{int(best.get('trial', 0))} ({params}) "
            f"val ROC AUC {best.get('val_roc_auc', float('nan')):.4f}")
    if "train-op" in tasks:
        meta = run.artifact("train-op", "model")["metadata"]
        m = meta.get("metrics", {})
        add("training", f"{meta.get('backend')} x{int(meta.get('world_size', 1))}, "
                        f"best epoch {int(m.get('best_epoch', 0))}"
            f"/{int(m.get('epochs_run', 0))}, val ROC AUC {m.get('val_roc_auc', float('nan')):.4f}, "
            f"{m.get('samples_per_s', 0):,.0f} samples/s")
        add("model", _short(run.artifact("train-op", "model")["uri"], run))
    if "evaluate-op" in tasks:
        metrics = run.artifact("evaluate-op", "metrics")["metadata"]
        shown = [k for k in ("roc_auc", "pr_auc", "f1", "brier") if k in metrics]
        add("evaluation", ", ".join(f"{k} {metrics[k]:.4f}" for k in shown)
            + f"  (report: {_short(run.artifact('evaluate-op', 'report')['uri'], run)})")
        if "run_id" in tasks["evaluate-op"].parameters:
            add("mlflow run", tasks["evaluate-op"].parameters["run_id"])
    if "gate-op" in tasks:
        gate = run.artifact("gate-op", "report")["metadata"]
        add("gate", f"{str(gate.get('decision', '?')).upper()}: {gate.get('reason', '')}")
        candidate, champion = gate.get("candidate_metrics", {}), gate.get("champion_metrics", {})
        for key in ("roc_auc", "pr_auc", "brier"):
            if key in candidate:
                versus = f"  vs champion v{gate.get('champion_version')} {champion[key]:.4f}" if key in champion else ""
                add(f"  {key}", f"candidate {candidate[key]:.4f}{versus}")
    if "register-op" in tasks:
        add("registered", f"version {tasks['register-op'].parameters.get('version')} is now the champion")
    if "deploy-op" in tasks:
        live = tasks["deploy-op"].parameters.get("Output", {})
        add("deployed", f"{live.get('live')} {live.get('outcome')} by {live.get('deployer')}: {live.get('detail')}")
    add("pipeline run", f"{run.directory}  ({run.seconds:.1f} s)")
    return rows


def failure_reason(log: str, max_lines: int = 12) -> str:
    """The failing task's exception from the run log: its first line and the indented lines
    that continue it (a validation failure lists the broken expectations there)."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if ERROR_LINE.match(line.strip())]
    if not starts:
        return ""
    first = lines[starts[-1]]
    indent = len(first) - len(first.lstrip())
    reason = [first.strip()]
    for line in lines[starts[-1] + 1 : starts[-1] + max_lines]:
        if not line.strip() or len(line) - len(line.lstrip()) <= indent and not line.lstrip().startswith("-"):
            break
        reason.append("  " + line.strip())
    return "\n".join(reason)


@contextmanager
def output_to(log_path: Path):
    """Send everything the tasks print (kfp.local echoes executor inputs, GX, torchrun) to a log
    file at the file-descriptor level, and yield a stream to the real terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


class TaskWatcher(threading.Thread):
    """Prints each task as it finishes, from the executor outputs kfp.local writes."""

    def __init__(self, root: Path, console, before: set[Path]):
        super().__init__(daemon=True)
        self.root, self.console, self.before = root, console, before
        self.seen: set[Path] = set()
        self.started = time.perf_counter()
        self.done = threading.Event()

    def poll(self) -> None:
        for output in sorted(self.root.glob("*/**/executor_output.json"), key=lambda p: p.stat().st_mtime):
            run_dir = self.root / output.relative_to(self.root).parts[0]
            if run_dir in self.before or output in self.seen:
                continue
            self.seen.add(output)
            elapsed = time.perf_counter() - self.started
            task = str(output.parent.relative_to(run_dir))
            self.console.print(f"  [green]done[/green] {task:<40} {elapsed:6.1f} s")

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.poll()
        self.poll()


def run_local(settings: Settings, verbose: bool = False, predictions: bool = True) -> LocalRun:
    """`flywheel run`: the lifecycle on this machine, with progress, ending with a summary table
    (and, with `predictions`, the champion served and a few predictions through the transformer)."""
    from rich.console import Console
    from rich.table import Table

    PIPELINE_ROOT.mkdir(parents=True, exist_ok=True)
    log_path = PIPELINE_ROOT / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    console = Console()
    console.rule(f"[bold]flywheel: {settings.env} lifecycle[/bold]")
    console.print(f"MLflow: {settings.mlflow.tracking_uri}\nartifacts: {PIPELINE_ROOT}\ntask log: {log_path}")
    before = set(PIPELINE_ROOT.iterdir())
    try:
        if verbose:
            run = execute(settings)
        else:
            with output_to(log_path) as terminal:
                watcher = TaskWatcher(PIPELINE_ROOT, Console(file=terminal, force_terminal=console.is_terminal), before)
                watcher.start()
                try:
                    run = execute(settings)
                finally:
                    watcher.done.set()
                    watcher.join()
    except RuntimeError as err:
        detail = failure_reason(log_path.read_text(errors="replace")) if log_path.exists() else ""
        reports = [str(p) for d in set(PIPELINE_ROOT.iterdir()) - before if d.is_dir() for p in d.glob("*/report.html")]
        where = f"\nreports: {' '.join(sorted(reports))}" if reports else ""
        raise RuntimeError(f"local pipeline failed: {ANSI.sub('', str(err))}"
                           f"{chr(10) + detail if detail else ''}{where}\n(full log: {log_path})") from None
    table = Table(title="flywheel run summary", show_header=False)
    for label, value in summary_rows(run):
        table.add_row(f"[bold]{label}[/bold]", value)
    console.print(table)
    if predictions:
        show_predictions(settings, console, run)
    console.print(f"Browse runs: mlflow ui --backend-store-uri {settings.mlflow.tracking_uri}")
    return run


def show_predictions(settings: Settings, console, run: LocalRun | None = None) -> None:
    """A few real predictions over v1 and v2, as a client sees them: the deploy step's smoke test
    when this run deployed (that server has stopped; serving the model again costs seconds), else
    the registry's champion served on loopback (`serving.topology`) for the length of the requests."""
    import tempfile

    from deployment.loopback import LocalServing
    from pipelines.serving import example_records, local_champion

    name = settings.mlflow.registered_model
    shape = "one process" if settings.serving.topology == "single" else "transformer -> predictor"
    deployed = run.tasks["deploy-op"].parameters.get("Output", {}) if run and "deploy-op" in run.tasks else {}
    if "smoke" in deployed:
        smoke = deployed["smoke"]
        title = f"{name} v{deployed['version']}: the deploy step's smoke test at {deployed['url']} ({shape})"
        console.print(_prediction_table(settings, title, smoke["records"], smoke["v1"], smoke["v2"]))
    else:
        with tempfile.TemporaryDirectory(prefix="flywheel-serve-") as tmp:
            try:
                version, model_dir = local_champion(settings, tmp)
            except LookupError as err:
                console.print(f"nothing served: {err}")
                return
            records = example_records(settings, version)
            with LocalServing(model_dir, name, settings.serving, PIPELINE_ROOT / "serve",
                              decision_threshold=settings.evaluation.decision_threshold,
                              model_version=version) as serving:
                v1 = serving.predict_v1(records, request_id="flywheel-run-v1")
                v2 = serving.predict_v2(records, request_id="flywheel-run-v2")
                title = f"{name} v{version} served at {serving.url} ({shape})"
        console.print(_prediction_table(settings, title, records, v1, v2))
    console.print(f"`flywheel serve --env {settings.env}` keeps it up (Ctrl-C stops it)")


def _prediction_table(settings: Settings, title: str, records: list[dict], v1: dict, v2: dict):
    from rich.table import Table

    outputs = {o["name"]: o["data"] for o in v2["outputs"]}
    table = Table(title=title)
    shown = settings.dataset.features.columns[:4]
    for column in [*shown, "v1 label", "v1 P(positive)", "v2 label", "v2 P(positive)"]:
        table.add_column(column)
    for i, record in enumerate(records):
        table.add_row(*(str(record.get(c)) for c in shown), str(v1["predictions"][i]), f"{v1['probabilities'][i]:.3f}",
                      str(outputs["label"][i]), f"{outputs['probability'][i]:.3f}")
    return table
