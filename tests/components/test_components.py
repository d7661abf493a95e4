"""Each component through the real kfp.local runner (subprocesses, no per-task pip install)."""
import json
import uuid

import pandas as pd
import pytest
from kfp import dsl

from components.factory import component
from components.ingest import ingest_op, split_op
from components.tune import propose_op, select_op, trial_op
from pipelines.arguments import training_arguments as arguments
from pipelines.config import CONFIG_DIR
from specs import DatasetSpec
from stages.dataset import ReferenceTask, load_dataset
from stages.dataset import split as split_frame
from stages.tuning import best_trial, propose
from storage.tables import read_table, write_table

ingest, split = component(ingest_op, ""), component(split_op, "")


def test_ingest_snapshots_the_reference_task_with_its_hash(kfp_local, small_settings):
    task = ingest(dataset_spec=arguments(small_settings)["dataset_spec"])
    dataset = task.outputs["dataset"]
    frame = read_table(dataset.path)
    assert len(frame) == 3000 and "default" in frame.columns
    assert dataset.metadata["content_hash"].startswith("sha256:")
    assert dataset.metadata["format"] == "parquet"


def test_ingest_copies_a_user_csv_byte_for_byte(kfp_local, small_settings, tmp_path):
    source = write_table(ReferenceTask(rows=500).generate(), tmp_path / "customers.csv")
    spec = arguments(small_settings)["dataset_spec"] | {"source": "file", "uri": str(source)}
    dataset = ingest(dataset_spec=spec).outputs["dataset"]
    with open(dataset.path, "rb") as handle:
        assert handle.read() == source.read_bytes()
    assert dataset.metadata["source"] == str(source) and dataset.metadata["format"] == "csv"


def test_a_user_csv_gz_goes_through_ingest_validation_and_reading(kfp_local, small_settings, tmp_path):
    from stages.validation import load_suite, validate_file

    frame = ReferenceTask(rows=2000, seed=4).generate()
    source = write_table(frame, tmp_path / "customers.csv.gz")
    spec = arguments(small_settings)["dataset_spec"] | {"source": "file", "uri": str(source)}
    dataset = ingest(dataset_spec=spec).outputs["dataset"]
    with open(dataset.path, "rb") as handle:
        assert handle.read() == source.read_bytes(), "still a byte-for-byte copy"
    assert dataset.metadata["format"] == "csv.gz"
    outcome = validate_file(dataset.path, load_suite(small_settings.dataset, CONFIG_DIR))  # the extension-less artifact
    assert outcome.passed and outcome.rows == 2000, outcome.failure_message()
    pd.testing.assert_frame_equal(read_table(dataset.path), frame, check_dtype=False)


