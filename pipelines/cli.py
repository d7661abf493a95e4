"""`flywheel`: the MLOps lifecycle on Kubeflow, from one front door.

Heavy libraries (torch, mlflow, GX, kfp) load only in the commands that need them, so
`flywheel --help` and `flywheel config` stay instant."""
from __future__ import annotations

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


class Commands(typer.core.TyperGroup):
    """Every command: a server that cannot be reached (MLflow, KFP, the Kubernetes API) is one
    line, `error: cannot reach MLflow at URL (what for): why`, and exit 1, never a traceback."""

    def invoke(self, ctx):
        from storage.endpoints import Unreachable

        try:
            return super().invoke(ctx)
        except Unreachable as err:
            fail(str(err))
        except Exception as err:
            # The object store through s3fs/botocore: a refused endpoint or missing credentials are
            # botocore errors (not OSError); botocore's text names the endpoint URL.
            if type(err).__module__.split(".")[0] not in ("botocore", "aiobotocore"):
                raise
            fail(f"object store: {' '.join(str(err).split())}")


# rich_markup_mode=None: typer 0.29's rich help panel prints every flag's type (`<bool>`, also
# for --help), its plain formatter leaves flags bare (typer/core.py, TyperOption.get_help_record).
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0], cls=Commands,
                  context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None)

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
def train(
    env: str = EnvOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the cluster job ENV would submit, submit nothing"),
) -> None:
    """Run the train stage alone on ENV: torchrun here, a PyTorchJob or TrainJob on a cluster."""
    import time

    from pipelines.arguments import train_spec
    from storage.endpoints import Unreachable
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
    except (TrainingFailed, ValueError, Unreachable) as err:
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
    from training.backends import build_job

    data = run_dir / "data.parquet"
    frame = load_dataset(settings.dataset)
    labels = LabelMapping.infer(frame[settings.dataset.target], settings.dataset.positive_label,
                                settings.dataset.target).to_dict()
    if write:
        write_table(frame, data)
    return build_job(spec, settings.dataset, kind="train", run_id=f"cli-{stamp}", data_path=str(data),
                     data_uri=str(data), data_metadata={"labels": labels}, model_dir=str(run_dir / "model"),
                     name_seed=f"cli-{settings.env}-{stamp}")


@app.command("compile")
def compile_(
    env: str = EnvOption,
    out_dir: Path = typer.Option(Path("dist"), help="pipelines go to OUT_DIR/ENV/<pipeline>.yaml"),
) -> None:
    """Compile every pipeline for ENV to KFP IR YAML, and each component to OUT_DIR/ENV/components/."""
    from pipelines.catalog import compile_all

    settings = settings_or_exit(env)
    for name, path in compile_all(settings, out_dir / env).items():
        typer.echo(f"{name}: {path}")


@app.command()
def render(
    env: str = EnvOption,
    cluster: Optional[str] = typer.Option(None, "--cluster", "-c", help="one cluster of ENV (default: all of them)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write OUT/<cluster>/<kind>-<name>.yaml per object "
                                                           "instead of printing"),
    write: bool = typer.Option(False, "--write", help="regenerate the GitOps tree (manifests/) from config first"),
    check: bool = typer.Option(True, "--check/--no-check", help="validate every object (schemas, policy) first"),
) -> None:
    """Render ENV's clusters from the GitOps tree (kubectl kustomize manifests/clusters/<c>, platform
    first); refuse a tree that disagrees with config."""
    from pipelines import gitops
    from pipelines.manifests import ManifestError, find_kubectl

    settings = settings_or_exit(env)
    if settings.embedded:
        fail(f"env {env!r} runs on this machine (no kfp.host): it has no clusters to render")
    names = gitops.cluster_names(settings)
    if cluster is not None and cluster not in names:
        fail(f"env {env!r} has no cluster {cluster!r}; its clusters: {', '.join(names)}")
    if problems := gitops.config_problems(settings):
        fail("\n".join(problems))
    try:
        if write:
            gitops.write_tree()
        if problems := gitops.check_tree():
            fail(f"manifests/ is out of date with config/; run `flywheel render --env {env} --write`\n"
                 + "\n".join(problems))
        kubectl = find_kubectl()
        rendered = {name: gitops.render_cluster(settings, name, kubectl)
                    for name in ([cluster] if cluster else names)}
    except (ManifestError, ValueError) as err:
        fail(str(err))
    if check:
        _check_rendered(rendered)
    if out is None:
        typer.echo("---\n".join(f"# cluster: {name}\n{text}" for name, text in rendered.items()), nl=False)
    else:
        typer.echo(gitops.write_objects(rendered, out), nl=False)


