"""`flywheel score` end to end on the embedded env: a small champion registered in a SQLite MLflow,
the batch scoring pipeline on kfp.local, and the same rows sent to the served champion
(predictor + transformer on loopback) giving the same probabilities and labels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipelines.config import load_settings
from pipelines.local_runner import read_run
from stages.dataset import ReferenceTask
from stages.registry import register_model
from tests.e2e.serving import COLUMNS, NAME, train_quickly
from tests.support import CONFIG_DIR, ROOT

ROWS, PARTITION_ROWS = 2500, 1000


def broken_input(path):
    frame = ReferenceTask(rows=ROWS, seed=11).generate()
    frame.loc[5, "age"] = -1
    frame.loc[1200, "region"] = "atlantis"
    frame.to_csv(path, index=False)
    return frame


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A champion registered from a model trained in seconds, then `flywheel score` run on a CSV
    with two broken rows, partitions of 1,000 rows (the last one short)."""
    tmp = tmp_path_factory.mktemp("score")
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    example = ReferenceTask(rows=20, seed=1).generate()[COLUMNS].head(5)
    version = register_model(tracking, NAME, str(train_quickly(tmp / "v1", 3)), None, {}, example, experiment="score")
    config = tmp / "config"
    config.mkdir()
    for path in CONFIG_DIR.glob("*.yaml"):
        (config / path.name).write_text(path.read_text())
    (config / "expectations").mkdir()
    for path in (CONFIG_DIR / "expectations").glob("*.yaml"):
        (config / "expectations" / path.name).write_text(path.read_text())
    local = yaml.safe_load((config / "local.yaml").read_text())
    local.update(mlflow={"tracking_uri": tracking}, scoring={"partition_rows": PARTITION_ROWS, "partitions": 2})
    (config / "local.yaml").write_text(yaml.safe_dump(local))
    frame = broken_input(tmp / "accounts.csv")
    env = {**os.environ, "FLYWHEEL_CONFIG_DIR": str(config), "FLYWHEEL_RUNS_DIR": str(tmp / "runs"),
           "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "score", "--env", "local", "--data",
                           str(tmp / "accounts.csv"), "--out", str(tmp / "out" / "preds.parquet")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = (tmp / "runs" / "local").glob("flywheel-scoring-*")
    return {"tmp": tmp, "tracking": tracking, "version": version, "frame": frame, "stdout": done.stdout,
            "run": read_run(run_dir), "out": tmp / "out" / "preds.parquet", "env": env, "config": config}


@pytest.mark.slow
def test_score_writes_predictions_with_lineage_and_quarantines_the_broken_rows(scored):
    from gateways.mlflow_api import Registry

    preds, frame = pd.read_parquet(scored["out"]), scored["frame"]
    run_id = Registry(scored["tracking"], NAME).version(scored["version"])["run_id"]
    # Every clean row, once, in input order, with the id, label values, probability and lineage
    assert preds["customer_id"].tolist() == frame.drop(index=[5, 1200])["customer_id"].tolist()
    assert list(preds.columns) == ["customer_id", "input_row", "prediction", "probability", "model_name",
                                   "model_version", "run_id", "scored_at"]
    # Each prediction joins back to its input row by position (the quarantined ones are missing)
    assert preds["input_row"].tolist() == frame.drop(index=[5, 1200]).index.tolist()
    assert set(preds["prediction"]) <= {0, 1} and preds["probability"].between(0, 1).all()
    assert preds[["model_name", "model_version", "run_id"]].drop_duplicates().values.tolist() == [
        [NAME, scored["version"], run_id]]
    # The broken rows are in the quarantine file beside it, with reasons naming expectation and column
    quarantined = pd.read_parquet(scored["tmp"] / "out" / "preds.quarantine.parquet")
    assert quarantined["input_row"].tolist() == [5, 1200]
    assert quarantined["quarantine_reason"].str.contains("on 'age'").tolist() == [True, False]
    assert "expect_column_values_to_be_in_set on 'region'" in quarantined["quarantine_reason"][1]
    # Three partitions ran in parallel tasks, the last one short; the KFP Dataset carries the lineage
    run = scored["run"]
    scored_rows = sorted(t.parameters["Output"] for n, t in run.tasks.items() if n.endswith("/score-op"))
    assert scored_rows == [498, 1000, 1000]
    meta = run.artifact("collect-op", "predictions")["metadata"]
    assert {k: meta[k] for k in ("model_name", "model_version", "rows", "quarantined", "partitions")} == {
        "model_name": NAME, "model_version": scored["version"], "rows": ROWS - 2, "quarantined": 2, "partitions": 3}
    assert meta["input_uri"].endswith("accounts.csv") and meta["model_uri"] and meta["run_id"] == run_id
    # The batch was checked like served traffic: an HTML drift report and a verdict in the summary
    report = run.artifact("batch-drift-op", "report")
    assert report["uri"].endswith(".html") and "<h1>Batch scoring drift report</h1>" in Path(report["uri"]).read_text()
    lines = scored["stdout"].splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    for label in ("rows scored", "quarantined", "partitions", "model", "drift", "predictions"):
        assert any(line.startswith(f"│ {label} ") for line in lines), label
    assert f"{ROWS - 2:,}" in scored["stdout"] and str(scored["out"]) in scored["stdout"].replace("│\n│", "")


@pytest.mark.slow
def test_batch_and_online_scoring_agree_row_for_row(scored):
    """The same rows through the served champion (transformer -> predictor on loopback) and through
    the batch pipeline: the same probability (to 1e-6) and the same label."""
    from deployment.loopback import LocalServing
    from pipelines.serving import local_champion

    settings = load_settings("local", overrides={"mlflow": {"tracking_uri": scored["tracking"]}})
    preds = pd.read_parquet(scored["out"]).set_index("customer_id")
    rows = scored["frame"].drop(index=[5, 1200])
    version, model_dir = local_champion(settings, str(scored["tmp"] / "served"))
    online_p, online_l = [], []
    with LocalServing(model_dir, NAME, settings.serving, scored["tmp"] / "serve-logs",
                      decision_threshold=settings.evaluation.decision_threshold, model_version=version) as serving:
        for start in range(0, len(rows), 1000):
            chunk = rows.iloc[start:start + 1000]
            records = json.loads(chunk[COLUMNS].to_json(orient="records", double_precision=15))
            body = serving.predict_v1(records)
            online_p += body["probabilities"]
            online_l += body["predictions"]
    batch = preds.loc[rows["customer_id"]]
    assert len(online_p) == len(batch) == ROWS - 2
    np.testing.assert_allclose(batch["probability"].to_numpy(), np.asarray(online_p), rtol=0, atol=1e-6)
    assert batch["prediction"].tolist() == online_l


@pytest.mark.slow
def test_past_the_quarantine_share_score_fails_naming_expectation_and_column(scored):
    local = yaml.safe_load((scored["config"] / "local.yaml").read_text())
    local["scoring"]["max_quarantine_share"] = 0.0005  # 2 of 2,500 rows is 0.08%
    (scored["config"] / "local.yaml").write_text(yaml.safe_dump(local))
    out = scored["tmp"] / "strict" / "preds.parquet"
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "score", "--env", "local", "--data",
                           str(scored["tmp"] / "accounts.csv"), "--out", str(out)],
                          cwd=ROOT, env=scored["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and not out.exists()
    assert ("QuarantineError: quarantined 2 of 2,500 rows (0.08%) > scoring.max_quarantine_share 0.05%; most rows "
            "broke: expect_column_values_to_be_between on 'age' (min_value=18, max_value=110) (1 rows)") in done.stderr
    assert "expect_column_values_to_be_in_set on 'region'" in done.stderr


def test_without_a_champion_score_says_so_in_one_line(tmp_path, monkeypatch):
    """(The registry answers "no such alias" through stages.versions: a fresh SQLite store costs 5 s.)"""
    import pipelines.cli as cli
    import pipelines.cli_app as cli_app
    import stages.versions

    empty = load_settings("local", overrides={"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'empty.db'}"}})
    monkeypatch.setattr(cli_app, "load_settings", lambda env: empty)
    asked = []
    monkeypatch.setattr(stages.versions, "version_behind", lambda uri, name, alias: asked.append((name, alias)))
    result = CliRunner().invoke(cli.app, ["score", "--data", "x.csv", "--out", str(tmp_path / "p.parquet")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"error: no champion to score with: credit-default has no champion in sqlite:///{tmp_path / 'empty.db'} "
        "(run `flywheel run` first)")
    assert asked == [("credit-default", "champion")] and not (tmp_path / "p.parquet").exists()
