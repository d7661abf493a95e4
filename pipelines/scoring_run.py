"""`flywheel score`: the batch scoring pipeline on an embedded environment (kfp.local), with a
line per finished task and an 80-column summary at the end."""
from __future__ import annotations

import os
import time
from pathlib import Path

from pipelines.config import Settings
from pipelines.local_runner import ANSI, PIPELINE_ROOT, LocalRun, TaskWatcher, execute, failure_reason, output_to
from pipelines.scoring_pipeline import NAME

WIDTH = 80


class NoChampion(LookupError):
    """The registry has no champion to score with; the message is the one line to show."""


class UnusablePath(ValueError):
    """--data cannot be read or --out cannot be written; the message is the one line to show."""


def check_paths(data: str, out: str) -> None:
    """Before the pipeline starts (it resolves and downloads the champion first): UnusablePath
    when the input table does not exist (a path or a storage URI), or when a local --out could
    not be written: an existing directory, or a parent that is not a directory, cannot be
    created or is not writable. An object-store --out is the store's to refuse (credentials,
    bucket), at the write."""
    import storage

    if not data:
        raise UnusablePath("no input table: --data is empty")
    if not storage.exists(data):
        raise UnusablePath(f"input table not found: {data}")
    if not out:
        raise UnusablePath("no output: --out is empty")
    if "://" in out and not out.startswith("file://"):
        return
    target = Path(out.removeprefix("file://")).expanduser().resolve()
    if target.is_dir():
        raise UnusablePath(f"--out {out} is a directory: name the predictions file (e.g. {target / 'preds.parquet'})")
    ancestor = target.parent  # the nearest folder that exists: the run creates the rest under it
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UnusablePath(f"cannot write --out {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        if ancestor == target.parent:
            raise UnusablePath(f"cannot write --out {out}: its folder {ancestor} is not writable")
        raise UnusablePath(f"cannot write --out {out}: its folder {target.parent} cannot be created "
                           f"({ancestor} is not writable)")


def champion_version(settings: Settings) -> str:
    """The champion's version, or NoChampion naming the model and the registry."""
    from stages.versions import CHAMPION, version_behind

    name, uri = settings.mlflow.registered_model, settings.mlflow.tracking_uri
    version = version_behind(uri, name, CHAMPION)
    if version is None:
        raise NoChampion(f"no champion to score with: {name} has no champion in {uri} (run `flywheel run` first)")
    return version


def local_path(uri: str) -> str:
    """A local path made absolute (kfp.local runs tasks in other directories); URIs stay as they are."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def run_scoring(settings: Settings, data: str, out: str, console, verbose: bool = False) -> LocalRun:
    """Score `data` with the champion into `out` through kfp.local; RuntimeError with the failing
    task's reason (a quarantine past the configured share names its expectations and columns)."""
    from pipelines.catalog import pipeline_arguments

    arguments = {**pipeline_arguments(settings, NAME), "data_uri": local_path(data), "out_uri": local_path(out)}
    PIPELINE_ROOT.mkdir(parents=True, exist_ok=True)
    log_path = PIPELINE_ROOT / f"score-{time.strftime('%Y%m%d-%H%M%S')}.log"
    console.print(f"scoring {data} with {settings.mlflow.registered_model}@champion  (task log: {log_path})")
    before = set(PIPELINE_ROOT.iterdir())
    try:
        if verbose:
            return execute(settings, NAME, arguments=arguments)
        with output_to(log_path) as terminal:
            from rich.console import Console

            watcher = TaskWatcher(PIPELINE_ROOT, Console(file=terminal, force_terminal=console.is_terminal), before)
            watcher.start()
            try:
                return execute(settings, NAME, arguments=arguments)
            finally:
                watcher.done.set()
                watcher.join()
    except RuntimeError as err:
        detail = failure_reason(log_path.read_text(errors="replace")) if log_path.exists() else ""
        raise RuntimeError(f"batch scoring failed: {ANSI.sub('', str(err))}{chr(10) + detail if detail else ''}"
                           f"\n(full log: {log_path})") from None


def summary_rows(run: LocalRun) -> list[tuple[str, str]]:
    """What a person wants after scoring: rows, quarantine, partitions, model, drift, where things are."""
    written = run.artifact("collect-op", "predictions")["metadata"]
    drift = run.artifact("batch-drift-op", "report")
    rows = [("rows scored", f"{int(written['rows']):,}"),
            ("quarantined", f"{int(written['quarantined']):,}"
             + (f"  ({written['quarantine_uri']})" if written.get("quarantine_uri") else "")),
            ("partitions", str(int(written["partitions"]))),
            ("model", f"{written['model_name']} v{written['model_version']}  (run {written['run_id']})"),
            ("drift", f"{drift['metadata'].get('verdict')}: {int(drift['metadata'].get('breaches', 0))} breach(es)"),
            ("drift report", drift["uri"]),
            ("predictions", str(written["out_uri"])),
            ("pipeline run", f"{run.directory}  ({run.seconds:.1f} s)")]
    return rows


def summary_table(run: LocalRun):
    """The summary as a rich table that fits 80 columns (long paths fold, never widen it)."""
    from rich.table import Table

    table = Table(title="flywheel score summary", show_header=False, width=WIDTH)
    table.add_column("what", no_wrap=True, style="bold")
    table.add_column("value", overflow="fold")
    for label, value in summary_rows(run):
        table.add_row(label, value)
    return table


def print_summary(console, run: LocalRun) -> None:
    """The summary table, then the batch's drift breaches (one line each) under it."""
    import json

    console.print(summary_table(run))
    summary = Path(run.artifact("batch-drift-op", "summary")["uri"])
    if summary.exists():
        for breach in json.loads(summary.read_text()).get("report", {}).get("breaches", []):
            console.print(f"[red]breach[/red] {breach}")