def _check_rendered(rendered: dict[str, str]) -> None:
    """Refuse to hand out objects that break their schema or the policy; name object and rule."""
    from pipelines.gitops import rendered_problems

    found: list[str] = []
    for name, text in rendered.items():
        problems, notes = rendered_problems(text)
        found += [f"{name}: {line}" for line in problems]
        for line in notes:
            typer.echo(f"note: {name}: {line}", err=True)
    if found:
        fail(f"{len(found)} problem(s) in the rendered objects (schema or policy):\n" + "\n".join(found))


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
    from pipelines.config import column_problems

    columns, _ = column_problems(settings)  # before minutes of tuning and training, not after
    if columns:
        fail("\n".join(columns))
    import time

    from rich.console import Console
    from rich.table import Table

    from pipelines.local_runner import run_local

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
        typer.echo(f"flywheel run --env {env}: {time.perf_counter() - started:.0f} s")
    except RuntimeError as err:
        fail(str(err))


@app.command()
def submit(
    pipeline: str = typer.Argument(..., help="pipeline name, e.g. training"),
    env: str = EnvOption,
    version: Optional[str] = typer.Option(None, help="pipeline version name; default: UTC timestamp + content hash"),
    wait: bool = typer.Option(False, help="wait for the run to finish"),
) -> None:
    """Publish PIPELINE on ENV's KFP host (a new version unless the newest holds the same content) and start a run."""
    from gateways.kfp_api import KfpError
    from pipelines.submit import submit_pipeline

    settings = settings_or_exit(env)
    try:
        result = submit_pipeline(settings, pipeline, version=version, wait=wait)
    except KfpError as err:
        fail(str(err))
    typer.echo(result.summary())


@app.command()
def schedule(
    env: str = EnvOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the changes without applying them (offline: "
                                                          "what config declares)"),
) -> None:
    """Reconcile ENV's KFP recurring runs (retraining, monitoring check) with config (create/update/delete)."""
    from gateways.kfp_api import KfpError, KfpUnreachable
    from pipelines.schedule import declared_plan, reconcile_schedules

    settings = settings_or_exit(env)
    offline = None
    try:
        changes = reconcile_schedules(settings, dry_run=dry_run)
    except KfpUnreachable as err:
        if not dry_run:
            fail(str(err))
        changes, offline = declared_plan(settings), err
    except KfpError as err:
        fail(str(err))
    for change in changes:
        typer.echo(str(change))
    if offline is not None:
        typer.secho(f"note: not compared with the server: {offline}", fg="yellow", err=True)


@app.command("monitor-config")
def monitor_config_(
    env: str = EnvOption,
    out: Optional[Path] = typer.Option(None, "--out", help="write the file here (default: print it)"),
) -> None:
    """Render ENV's monitor service config (`python -m monitoring.service --config FILE`): the sink's
    settings and the env's retraining trigger; YAML, no secrets."""
    import yaml

    from pipelines.arguments import monitor_config

    text = yaml.safe_dump(monitor_config(settings_or_exit(env)), sort_keys=False)
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out}")


@app.command()
def serve(
    env: str = EnvOption,
    port: int = typer.Option(8080, help="the transformer's HTTP port (v1 and v2 REST)"),
    poll_seconds: float = typer.Option(5.0, "--poll-seconds", min=0.2,
                                       help="how often the champion alias is read; when it moves, serve the new one"),
    sink: bool = typer.Option(True, "--sink/--no-sink",
                              help="log payloads to a monitor sink started beside it (when the env logs none)"),
) -> None:
    """Serve ENV's champion on this machine until Ctrl-C, following the registry's champion alias."""
    import signal

    from pipelines.local_serve import Follower

    settings = settings_or_exit(env)
    if not settings.embedded:
        fail(f"env {env!r} serves on a cluster; use `flywheel deploy --env {env}`")
    follower = Follower(settings, port, poll_seconds=poll_seconds, sink=sink, echo=typer.echo)
    signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's stop is a Ctrl-C: every server stops
    try:
        try:
            follower.start()
        except (LookupError, RuntimeError, OSError) as err:  # no champion, a server or the sink did not start
            fail(str(err))
        typer.echo(follower.banner())
        follower.run()
    except typer.Exit:  # click's Exit is a RuntimeError: the inner fail() has said it all
        raise
    except RuntimeError as err:
        fail(str(err))
    except KeyboardInterrupt:
        typer.echo("stopping")
    finally:
        # A second Ctrl-C or SIGTERM must not abort the stop: the children run in their own sessions
        # and would be left holding the ports, the sink unflushed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        follower.stop()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@app.command()
