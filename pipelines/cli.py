"""`flywheel`: the one front door. Heavy libraries (torch, mlflow, GX, kfp) load only in the
commands that need them, so `flywheel --help` and `flywheel config` stay instant."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

# Telemetry off before any library that phones home is imported (FIELD-NOTES).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pipelines.config import ENVIRONMENTS, ConfigError, load_settings  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

EnvOption = typer.Option("local", "--env", "-e", help=f"Environment: {', '.join(ENVIRONMENTS)}")


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def settings_or_exit(env: str):
    try:
        return load_settings(env)
    except ConfigError as err:
        fail(str(err))


@app.command()
def config(env: str = EnvOption) -> None:
    """Print ENV's merged, validated config as YAML."""
    import yaml

    typer.echo(yaml.safe_dump(settings_or_exit(env).model_dump(mode="json"), sort_keys=False))


@app.command()
def check() -> None:
    """Validate every environment's config, and its arguments against each pipeline's signature."""
    from pipelines.registry import check_all

    problems = check_all()
    for env, errors in problems.items():
        status = typer.style("ok", fg="green") if not errors else typer.style("FAILED", fg="red")
        typer.echo(f"{env:8} {status}")
        for error in errors:
            typer.echo(f"  {error}")
    if any(problems.values()):
        raise typer.Exit(1)


@app.command()
def data(
    env: str = EnvOption,
    rows: Optional[int] = typer.Option(None, help="rows to generate (reference task); default from config"),
    out: Path = typer.Option(..., help="output file: .csv, .csv.gz or .parquet"),
    seed: Optional[int] = typer.Option(None, help="generator seed; default from config"),
) -> None:
    """Write ENV's dataset (or a generated sample of the reference task) as CSV or Parquet."""
    from components.ingest import load_dataset

    settings = settings_or_exit(env)
    dataset = settings.dataset
    overrides = {k: v for k, v in {"rows": rows, "seed": seed}.items() if v is not None}
    try:
        frame = load_dataset(dataset.model_copy(update=overrides).model_dump())
        if rows is not None:
            frame = frame.head(rows)
        from components.dataset import write_table

        write_table(frame, out)
    except (OSError, ValueError) as err:
        fail(str(err))
    typer.echo(f"wrote {len(frame):,} rows x {frame.shape[1]} columns to {out}")


@app.command()
def train(
    env: str = EnvOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the PyTorchJob ENV would submit, submit nothing"),
) -> None:
    """Run the train stage alone on ENV: torchrun here for local, a PyTorchJob on a cluster."""
    import time
    from urllib.parse import urlsplit

    settings = settings_or_exit(env)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job_name = f"flywheel-train-{settings.env}-{stamp}"
    train_spec = settings.training.model_dump() | {
        "image": settings.image.ref, "namespace": settings.namespace, "env": settings.env}
    dataset_spec = settings.dataset.model_dump()
    run_dir = Path("runs") / "train" / stamp
    if settings.training.backend == "pytorchjob":
        root = settings.kfp.pipeline_root
        if not root or "://" not in root:
            fail(f"config/{env}.yaml: kfp.pipeline_root must be an object-store URI (s3://bucket/...) for PyTorchJob pods")
        parts = urlsplit(root)
        base = f"{parts.scheme}://{parts.netloc}/flywheel/train/{job_name}"
        data_uri, model_dir = f"{base}/data.parquet", f"{base}/model"
    else:
        if dry_run:
            fail(f"env {env!r} trains with {settings.training.backend} on this machine; "
                 "--dry-run renders the PyTorchJob of a cluster environment (dev, staging, prod)")
        data_uri, model_dir = str(run_dir / "data.parquet"), str(run_dir / "model")

    if dry_run:
        from training.launchers import entry_args, training_spec
        from training.pytorchjob import PyTorchJobInvalid, build_pytorchjob, to_yaml, validate_pytorchjob

        spec = training_spec(train_spec, dataset_spec, {"job_name": job_name})
        job = build_pytorchjob(train_spec, job_name, settings.namespace, settings.image.ref,
                               entry_args(data_uri, model_dir, spec), env={})
        try:
            validate_pytorchjob(job)
        except PyTorchJobInvalid as err:
            fail(str(err))
        typer.echo(to_yaml(job), nl=False)
        return

    from components.dataset import write_table
    from components.ingest import load_dataset
    from training.launchers import train_model

    local_data = run_dir / "data.parquet"
    try:
        write_table(load_dataset(dataset_spec), local_data)
        if data_uri != str(local_data):  # the pods read the object store, not this disk
            from training import storage

            with open(local_data, "rb") as src, storage.open_uri(data_uri, "wb") as dst:
                dst.write(src.read())
        metadata = train_model(train_spec, dataset_spec, data_uri, model_dir, job_name)
    except Exception as err:  # noqa: BLE001 - the CLI boundary: cluster/S3 client errors too, one line each
        fail(f"{type(err).__name__}: {err}".splitlines()[0])
    typer.echo(f"model: {model_dir}")
    typer.echo(f"metrics: {metadata.get('metrics')}")


