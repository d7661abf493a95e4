"""`flywheel` commands for clusters and their pipelines: train one stage on a backend, compile,
render the GitOps tree, submit, schedule, the monitor service's config."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.cli_app import EnvOption, app, fail, settings_or_exit


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
        try:
            typer.echo(gitops.write_objects(rendered, out), nl=False)
        except OSError as err:
            fail(f"--out {out}: cannot write there: {err.strerror or err}")


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
