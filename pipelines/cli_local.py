"""`flywheel` commands that run the lifecycle and serve it: the embedded run, serving (serve,
deploy, rollback, shadow), the monitoring check and batch scoring."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.cli_app import EnvOption, app, fail, settings_or_exit


@app.command()
def run(
    env: str = typer.Option("local", "--env", "-e", help="an environment that runs on this machine (no kfp.host)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="stream every task's output instead of a log file"),
    loop: bool = typer.Option(True, "--loop/--no-loop",
                              help="then turn the flywheel: serve, shift the traffic, detect drift, retrain"),
    fresh: bool = typer.Option(False, "--fresh",
                               help="start from an empty registry: an earlier run's SQLite store, artifacts and "
                                    "monitor windows are moved to runs/earlier/<time>/ (`make run` does)"),
) -> None:
    """Run the whole lifecycle on an embedded environment (kfp.local + torchrun + MLflow + KServe)."""
    settings = settings_or_exit(env)
    if not settings.embedded:
        fail(f"env {env!r} runs on a cluster (kfp.host is set); use 'flywheel submit training --env {env}'")
    from pipelines.local_runner import prepare_tasks, set_aside

    prepare_tasks()  # first: the task zygote imports while the columns are checked and the pipeline built
    from pipelines.config import column_problems

    columns, _ = column_problems(settings)  # before minutes of tuning and training, not after
    if columns:
        fail("\n".join(columns))
    if fresh:  # after the checks: a run refused at once leaves the registry where it was
        try:
            earlier = set_aside(settings)
        except ValueError as err:
            fail(str(err))
        if earlier:
            where = earlier.relative_to(Path.cwd()) if earlier.is_relative_to(Path.cwd()) else earlier
            typer.echo(f"--fresh: the earlier registry and windows are in {where}")
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
    dry_run: bool = typer.Option(False, "--dry-run", help="with start on a cluster env: print the challenger's "
                                 "InferenceService and the VirtualService, apply nothing"),
    version: Optional[str] = typer.Option(None, "--version", help="with --dry-run: the challenger version to render "
                                          "(with --model-uri, no registry needed)"),
    model_uri: Optional[str] = typer.Option(None, "--model-uri", help="with --dry-run --version: its model directory "
                                            "(s3://...)"),
) -> None:
    """Shadow the challenger behind a running `flywheel serve` on mirrored traffic (start), compare it with
    the champion (report: HTML + JSON), stop and promote it when the report passes (stop). On a cluster
    env the challenger is its own InferenceService behind an Istio mirror route (`start --dry-run`
    prints both)."""
    if action not in ("start", "report", "stop"):
        fail(f"unknown action {action!r}: start, report or stop")
    settings = settings_or_exit(env)
    if (version or model_uri) and not dry_run:
        fail("--version and --model-uri go with --dry-run: start shadows the registry's challenger")
    if model_uri and not version:
        fail("--model-uri goes with --version: without one the registry names the challenger and its model")
    if settings.embedded:
        if dry_run:
            fail(f"--dry-run is for a cluster env; env {env!r} shadows behind `flywheel serve` here "
                 "(its report goes to runs/serve/)")
        from pipelines import shadow as shadowing

        if action == "report":
            raise typer.Exit(0 if shadowing.report(settings, typer.echo) is not None else 1)
        raise typer.Exit(getattr(shadowing, action)(settings, typer.echo))
    if dry_run and action != "start":
        fail("--dry-run goes with start")
    raise typer.Exit(_shadow_cluster(action, settings, dry_run, version, model_uri))


def _shadow_cluster(action: str, settings, dry_run: bool, version: str | None, model_uri: str | None) -> int:
    """start (or its --dry-run), report and stop on a cluster env (pipelines/shadow_cluster.py)."""
    from pipelines import shadow_cluster

    why = shadow_cluster.refusal(settings)
    if why:
        fail(why)
    try:
        if dry_run:
            import yaml

            objects = shadow_cluster.dry_run(settings, version, model_uri)
            typer.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)
            return 0
        if action == "report":
            return 0 if shadow_cluster.report(settings, typer.echo) is not None else 1
        return getattr(shadow_cluster, action)(settings, typer.echo)
    except (LookupError, ValueError, RuntimeError) as err:  # KubeApiError and an unreachable host included
        fail(str(err))


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

    from pipelines.scoring_run import (
        NoChampion,
        UnusablePath,
        champion_version,
        check_paths,
        print_summary,
        run_scoring,
    )

    settings = settings_or_exit(env)
    if not settings.embedded:
        fail(f"env {env!r} runs on a cluster (kfp.host is set); use 'flywheel submit scoring --env {env}'")
    try:
        champion_version(settings)
        check_paths(data, out)  # before the pipeline starts, not after the champion's download
    except (NoChampion, UnusablePath) as err:
        fail(str(err))
    console = Console()
    try:
        run = run_scoring(settings, data, out, console, verbose=verbose)
    except RuntimeError as err:
        fail(str(err))
    print_summary(console, run)
