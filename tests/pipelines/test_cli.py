"""The CLI as a user meets it: Given a config, When a command runs, Then its output and exit code."""
import subprocess
import sys

import pandas as pd
import yaml
from typer.testing import CliRunner

from pipelines.catalog import load_compiled
from pipelines.cli import app

runner = CliRunner()


def test_help_lists_every_command_and_starts_without_heavy_imports():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("check", "config", "data", "compile", "run", "submit"):
        assert command in result.output
    probe = ("import sys; import pipelines.cli; "
             "print(sorted(m for m in ('torch', 'mlflow', 'great_expectations', 'kfp') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_config_prints_the_merged_env_as_yaml():
    result = runner.invoke(app, ["config", "--env", "dev"])
    assert result.exit_code == 0
    data = yaml.safe_load(result.output)
    assert data["env"] == "dev" and data["training"]["resources"]["gpu"]["resource"] == "nvidia.com/mig-1g.5gb"


def test_bad_env_exits_nonzero_with_one_line_reason():
    result = runner.invoke(app, ["config", "--env", "qa"])
    assert result.exit_code == 1
    assert "unknown environment 'qa'" in result.output


def test_data_writes_csv_and_parquet(tmp_path):
    for name in ("sample.csv", "sample.parquet"):
        result = runner.invoke(app, ["data", "--env", "local", "--rows", "250", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        frame = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        assert len(frame) == 250 and "default" in frame.columns


def test_compile_writes_every_pipeline_for_the_env(tmp_path):
    result = runner.invoke(app, ["compile", "--env", "staging", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    spec = load_compiled(tmp_path / "staging" / "training.yaml")
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "ghcr.io/flywheel-ml/flywheel:0.1.0"}


def test_check_fails_clearly_on_a_broken_config(config_dir, monkeypatch):
    (config_dir / "prod.yaml").write_text((config_dir / "prod.yaml").read_text().replace("workers: 4", "workerz: 4"))
    monkeypatch.setattr("pipelines.config.CONFIG_DIR", config_dir)
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 1
    assert "prod     FAILED" in result.output
    assert f"{config_dir / 'prod.yaml'}: training.workerz: unknown key" in result.output
    assert "dev      ok" in result.output


def test_run_refuses_cluster_envs():
    result = runner.invoke(app, ["run", "--env", "prod"])
    assert result.exit_code == 1 and "runs on a cluster" in result.output
    assert "flywheel submit training --env prod" in result.output


def test_validate_passes_clean_data_and_fails_bad_data_with_a_reason(tmp_path):
    from stages.dataset import ReferenceTask
    from storage.tables import write_table

    frame = ReferenceTask(rows=2000, seed=3).generate()
    clean = write_table(frame, tmp_path / "clean.parquet")
    result = runner.invoke(app, ["validate", "--env", "local", "--data", str(clean), "--out-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "clean.parquet.validation.html").exists()

    frame.loc[[3, 7], "age"] = 250
    bad = write_table(frame, tmp_path / "bad.csv")
    result = runner.invoke(app, ["validate", "--env", "local", "--data", str(bad), "--out-dir", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "blocking expectation(s) failed" in result.output and "age" in result.output


def test_expectations_suggest_drafts_a_suite_that_accepts_its_own_data(tmp_path):
    from stages.dataset import ReferenceTask
    from stages.validation import normalize_suite, validate_file
    from storage.tables import write_table

    data = write_table(ReferenceTask(rows=2000, seed=4).generate(), tmp_path / "trusted.csv")
    out = tmp_path / "draft.yaml"
    result = runner.invoke(app, ["expectations", "suggest", "--data", str(data), "--out", str(out),
                                 "--target", "default"])
    assert result.exit_code == 0, result.output
    suite = normalize_suite(yaml.safe_load(out.read_text()), str(out))
    assert len(suite["expectations"]) > 20
    assert validate_file(data, suite).passed


def test_run_stops_on_bad_data_with_the_reason_and_the_log_path(config_dir, tmp_path):
    """As a user runs it: a real `flywheel run` process, task output going to its log file."""
    import os

    from stages.dataset import ReferenceTask
    from storage.tables import write_table

    frame = ReferenceTask(rows=1500, seed=2).generate()
    frame["income"] = frame["income"].astype(str) + " EUR"  # numbers as strings
    source = write_table(frame, tmp_path / "customers.csv")
    local = yaml.safe_load((config_dir / "local.yaml").read_text())
    local["dataset"] = {"source": "file", "uri": str(source)}
    local["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (config_dir / "local.yaml").write_text(yaml.safe_dump(local))
    env = {**os.environ, "FLYWHEEL_CONFIG_DIR": str(config_dir), "FLYWHEEL_RUNS_DIR": str(tmp_path / "runs")}

    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert "done ingest-op" in done.stdout and "train-op" not in done.stdout, "progress, and nothing past validate"
    error = done.stderr
    assert "local pipeline failed" in error and "validate-op" in error
    assert "ValidationFailed" in error and "income" in error, "the reason, not just the task name"
    assert "validate-op/report.html" in error, "points at the HTML report"
    log = next((tmp_path / "runs" / "local").glob("run-*.log"))
    assert str(log) in error.replace("\n", "")
    assert "Traceback" not in error


def _commands(group, path=()):
    import typer.main

    command = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, sub in command.commands.items():
        if hasattr(sub, "commands"):
            yield from _commands(sub, (*path, name))
        else:
            yield (*path, name)


def test_every_command_takes_h_and_its_help_shows_no_type_placeholder_for_flags():
    commands = list(_commands(app))
    assert ("deploy",) in commands and ("expectations", "suggest") in commands
    for path in [(), *commands]:
        short, long = runner.invoke(app, [*path, "-h"]), runner.invoke(app, [*path, "--help"])
        assert short.exit_code == 0, (path, short.output)
        assert short.output == long.output
        assert "<bool>" not in short.output, (path, short.output)
    deploy_help = runner.invoke(app, ["deploy", "-h"]).output
    assert "--dry-run " in deploy_help and "--model-uri <str>" in deploy_help


def test_data_refuses_zero_or_negative_rows_naming_the_option(tmp_path):
    for rows in ("0", "-5"):
        out = tmp_path / "sample.csv"
        result = runner.invoke(app, ["data", "--env", "local", "--rows", rows, "--out", str(out)])
        assert result.exit_code != 0
        assert "Invalid value for '--rows'" in result.output and "greater than or equal to 1" in result.output
        assert not out.exists()


def test_run_fresh_moves_an_earlier_registry_aside_and_loses_nothing(tmp_path):
    from pipelines.config import load_settings
    from pipelines.local_runner import set_aside

    runs = tmp_path / "runs"
    overrides = {"mlflow": {"tracking_uri": f"sqlite:///{runs / 'mlflow.db'}"},
                 "monitoring": {"sink": {"root": str(runs / "monitoring")}}}
    settings = load_settings("local", overrides=overrides)
    assert set_aside(settings) is None, "nothing earlier: nothing moved"
    (runs / "artifacts" / "credit-default").mkdir(parents=True)
    (runs / "artifacts" / "credit-default" / "model.pt").write_bytes(b"weights")
    (runs / "mlflow.db").write_bytes(b"registry")
    (runs / "mlflow.db-journal").write_bytes(b"undo of a run stopped mid-write")
    (runs / "monitoring" / "model_version=1").mkdir(parents=True)
    (runs / "local").mkdir()  # pipeline roots stay: each run has its own folder there
    earlier = set_aside(settings)
    assert earlier.parent == runs / "earlier"
    assert sorted(p.name for p in runs.iterdir()) == ["earlier", "local"]
    assert (earlier / "mlflow.db").read_bytes() == b"registry"
    assert (earlier / "mlflow.db-journal").exists(), "the journal goes with its database"
    assert (earlier / "artifacts" / "credit-default" / "model.pt").read_bytes() == b"weights"
    assert (earlier / "monitoring" / "model_version=1").is_dir()
    (runs / "mlflow.db").write_bytes(b"the next run's")
    again = set_aside(settings)  # within the same second, say
    assert again != earlier and (again / "mlflow.db").read_bytes() == b"the next run's"
    assert (earlier / "mlflow.db").read_bytes() == b"registry"


def test_run_fresh_refuses_a_registry_that_is_not_a_local_file(config_dir, monkeypatch):
    import pipelines.config

    local = yaml.safe_load((config_dir / "local.yaml").read_text())
    local["mlflow"] = {"tracking_uri": "http://mlflow.example:5000"}
    (config_dir / "local.yaml").write_text(yaml.safe_dump(local))
    monkeypatch.setattr(pipelines.config, "CONFIG_DIR", config_dir)
    result = runner.invoke(app, ["run", "--fresh"])
    assert result.exit_code == 1
    assert "--fresh starts an empty SQLite registry; env 'local' tracks to http://mlflow.example:5000" in result.output