def deploy(
    env: str = EnvOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the InferenceService, apply nothing"),
    model_uri: Optional[str] = typer.Option(None, "--model-uri", help="with --dry-run: render for this model "
                                            "directory (s3://..., no registry needed) instead of the champion"),
    version: Optional[str] = typer.Option(None, "--version", help="with --dry-run: the model version to render "
                                          "(without --model-uri, read from the registry)"),
) -> None:
    """Deploy ENV's champion: an InferenceService on a cluster (rollout, smoke test), or smoke-tested here."""
    import yaml

    from pipelines.serving import deploy_champion, describe, plan_champion

    settings = settings_or_exit(env)
    if (model_uri or version) and not dry_run:
        fail("--model-uri and --version go with --dry-run: a deploy serves the registry's champion")
    try:
        if dry_run and not (model_uri or version):
            typer.echo(yaml.safe_dump(plan_champion(settings), sort_keys=False), nl=False)
            return
        if dry_run:
            from deployment.deployers import UNVERSIONED, plan_model
            from pipelines.arguments import deploy_spec

            isvc = plan_model(deploy_spec(settings), version or UNVERSIONED, settings.mlflow.tracking_uri,
                              model_uri=model_uri)
            typer.echo(yaml.safe_dump(isvc, sort_keys=False), nl=False)
            return
        live = deploy_champion(settings)
    except (LookupError, ValueError, RuntimeError) as err:
        fail(str(err))
    typer.echo(describe(live))


@app.command()
def rollback(
    env: str = EnvOption,
    to: Optional[str] = typer.Option(None, "--to", help="serve this version instead (also a newer one: roll "
                                                       "forward); clears its rolled_back tag"),
) -> None:
    """Serve ENV's previous champion again (or version --to) and make it the champion in the registry."""
    from pipelines.serving import describe, roll_back

    settings = settings_or_exit(env)
    try:
        live = roll_back(settings, to=to)
    except (LookupError, ValueError, RuntimeError) as err:
        fail(str(err))
    typer.echo(describe(live))


@app.command()
def shadow(
    action: str = typer.Argument(..., help="start | report | stop"),
    env: str = EnvOption,
) -> None:
    """Shadow the challenger behind a running `flywheel serve` on mirrored traffic (start), compare it with
    the champion (report: HTML + JSON), stop and promote it when the report passes (stop)."""
    from pipelines import shadow as shadowing

    if action not in ("start", "report", "stop"):
        fail(f"unknown action {action!r}: start, report or stop")
    settings = settings_or_exit(env)
    if action == "report":
        raise typer.Exit(0 if shadowing.report(settings, typer.echo) is not None else 1)
    raise typer.Exit(getattr(shadowing, action)(settings, typer.echo))


@app.command()
def monitor(
    env: str = EnvOption,
    window: Optional[int] = typer.Option(None, "--window", min=1,
                                         help="rows to check, the newest (monitoring.window_rows)"),
    trigger: bool = typer.Option(False, "--trigger", help="start retraining (guarded) when the decision says so"),
) -> None:
    """Check ENV's logged traffic against the champion's training profile: drift, quality, decision."""
    import tempfile
    import time

    from rich.console import Console

    from monitoring.check import Reference
    from monitoring.windows import read_window
    from pipelines.serving import local_champion
    from pipelines.traffic_check import check_traffic, drift_table

    settings = settings_or_exit(env)
    spec = settings.monitoring
    console = Console()
    with tempfile.TemporaryDirectory(prefix="flywheel-monitor-") as tmp:
        try:
            version, model_dir = local_champion(settings, tmp)
            reference = Reference.from_model_dir(model_dir, version)
        except (LookupError, ValueError) as err:
            fail(str(err))
    try:
        frame = read_window(spec.sink.root, model_version=version, rows=window or spec.window_rows)
        if frame.empty:  # nothing to compare: every feature would read as 100% missing
            typer.echo(f"no traffic logged for {settings.mlflow.registered_model} v{version} under {spec.sink.root}")
            return
        result, posted = check_traffic(settings, frame, reference)
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
    if posted:
        console.print(posted)
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
def score(
    env: str = EnvOption,
    data: str = typer.Option(..., "--data", help="the table to score: CSV, CSV.gz or Parquet (path or URI)"),
    out: str = typer.Option(..., "--out", help="where the predictions go (Parquet; path or URI)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="stream every task's output instead of a log file"),
) -> None:
    """Score a table with ENV's champion (batch scoring pipeline on kfp.local): predictions with lineage."""
    from rich.console import Console

    from pipelines.scoring_run import NoChampion, champion_version, print_summary, run_scoring

    settings = settings_or_exit(env)
    if not settings.embedded:
        fail(f"env {env!r} runs on a cluster (kfp.host is set); use 'flywheel submit scoring --env {env}'")
    try:
        champion_version(settings)
    except NoChampion as err:
        fail(str(err))
    console = Console()
    try:
        run = run_scoring(settings, data, out, console, verbose=verbose)
    except RuntimeError as err:
        fail(str(err))
    print_summary(console, run)


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
