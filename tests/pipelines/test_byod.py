"""Bring your own data: a CSV of another schema (an id, a yes/no label, two numeric and two
categorical columns) configured in one env file gets names, suite and slice that fit it; `check`
holds its columns to the file's header; the loop serves its held-out rows and shifts its own
features. (The whole lifecycle on it: tests/e2e/test_byod.py.)"""


import pytest
import yaml

from pipelines.config import load_settings
from specs import DistributionShift, Features
from stages.dataset import load_dataset, read_columns, shift_features
from storage.tables import write_table
from tests.byod import CATEGORICAL, NUMERIC, byod_env, churn_frame


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