def test_split_keeps_a_disjoint_stratified_test_set(run_pipeline, small_settings):
    @dsl.pipeline(name="split-under-test")
    def ingest_and_split(dataset_spec: dict):
        split(dataset=ingest(dataset_spec=dataset_spec).outputs["dataset"], dataset_spec=dataset_spec)

    dataset_spec = arguments(small_settings)["dataset_spec"]
    assert dataset_spec["id_column"] == "customer_id"
    run = run_pipeline(ingest_and_split, dataset_spec=dataset_spec)
    train_data, test_data = run.artifact("split-op", "train_data"), run.artifact("split-op", "test_data")
    train, test = read_table(train_data["uri"]), read_table(test_data["uri"])
    # a hashed split: 600 of 3000 in expectation (sd ~22)
    assert len(train) + len(test) == 3000 and abs(len(test) - 600) <= 90
    assert not set(train["customer_id"]) & set(test["customer_id"])
    # split by the spec's id column: the same rows are test rows in a grown, reordered dataset
    grown = pd.concat([read_table(run.artifact("ingest-op", "dataset")["uri"]),
                       ReferenceTask(rows=500, seed=9).generate().assign(customer_id=lambda f: "N" + f["customer_id"])])
    grown = grown.sample(frac=1.0, random_state=3)
    _, grown_test = split_frame(grown, dataset_spec["test_fraction"], dataset_spec["seed"], id_column="customer_id")
    assert set(test["customer_id"]) <= set(grown_test["customer_id"]), "test rows stay test rows"
    assert not set(train["customer_id"]) & set(grown_test["customer_id"]), "no training row leaks into test"
    assert test_data["metadata"]["role"] == "test"
    assert train_data["metadata"]["source_hash"] == run.artifact("ingest-op", "dataset")["metadata"]["content_hash"]


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 API on loopback (moto's server), reached as a pod reaches KFP's MinIO."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "flywheel-test",
           "AWS_SECRET_ACCESS_KEY": "flywheel-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "MINIO_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    name = f"flywheel-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name, client
    server.stop()


@pytest.mark.parametrize("name", ["customers.csv", "customers.csv.gz", "customers.parquet"])
def test_load_dataset_reads_minio_uris_like_the_pipeline_ingest(s3_bucket, small_settings, tmp_path, name):
    """`flywheel data` / `flywheel train` read the configured file through `storage` too."""
    bucket, client = s3_bucket
    frame = ReferenceTask(rows=300, seed=6).generate()
    client.put_object(Bucket=bucket, Key=f"data/{name}", Body=write_table(frame, tmp_path / name).read_bytes())
    spec = arguments(small_settings)["dataset_spec"] | {"source": "file", "uri": f"minio://{bucket}/data/{name}"}
    pd.testing.assert_frame_equal(load_dataset(DatasetSpec.model_validate(spec)), frame, check_dtype=False)


def test_propose_is_deterministic_and_stays_in_the_space():
    space = {"learning_rate": [0.001, 0.01], "hidden": [16, 32, 64], "depth": [1, 2]}
    random_trials = propose(space, "random", 4, seed=7)
    assert random_trials == propose(space, "random", 4, seed=7)
    assert len({json.dumps(t, sort_keys=True) for t in random_trials}) == 4, "no repeated trial"
    assert all(t["hidden"] in space["hidden"] and t["depth"] in space["depth"] for t in random_trials)
    assert len(propose(space, "grid", 100, seed=7)) == 12
    assert propose({}, "random", 3, seed=1) == [{}]


def test_best_trial_prefers_score_then_loss_and_skips_nan():
    results = [
        {"trial": 0, "params": {}, "val_roc_auc": float("nan"), "val_loss": 0.1},
        {"trial": 1, "params": {}, "val_roc_auc": 0.80, "val_loss": 0.40},
        {"trial": 2, "params": {}, "val_roc_auc": 0.80, "val_loss": 0.38},
        {"trial": 3, "params": {}, "val_roc_auc": 0.79, "val_loss": 0.30},
    ]
    assert best_trial(results)["trial"] == 2
    with pytest.raises(RuntimeError, match="no tuning trial produced"):
        best_trial(results[:1])


@pytest.mark.slow
def test_tuning_runs_parallel_trials_and_logs_them_to_mlflow(kfp_local, small_settings, tmp_path):
    import mlflow

    args = arguments(small_settings)
    tuning_spec = small_settings.tuning.model_dump(mode="json") | {
        "trials": 2, "parallelism": 2, "epochs_per_trial": 1, "search_space": {"hidden": [8, 32]}}
    train_spec = args["train_spec"] | {"workers": 1}
    propose_c, trial_c, select_c = (component(f, "") for f in (propose_op, trial_op, select_op))

    @dsl.pipeline(name="tuning-under-test")
    def tuning(dataset_spec: dict, train_spec: dict, tuning_spec: dict, tracking: dict) -> dict:
        parts = split(dataset=ingest(dataset_spec=dataset_spec).outputs["dataset"], dataset_spec=dataset_spec)
        proposals = propose_c(tuning_spec=tuning_spec, train_spec=train_spec)
        with dsl.ParallelFor(proposals.output, parallelism=2) as trial:
            run = trial_c(train_data=parts.outputs["train_data"], train_spec=train_spec, dataset_spec=dataset_spec,
                          tuning_spec=tuning_spec, trial=trial, run_id="t1")
        chosen = select_c(trials=dsl.Collected(run.output), train_spec=train_spec, tracking=tracking, env="local",
                          run_id="t1")
        return chosen.outputs["train_spec"]

    result = tuning(dataset_spec=args["dataset_spec"], train_spec=train_spec, tuning_spec=tuning_spec,
                    tracking=args["tracking"]).output
    assert result["hyperparameters"]["hidden"] in (8, 32)
    assert result["hyperparameters"]["epochs"] == 3, "the full budget is restored after tuning"
    mlflow.set_tracking_uri(args["tracking"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=[args["tracking"]["experiment"]])
    trials = runs[runs["tags.flywheel.stage"] == "tuning-trial"]
    parent = runs[runs["tags.flywheel.stage"] == "tuning"]
    assert len(trials) == 2 and len(parent) == 1
    assert set(trials["tags.mlflow.parentRunId"]) == set(parent["run_id"])
    assert sorted(trials["params.hidden"].astype(int)) == [8, 32]


def test_named_file_gives_an_output_artifact_a_suffix_on_every_store():
    from kfp.dsl import HTML

    from components.factory import named_file

    local_report = HTML(uri="/runs/local/run-1/validate-op/report")
    assert named_file(local_report, ".html") == "/runs/local/run-1/validate-op/report.html"
    assert named_file(local_report, ".html") == "/runs/local/run-1/validate-op/report.html", "only once"
    # on a cluster the pod writes through KFP's mount of the bucket; the URI the launcher uploads to follows
    remote = HTML(uri="minio://mlpipeline/v2/artifacts/training/run-1/gate-op/report")
    assert named_file(remote, ".html") == "/minio/mlpipeline/v2/artifacts/training/run-1/gate-op/report.html"
    assert remote.uri.endswith("/gate-op/report.html") and remote.schema_title == "system.HTML"
