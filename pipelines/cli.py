"""`flywheel`: the MLOps lifecycle on Kubeflow, from one front door.

Heavy libraries (torch, mlflow, GX, kfp) load only in the commands that need them, so
`flywheel --help` and `flywheel config` stay instant."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

# Telemetry off before any library that phones home is imported (MLflow writes and calls home at
# import: mlflow/mlflow telemetry docs; GX analytics: GX_ANALYTICS_ENABLED).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads of a model directory

from pipelines.config import ConfigError, environments, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

EnvOption = typer.Option("local", "--env", "-e", help=f"Environment (config/<env>.yaml): {', '.join(environments())}")


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
def train(
    env: str = EnvOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the cluster job ENV would submit, submit nothing"),
) -> None:
    """Run the train stage alone on ENV: torchrun here, a PyTorchJob or TrainJob on a cluster."""
    import time

    from pipelines.training_pipeline import train_spec
    from training.backends import TrainingFailed, backend_for

    settings = settings_or_exit(env)
    spec = train_spec(settings)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path("runs") / "train" / stamp
    backend = backend_for(spec)
    try:
        if dry_run:
            import yaml

            typer.echo(yaml.safe_dump(backend.manifest(_cli_job(settings, spec, run_dir, stamp, write=False)),
                                      sort_keys=False), nl=False)
            return
        metadata = backend.train(_cli_job(settings, spec, run_dir, stamp, write=True))
    except (TrainingFailed, ValueError) as err:
        fail(str(err))
    except Exception as err:
        fail(f"{type(err).__name__}: {err}".splitlines()[0])
    typer.echo(f"model: {run_dir / 'model'}")
    typer.echo(f"metrics: {metadata.get('metrics')}")


def _cli_job(settings, spec, run_dir: Path, stamp: str, write: bool):
    """The job `flywheel train` runs: the env's dataset written under runs/train/<stamp>/ (the
    cluster backends upload it beside the job), the model next to it. A dry run reads the data
    for its label mapping, as the run does, and writes nothing."""
    from model.labels import LabelMapping
    from stages.dataset import load_dataset
    from storage.tables import write_table
    from training.backends import TrainingJob, entry_spec, job_name

    name = job_name("train", f"cli-{settings.env}-{stamp}")
    data = run_dir / "data.parquet"
    frame = load_dataset(settings.dataset)
    labels = LabelMapping.infer(frame[settings.dataset.target], settings.dataset.positive_label,
                                settings.dataset.target).to_dict()
    if write:
        write_table(frame, data)
    lineage = {"job_name": name, "pipeline_run": f"cli-{stamp}"}
    return TrainingJob(name, str(data), str(data), entry_spec(spec, settings.dataset, labels, lineage),
                       model_dir=str(run_dir / "model"), annotations={"flywheel/pipeline-run": f"cli-{stamp}"})


@app.command("compile")
def compile_(
    env: str = EnvOption,
    out_dir: Path = typer.Option(Path("dist"), help="pipelines go to OUT_DIR/ENV/<pipeline>.yaml"),
) -> None:
    """Compile every pipeline for ENV to KFP IR YAML, and each component to OUT_DIR/ENV/components/."""
    from pipelines.registry import compile_all

    settings = settings_or_exit(env)
    for name, path in compile_all(settings, out_dir / env).items():
        typer.echo(f"{name}: {path}")


@app.command()
def render(
    env: str = EnvOption,
    write: bool = typer.Option(False, "--write", help="regenerate manifests/overlays/ENV from config first"),
) -> None:
    """Print ENV's Kubernetes manifests (kubectl kustomize); fail if the overlay disagrees with config."""
    from pipelines.manifests import ManifestError, render_checked

    try:
        typer.echo(render_checked(settings_or_exit(env), write=write), nl=False)
    except ManifestError as err:
        fail(str(err))


