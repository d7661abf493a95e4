"""Bring your own data: a CSV of another schema (an id, a yes/no label, two numeric and two
categorical columns) configured in one env file trains, gates, registers, deploys and turns the
loop, with names, suite and slice that fit it; `check` holds its columns to the file's header."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.config import load_settings
from specs import DistributionShift, Features
from stages.dataset import load_dataset, read_columns, shift_features
from storage.tables import write_table

NUMERIC, CATEGORICAL = ["tenure_months", "monthly_spend"], ["plan", "channel"]


def churn_frame(rows: int = 3000, seed: int = 11) -> pd.DataFrame:
    """Subscribers who churn or not: short tenure, high spend and the basic plan churn more."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, rows)
    spend = rng.gamma(4.0, 15.0, rows).round(2)
    plan = rng.choice(["basic", "plus", "pro"], rows, p=[0.5, 0.3, 0.2])
    channel = rng.choice(["web", "store", "phone"], rows, p=[0.6, 0.25, 0.15])
    logit = 0.8 - 0.06 * tenure + 0.02 * (spend - 60) + np.where(plan == "basic", 1.0, 0.0) \
        + np.where(channel == "phone", 0.4, 0.0)
    churned = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "yes", "no")
    return pd.DataFrame({"account_ref": [f"A{i:07d}" for i in range(rows)], "tenure_months": tenure,
                         "monthly_spend": spend, "plan": plan, "channel": channel, "churned": churned})


def byod_env(config_dir, data_uri, tmp_path, **extra) -> str:
    """config/churn.yaml: the README's "Bring your own data" section, sized for a test."""
    env = {
        "namespace": "flywheel-churn", "image": {"tag": "local"}, "kfp": {"host": None},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "dataset": {"source": "file", "uri": str(data_uri), "target": "churned", "id_column": "account_ref",
                    "features": {"numeric": NUMERIC, "categorical": CATEGORICAL}},
        "training": {"backend": "torchrun", "workers": 1, "resources": {"cpu": "1", "memory": "2Gi"},
                     "hyperparameters": {"epochs": 3, "patience": 1}},
        "tuning": {"enabled": False},
        "evaluation": {"thresholds": {"roc_auc": 0.6}},
        "serving": {"deployer": "local", "min_replicas": 1, "max_replicas": 1},
    }
    from pipelines.config import deep_merge

    (config_dir / "churn.yaml").write_text(yaml.safe_dump(deep_merge(env, extra)))
    return "churn"


def test_a_file_dataset_gets_defaults_that_fit_it_and_explicit_values_still_win(config_dir, tmp_path):
    data = write_table(churn_frame(200), tmp_path / "churn_2024.csv")
    env = byod_env(config_dir, data, tmp_path)
    # Given a file dataset and no slice, suite or names in config
    settings = load_settings(env, config_dir)
    # Then the reference task's defaults do not apply: no slice, a derived suite, names from the file
    assert settings.evaluation.slice_column is None and settings.dataset.expectation_suite is None
    assert (settings.mlflow.registered_model, settings.mlflow.experiment) == ("churn_2024", "churn_2024")
    assert settings.kfp.experiment == "churn_2024-churn"
    # And the reference task keeps its own
    local = load_settings("local", config_dir)
    assert (local.evaluation.slice_column, local.dataset.expectation_suite) == ("employment", "credit_default")
    assert (local.mlflow.registered_model, local.kfp.experiment) == ("credit-default", "credit-default-local")
    assert local.dataset.id_column == "customer_id"
    # And a file env that names no id column gets none (not the reference task's customer_id)
    written = yaml.safe_load((config_dir / "churn.yaml").read_text())
    del written["dataset"]["id_column"]
    (config_dir / "churn.yaml").write_text(yaml.safe_dump(written))
    assert load_settings(env, config_dir).dataset.id_column is None
    # And a value config sets wins over the derived default
    byod_env(config_dir, data, tmp_path, evaluation={"slice_column": "plan"},
             mlflow={"registered_model": "churn-model"}, kfp={"experiment": "churn-exp"})
    settings = load_settings(env, config_dir)
    assert (settings.evaluation.slice_column, settings.mlflow.registered_model, settings.mlflow.experiment,
            settings.kfp.experiment) == ("plan", "churn-model", "churn_2024", "churn-exp")


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_the_header_is_read_without_the_rows(tmp_path, suffix):
    frame = churn_frame(50)
    path = write_table(frame, tmp_path / f"churn{suffix}")
    assert read_columns(str(path)) == list(frame.columns)


def test_check_names_every_column_config_has_that_the_file_lacks(config_dir, tmp_path):
    from pipelines.catalog import check_all

    data = write_table(churn_frame(200), tmp_path / "churn.parquet")
    # Given the churn file configured with a typo in a feature, the wrong id and a slice column it lacks
    byod_env(config_dir, data, tmp_path, dataset={"id_column": "customer_id",
                                                  "features": {"categorical": ["plan", "chanel"]}},
             evaluation={"slice_column": "employment"})
    problems = check_all(config_dir)
    churn = config_dir / "churn.yaml"
    # Then check fails before any run, each line with the file, the key path and the file's columns
    assert [line.split(" (columns: ")[0] for line in problems["churn"]] == [
        f"{churn}: dataset.id_column: column 'customer_id' is not in {data}",
        f"{churn}: dataset.features.categorical: column 'chanel' is not in {data}",
        f"{churn}: evaluation.slice_column: column 'employment' is not in {data}",
    ]
    assert all("account_ref, tenure_months, monthly_spend, plan, channel, churned)" in line
               for line in problems["churn"])
    assert all(problems[env] == [] for env in ("dev", "local", "prod", "staging"))