@app.command("compile")
def compile_(
    env: str = EnvOption,
    out_dir: Path = typer.Option(Path("dist"), help="pipelines go to OUT_DIR/ENV/<pipeline>.yaml"),
) -> None:
    """Compile every pipeline for ENV to KFP IR YAML."""
    from pipelines.registry import compile_all

    settings = settings_or_exit(env)
    for name, path in compile_all(settings, out_dir / env).items():
        typer.echo(f"{name}: {path}")


@app.command()
def render(
    env: str = EnvOption,
    write: bool = typer.Option(False, "--write", help="regenerate manifests/overlays/ENV from config first"),
) -> None:
    """Print ENV's Kubernetes manifests (`kubectl kustomize manifests/overlays/ENV`); fail if the
    overlay disagrees with config/ENV.yaml."""
    from pipelines.manifests import ManifestError, render_checked

    try:
        typer.echo(render_checked(settings_or_exit(env), write=write), nl=False)
    except ManifestError as err:
        fail(str(err))


@app.command()
def run(
    env: str = typer.Option("local", "--env", "-e", help="only 'local': the embedded lifecycle"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="stream every task's output instead of a log file"),
) -> None:
    """Run the whole lifecycle on the embedded local environment (kfp.local + torchrun + MLflow)."""
    if env != "local":
        fail(f"'run' executes on this machine and takes --env local; use 'flywheel submit --env {env}'")
    from pipelines.local import run_local

    try:
        run_local(settings_or_exit(env), verbose=verbose)
    except RuntimeError as err:
        fail(str(err))


@app.command()
def submit(
    pipeline: str = typer.Argument(..., help="pipeline name, e.g. training"),
    env: str = EnvOption,
    version: Optional[str] = typer.Option(None, help="pipeline version name; default: UTC timestamp + content hash"),
    wait: bool = typer.Option(False, help="wait for the run to finish"),
) -> None:
    """Upload PIPELINE as a new pipeline version on ENV's KFP host and start a run."""
    from pipelines.submit import SubmitError, submit_pipeline

    settings = settings_or_exit(env)
    try:
        result = submit_pipeline(settings, pipeline, version=version, wait=wait)
    except SubmitError as err:
        fail(str(err))
    typer.echo(result.summary())


@app.command()
def schedule(
    env: str = EnvOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the changes without applying them"),
) -> None:
    """Reconcile ENV's scheduled-retraining KFP recurring run with config (create/update/delete)."""
    from pipelines.submit import SubmitError, reconcile_schedules

    settings = settings_or_exit(env)
    try:
        changes = reconcile_schedules(settings, dry_run=dry_run)
    except SubmitError as err:
        fail(str(err))
    for change in changes:
        typer.echo(str(change))


@app.command()
def validate(
    env: str = EnvOption,
    data: Path = typer.Option(..., "--data", help="CSV, CSV.gz or Parquet file to validate"),
    out_dir: Path = typer.Option(Path("runs/validation"), help="where <file>.validation.{json,html} go"),
) -> None:
    """Validate a data file against ENV's expectation suite; exit 1 on a blocking failure."""
    from rich.console import Console
    from rich.table import Table

    from components.validation import SuiteError, load_suite, validate_file, write_reports

    settings = settings_or_exit(env)
    try:
        suite = load_suite(settings.dataset)
        outcome = validate_file(data, suite, id_column=suite.get("id_column"))
    except SuiteError as err:
        fail(str(err))
    table = Table(title=f"{data} vs suite {outcome.suite_name!r}")
    for column in ("status", "expectation", "columns", "observed", "unexpected"):
        table.add_column(column, overflow="fold")
    colours = {"passed": "green", "warning": "yellow", "failed": "red"}
    for r in sorted(outcome.results, key=lambda r: (r.success, r.index)):
        unexpected = "" if r.unexpected_count is None else f"{r.unexpected_count:,} ({r.unexpected_percent or 0:.2f}%)"
        table.add_row(f"[{colours[r.status]}]{r.status}[/]", r.type.removeprefix("expect_"), ", ".join(r.columns), (r.error or r.observed)[:60], unexpected)
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

    from components.validation import file_problem, normalize_suite, read_for_validation, suggest_suite

    try:
        frame = read_for_validation(data)
    except Exception as err:  # a trusted file that does not parse is the user's first problem
        fail(f"{data}: {file_problem(data, err)}")
    draft = suggest_suite(frame, out.stem, target=target, id_column=id_column)
    normalize_suite(draft, str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Drafted from trusted data: review bounds and severities before use.\n"
                   + yaml.safe_dump(draft, sort_keys=False, width=120))
    typer.echo(f"wrote {len(draft['expectations'])} expectations for {frame.shape[1]} columns to {out}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