@app.command()
def run(
    env: str = typer.Option("local", "--env", "-e", help="an environment that runs on this machine (no kfp.host)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="stream every task's output instead of a log file"),
    loop: bool = typer.Option(True, "--loop/--no-loop",
                              help="then turn the flywheel: serve, shift the traffic, detect drift, retrain"),
) -> None:
    """Run the whole lifecycle on an embedded environment (kfp.local + torchrun + MLflow + KServe)."""
    settings = settings_or_exit(env)
    if not settings.embedded:
        fail(f"env {env!r} runs on a cluster (kfp.host is set); use 'flywheel submit training --env {env}'")
    import time

    from rich.console import Console
    from rich.table import Table

    from pipelines.local import run_local

    started = time.perf_counter()
    try:
        run_local(settings, verbose=verbose)
        if loop:
            from pipelines.loop import turn

            console = Console()
            console.rule("[bold]the flywheel turns: served traffic shifts[/bold]")
            steps = turn(settings, console)
            table = Table(title="the loop", show_header=False)
            for step, what in steps:
                table.add_row(f"[bold]{step}[/bold]", what)
            console.print(table)
        typer.echo(f"make run: {time.perf_counter() - started:.0f} s")
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
    from pipelines.kfp_client import SubmitError
    from pipelines.submit import submit_pipeline

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
    """Reconcile ENV's KFP recurring runs (retraining, monitoring check) with config (create/update/delete)."""
    from pipelines.kfp_client import SubmitError
    from pipelines.schedule import reconcile_schedules

    settings = settings_or_exit(env)
    try:
        changes = reconcile_schedules(settings, dry_run=dry_run)
    except SubmitError as err:
        fail(str(err))
    for change in changes:
        typer.echo(str(change))


@app.command()
def serve(
    env: str = EnvOption,
    port: int = typer.Option(8080, help="the transformer's HTTP port (v1 and v2 REST)"),
) -> None:
    """Serve ENV's champion on this machine until Ctrl-C: transformer on PORT, predictor beside it."""
    import signal
    import tempfile
    import time

    from pipelines.serving import example_records, local_champion
    from serving.local import LocalServing, ServingFailed

    settings = settings_or_exit(env)
    if not settings.embedded:
        fail(f"env {env!r} serves on a cluster; use `flywheel deploy --env {env}`")
    with tempfile.TemporaryDirectory(prefix="flywheel-serve-") as tmp:
        try:
            version, model_dir = local_champion(settings, tmp)
        except LookupError as err:
            fail(str(err))
        serving = LocalServing(model_dir, settings.mlflow.registered_model, settings.serving, Path("runs") / "serve",
                               http_port=port, decision_threshold=settings.evaluation.decision_threshold,
                               model_version=version)
        signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's stop is a Ctrl-C: both servers stop
        try:
            serving.start()
        except ServingFailed as err:
            fail(str(err))
        try:
            name = settings.mlflow.registered_model
            record = json.dumps({"instances": example_records(settings, rows=1)})
            ports = serving.ports
            typer.echo(f"serving {name} v{version}\n"
                       f"  transformer  {serving.url} (v1, v2 REST), gRPC 127.0.0.1:{ports['transformer_grpc']}\n"
                       f"  predictor    {serving.predictor_url}, gRPC 127.0.0.1:{ports['predictor_grpc']}\n"
                       f"  logs         runs/serve/\n"
                       f"try:\n  curl -s {serving.url}/v1/models/{name}:predict -H 'content-type: application/json' "
                       f"-d '{record}'\nCtrl-C stops both servers.")
            while all(process.alive() for process in serving.processes):
                time.sleep(0.5)
            fail("a server exited: see runs/serve/*.log")
        except KeyboardInterrupt:
            typer.echo("stopping")
        finally:
            serving.stop()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@app.command()
def deploy(
    env: str = EnvOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the InferenceService, apply nothing"),
) -> None:
    """Deploy ENV's champion: an InferenceService on a cluster (rollout, smoke test), or smoke-tested here."""
    import yaml

    from pipelines.serving import deploy_champion, plan_champion

    settings = settings_or_exit(env)
    try:
        if dry_run:
            typer.echo(yaml.safe_dump(plan_champion(settings), sort_keys=False), nl=False)
            return
        live = deploy_champion(settings)
    except (LookupError, ValueError, RuntimeError) as err:
        fail(str(err))
    typer.echo(f"live: {live['live']} ({live['outcome']}) {live['url']}\n{live['detail']}")


@app.command()
def rollback(env: str = EnvOption) -> None:
    """Serve ENV's previous champion again and make it the champion in the registry."""
    from pipelines.serving import roll_back

    settings = settings_or_exit(env)
    try:
        live = roll_back(settings)
    except (LookupError, ValueError, RuntimeError) as err:
        fail(str(err))
    typer.echo(f"live: {live['live']} ({live['outcome']}) {live['url']}\n{live['detail']}")


@app.command()
def monitor(
    env: str = EnvOption,
    window: Optional[int] = typer.Option(None, "--window", help="rows to check, the newest (monitoring.window_rows)"),
    trigger: bool = typer.Option(False, "--trigger", help="start retraining (guarded) when the decision says so"),
) -> None:
    """Check ENV's logged traffic against the champion's training profile: drift, quality, decision."""
    import tempfile
    import time

    from rich.console import Console

    from model.artifact import label_mapping, read_metadata
    from monitoring.check import run_check
    from monitoring.profile import load_profile
    from monitoring.publish import post_drift
    from monitoring.windows import read_window
    from pipelines.monitor import drift_table, suite_for
    from pipelines.serving import local_champion

    settings = settings_or_exit(env)
    spec = settings.monitoring
    console = Console()
    with tempfile.TemporaryDirectory(prefix="flywheel-monitor-") as tmp:
        try:
            version, model_dir = local_champion(settings, tmp)
            profile, metadata = load_profile(model_dir), read_metadata(model_dir)
        except (LookupError, ValueError) as err:
            fail(str(err))
    try:
        frame = read_window(spec.sink.root, model_version=version, rows=window or spec.window_rows)
        result = run_check(frame, profile, spec, settings.dataset.features, model_version=version,
                           root=spec.sink.root, suite=suite_for(settings), labels=label_mapping(metadata), env=env)
    except (OSError, ValueError) as err:
        fail(f"checking {spec.sink.root}: {err}")
    console.print(drift_table(result.report, f"{settings.mlflow.registered_model} v{version}: {len(frame):,} rows "
                                             f"from {spec.sink.root}"))
    for note in result.report.notes:
        console.print(f"[dim]note: {note}[/dim]")
    for breach in result.report.breaches:
        console.print(f"[red]breach[/red] {breach}")
    verdict = "[red]RETRAIN[/red]" if result.retrain else "[green]hold[/green]"
    console.print(f"decision: {verdict}: {'; '.join(result.reasons)}")
    out = Path("runs") / "monitoring" / f"report-{time.strftime('%Y%m%d-%H%M%S')}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.html or "", encoding="utf-8")
    console.print(f"report: {out}")
    if spec.sink.url:
        console.print(post_drift(spec.sink.url, version, result.report.metrics()))
    if not trigger:
        return
    if not result.retrain:
        console.print("trigger: not fired (the decision is to hold)")
        return
    from pipelines.retrain import guarded_trigger

    decision = guarded_trigger(settings, interactive=True).fire(result.reasons, "drift", result.dedup_key)
    if decision["started"]:
        console.print(f"trigger: started {decision['run_id']}")
    else:
        console.print(f"trigger: refused ({decision['guard']}): {decision['why']}")
    if decision.get("audit_error"):
        console.print(f"[yellow]the decision was not audited in MLflow: {decision['audit_error']}[/yellow]")


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
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
