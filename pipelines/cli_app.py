"""The `flywheel` command's application object and what every command shares: one line per
failure (an unreachable server, an object store error, a config error), the `--env` option.

Heavy libraries (torch, mlflow, GX, kfp) load only in the commands that need them, so
`flywheel --help` and `flywheel config` stay instant."""

from __future__ import annotations

import os

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

    # `flywheel -h` lists commands in the lifecycle's order, not in the order modules register them.
    ORDER = ("config", "check", "data", "validate", "expectations", "train", "compile", "run", "serve", "deploy",
             "rollback", "shadow", "monitor", "score", "submit", "schedule", "render", "monitor-config")

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda name: self.ORDER.index(name) if name in self.ORDER else len(self.ORDER))

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


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=Commands,
                  help="`flywheel`: the MLOps lifecycle on Kubeflow, from one front door.",
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
