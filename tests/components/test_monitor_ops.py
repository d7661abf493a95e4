"""The monitoring check's ops through kfp.local: they decide with hysteresis across runs."""
import datetime as dt
import json
from pathlib import Path

import numpy as np

from pipelines.config import load_settings
from tests.support import write_window


def test_the_check_ops_run_in_kfp_local_and_decide_with_hysteresis(tmp_path, run_pipeline):
    # Given the local env's real features, a profile of its data, a shifted window logged for v7,
    # and a history whose last check (an earlier window) breached already
    from model.profile import build_profile
    from monitoring.check import history_uri, load_history, save_history
    from pipelines.arguments import monitoring_arguments as arguments
    from stages.dataset import load_dataset
    from tests.fakes import monitor_pipeline

    settings = load_settings("local", overrides={
        "dataset": {"rows": 3000}, "monitoring": {"sink": {"root": str(tmp_path / "sink")}, "min_samples": 200}})
    root, features = settings.monitoring.sink.root, settings.dataset.features
    frame = load_dataset(settings.dataset)
    rng = np.random.default_rng(0)
    profile = build_profile(frame, features.numeric, features.categorical, rng.beta(2, 5, 1000),
                            rng.integers(0, 2, 1000))
    live = frame[features.columns].head(600).assign(age=lambda f: f.age + 20)
    write_window(root, "7", live, dt.datetime(2025, 6, 15, 10, tzinfo=dt.UTC), rng.beta(2, 5, len(live)))
    save_history(history_uri(root, "7"), [{"window": "v7/earlier", "rows": 600, "enough_data": True,
                                           "breaches": ["age: PSI 0.5 > 0.2"], "metrics": {}}])
    args = arguments(settings)
    champion_json = json.dumps({"model_version": "7", "profile": profile, "labels": None,
                                "features": features.model_dump()})
    # When the real window, drift and decide ops run through kfp.local
    run = run_pipeline(monitor_pipeline.build(), champion_json=champion_json, monitoring_spec=args["monitoring_spec"],
                       dataset_spec=args["dataset_spec"], suite=args["suite"], env="local")
    # Then the drift task logged KFP metrics per feature and wrote the HTML report
    drift_task = run.tasks["drift-op"]
    metrics = drift_task.artifacts["metrics"]["metadata"]
    assert metrics["rows"] == 600.0 and metrics["psi_age"] > settings.monitoring.psi_threshold
    assert metrics["drifted_age"] == 1.0
    assert "<html" in Path(drift_task.artifacts["report"]["uri"]).read_text().lower()
    assert drift_task.parameters["enough_data"] is True and drift_task.parameters["breaches"] >= 1
    # and, a second breaching window in a row (consecutive_windows 2), the decision is to retrain
    decide = run.tasks["decide-op"]
    assert decide.parameters["Output"] == "retrain"
    decision = json.loads(Path(decide.artifacts["decision"]["uri"]).read_text())
    assert decision["retrain"] and decision["dedup_key"].startswith("drift/local/v7/20250615T100000-")
    assert [h["window"] for h in load_history(history_uri(root, "7"))][0] == "v7/earlier"
    assert len(load_history(history_uri(root, "7"))) == 2
