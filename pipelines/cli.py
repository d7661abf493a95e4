"""`flywheel`: the MLOps lifecycle on Kubeflow, from one front door.

The commands live by concern (`cli_cluster.py`: train, compile, render, submit, schedule,
monitor-config; `cli_local.py`: run, serve, deploy, rollback, shadow, monitor, score; here:
config, check, data, validate, expectations) on one application (`cli_app.py`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from pipelines import cli_cluster, cli_local  # noqa: F401  (they register their commands on `app`)
from pipelines.cli_app import EnvOption, app, fail, settings_or_exit


@app.command()
def config(env: str = EnvOption) -> None:
    """Print ENV's merged, validated config as YAML."""
    import yaml

    typer.echo(yaml.safe_dump(settings_or_exit(env).model_dump(mode="json"), sort_keys=False))


@app.command()
def check() -> None:
    """Validate every environment's config, and its arguments against each pipeline's signature."""
    from pipelines.catalog import check_all

    notes: dict[str, list[str]] = {}
    problems = check_all(notes=notes)
    for env, errors in problems.items():
        status = typer.style("ok", fg="green") if not errors else typer.style("FAILED", fg="red")
        typer.echo(f"{env:8} {status}")
        for error in [*errors, *(f"note: {note}" for note in notes.get(env, []))]:
            typer.echo(f"  {error}")
    if any(problems.values()):
        raise typer.Exit(1)


@app.command()
def data(
    env: str = EnvOption,
    rows: Optional[int] = typer.Option(None, min=1, help="rows to generate (reference task); default from config"),
    out: Path = typer.Option(..., help="output file: .csv, .csv.gz or .parquet"),
    seed: Optional[int] = typer.Option(None, help="generator seed; default from config"),
) -> None:
    """Write ENV's dataset (or a generated sample of the reference task) as CSV or Parquet."""
    from stages.dataset import load_dataset
    from storage.tables import write_table

    settings = settings_or_exit(env)
    overrides = {k: v for k, v in {"rows": rows, "seed": seed}.items() if v is not None}
    try:
        frame = load_dataset(settings.dataset.model_copy(update=overrides))
        if rows is not None:
            frame = frame.head(rows)
        write_table(frame, out)
    except (OSError, ValueError) as err:
        fail(str(err))
    typer.echo(f"wrote {len(frame):,} rows x {frame.shape[1]} columns to {out}")


@app.command()
def validate(
    env: str = EnvOption,
    data: Path = typer.Option(..., "--data", help="CSV, CSV.gz or Parquet file to validate"),
    out_dir: Path = typer.Option(Path("runs/validation"), help="where <file>.validation.{json,html} go"),
) -> None:
    """Validate a data file against ENV's expectation suite; exit 1 on a blocking failure."""
    from rich.console import Console
    from rich.table import Table

    from pipelines.config import CONFIG_DIR
    from stages.validation import SuiteError, load_suite, validate_file, write_reports

    settings = settings_or_exit(env)
    try:
        suite = load_suite(settings.dataset, CONFIG_DIR)
        outcome = validate_file(data, suite, id_column=suite.get("id_column"))
    except SuiteError as err:
        fail(str(err))
    table = Table(title=f"{data} vs suite {outcome.suite_name!r}")
    for column in ("status", "expectation", "columns", "observed", "unexpected"):
        table.add_column(column, overflow="fold")
    colours = {"passed": "green", "warning": "yellow", "failed": "red"}
    for r in sorted(outcome.results, key=lambda r: (r.success, r.index)):
        unexpected = "" if r.unexpected_count is None else f"{r.unexpected_count:,} ({r.unexpected_percent or 0:.2f}%)"
        table.add_row(f"[{colours[r.status]}]{r.status}[/]", r.type.removeprefix("expect_"), ", ".join(r.columns),
                      (r.error or r.observed)[:60], unexpected)
    Console().print(table)
    json_path, html_path = write_reports(outcome, out_dir, stem=f"{data.name}.validation")
    typer.echo(f"{outcome.summary()}\nreports: {html_path} {json_path}")
    if not outcome.passed:
        first = outcome.blocking_failures[0].describe() if not outcome.error else outcome.error
        fail(f"{len(outcome.blocking_failures)} blocking expectation(s) failed; first: {first}"[:400])


expectations_app = typer.Typer(no_args_is_help=True, help="Expectation suites: draft one from trusted data.")
app.add_typer(expectations_app, name="expectations")


@expectations_app.command("suggest")
def expectations_suggest(
    data: Path = typer.Option(..., "--data", help="a trusted CSV/Parquet file"),
    out: Path = typer.Option(..., "--out", help="where to write the draft, e.g. config/expectations/NAME.yaml"),
    target: Optional[str] = typer.Option(None, help="label column (gets a 2+ classes check)"),
    id_column: Optional[str] = typer.Option(None, help="key column (gets a uniqueness check)"),
) -> None:
    """Draft an expectation suite (schema, types, missing rates, ranges, categories) to review."""
    import yaml

    from stages.validation import file_problem, normalize_suite, suggest_suite
    from storage.tables import read_table

    try:
        frame = read_table(data, arrow_strings=True)
    except Exception as err:  # a trusted file that does not parse is the user's first problem
        fail(f"{data}: {file_problem(data, err)}")
    draft = suggest_suite(frame, out.stem, target=target, id_column=id_column)
    normalize_suite(draft, str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Drafted from trusted data: review bounds and severities before use.\n"
                   + yaml.safe_dump(draft, sort_keys=False, width=120))
    typer.echo(f"wrote {len(draft['expectations'])} expectations for {frame.shape[1]} columns to {out}")


def main() -> None:
    # A server that is not there is one line within seconds, not minutes of client retries
    # (storage/endpoints.py). Set here, not at import, so importing the CLI changes nobody else.
    os.environ.setdefault("FLYWHEEL_FAIL_FAST", "1")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
