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
def run(env: str = typer.Option("local", "--env", "-e", help="only 'local': the embedded lifecycle")) -> None:
    """Run the whole lifecycle on the embedded local environment (kfp.local + torchrun + MLflow)."""
    if env != "local":
        fail(f"'run' executes on this machine and takes --env local; use 'flywheel submit --env {env}'")
    from pipelines.local import run_local

    try:
        run_local(settings_or_exit(env))
    except RuntimeError as err:
        fail(str(err))


@app.command()
def submit(
    pipeline: str = typer.Argument(..., help="pipeline name, e.g. training"),
    env: str = EnvOption,
    version: Optional[str] = typer.Option(None, help="pipeline version name; default: a timestamp"),
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