def test_run_stops_on_a_missing_column_before_anything_trains(config_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.setattr("pipelines.config.CONFIG_DIR", config_dir)
    data = write_table(churn_frame(200), tmp_path / "churn.csv")
    env = byod_env(config_dir, data, tmp_path, evaluation={"slice_column": "employment"})
    result = CliRunner().invoke(app, ["run", "--env", env, "--no-loop"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{config_dir / 'churn.yaml'}: evaluation.slice_column: column 'employment' is not in {data}" \
        in result.output
    assert not (tmp_path / "mlflow.db").exists(), "nothing ran"


def test_check_notes_an_object_store_it_cannot_reach_and_a_missing_file_is_a_problem(config_dir, tmp_path,
                                                                                   monkeypatch):
    from pipelines.catalog import check_all

    def unreachable(uri):  # what s3fs raises after its retries (~20 s against a closed port)
        raise ConnectionError(f"Could not connect to the endpoint URL for {uri}")

    monkeypatch.setattr("stages.dataset.read_columns", unreachable)
    byod_env(config_dir, "s3://nowhere/churn.csv", tmp_path)
    notes: dict = {}
    assert check_all(config_dir, notes)["churn"] == []
    assert notes == {"churn": ["dataset.uri s3://nowhere/churn.csv: columns not checked, the header could not be "
                               "read from here (ConnectionError)"]}
    monkeypatch.undo()
    byod_env(config_dir, tmp_path / "absent.csv", tmp_path)
    assert check_all(config_dir)["churn"] == [
        f"{config_dir / 'churn.yaml'}: dataset.uri: file not found: {tmp_path / 'absent.csv'}"]


def test_shifting_a_file_moves_its_own_features_and_keeps_their_types():
    frame = churn_frame(2000)
    features = Features(numeric=NUMERIC, categorical=CATEGORICAL)
    shifted = shift_features(frame, features, DistributionShift(numeric_scale=1.1, numeric_offset=0.75,
                                                                category_skew=0.35), seed=3)
    # Then numbers move up by most of a standard deviation, integers stay integers
    moved = shifted["monthly_spend"].mean() - frame["monthly_spend"].mean()
    assert moved > 0.75 * frame["monthly_spend"].std()
    assert shifted["tenure_months"].dtype == frame["tenure_months"].dtype
    # And about a third of the rows move to each column's rarest category, one the model knows
    for column in CATEGORICAL:
        rarest = frame[column].value_counts().index[-1]
        gained = (shifted[column] == rarest).mean() - (frame[column] == rarest).mean()
        assert 0.25 < gained < 0.35 and set(shifted[column]) == set(frame[column])
    # And the id and the label are left alone
    assert shifted[["account_ref", "churned"]].equals(frame[["account_ref", "churned"]])


def test_a_shift_in_config_applies_to_a_file_dataset(tmp_path):
    from specs import DatasetSpec

    data = write_table(churn_frame(500), tmp_path / "churn.csv")
    spec = DatasetSpec(source="file", uri=str(data), target="churned", id_column="account_ref",
                       features=Features(numeric=NUMERIC, categorical=CATEGORICAL))
    plain = load_dataset(spec)
    shifted = load_dataset(spec.model_copy(update={"shift": DistributionShift(numeric_offset=1.0)}))
    assert (shifted["monthly_spend"] - plain["monthly_spend"]).mean() == pytest.approx(plain["monthly_spend"].std())


def test_the_loop_serves_held_out_rows_then_shifts_the_files_own_features(config_dir, tmp_path):
    from pipelines.loop import FILE_SHIFT, traffic, world_shift
    from stages.dataset import split

    frame = churn_frame(1000)
    env = byod_env(config_dir, write_table(frame, tmp_path / "churn.csv"), tmp_path)
    settings = load_settings(env, config_dir)
    held_out = split(frame, settings.dataset.test_fraction, settings.dataset.seed, "account_ref")[1]
    # Given more rows asked than were held out, Then the steady window is the held-out rows, each once
    steady = traffic(settings, 5000, 1, shifted=False)
    assert sorted(steady["account_ref"]) == sorted(held_out["account_ref"])
    # And a shifted window is held-out rows with the file's own features moved
    shifted = traffic(settings, 100, 2, shifted=True)
    assert len(shifted) == 100 and set(shifted["account_ref"]) <= set(held_out["account_ref"])
    assert shifted["monthly_spend"].mean() > held_out["monthly_spend"].mean() + 0.5 * held_out["monthly_spend"].std()
    assert world_shift(settings) == FILE_SHIFT


@pytest.mark.slow
def test_your_own_csv_runs_end_to_end_from_config_alone_loop_included(config_dir, tmp_path):
    """As a user runs it: `flywheel run --env churn`, a real process, on a CSV that shares no column
    with the reference task, configured only by config/churn.yaml."""
    from gateways.mlflow_api import client as _client

    data = write_table(churn_frame(3000), tmp_path / "churn.csv")
    env = byod_env(config_dir, data, tmp_path)
    environ = {**os.environ, "FLYWHEEL_CONFIG_DIR": str(config_dir), "FLYWHEEL_RUNS_DIR": str(tmp_path / "runs")}
    # When the whole lifecycle runs, loop included
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--env", env], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    # Then it exits 0 without a traceback
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    out = " ".join(done.stdout.split())
    # And the model is registered and served under the file's name, not the reference task's
    assert "churn v1 served by local" in out
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.name for m in client.search_registered_models()] == ["churn"]
    # And the loop served held-out rows, detected the shift on the user's own features and retrained
    assert "tenure_months" in out and "monthly_spend" in out
    assert "started a retraining run" in out
    assert {e.name for e in client.search_experiments()} >= {"churn"}
