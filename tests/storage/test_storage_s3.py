"""Storage that crosses pods: the entry point reads its data from, and writes its checkpoints and
model to, a real S3 API server on loopback (moto's server), through s3:// and minio:// URIs.

Nothing is patched: the training processes get the endpoint and credentials the way pods do, in
AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and the test looks at the bucket
with its own boto3 client.
"""
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import storage
from model.loader import load_model
from pipelines.arguments import train_spec
from pipelines.config import load_settings
from stages.dataset import ReferenceTask
from tests.support import keys
from training import train as entry
from training.backends.jobs import entry_args, entry_spec
from training.backends.torchrun import torchrun_command
from training.pods import TORCHRUN_ENV


def put_training_table(client, bucket_name: str, key: str, rows: int) -> None:
    buffer = io.BytesIO()
    ReferenceTask(rows=rows, seed=5).generate().to_parquet(buffer, index=False)
    client.put_object(Bucket=bucket_name, Key=key, Body=buffer.getvalue())


def make_spec(**hyperparameters) -> dict:
    settings = load_settings("local", overrides={"training": {"hyperparameters": hyperparameters}})
    return entry_spec(train_spec(settings), settings.dataset, None)


def test_s3_and_minio_uris_are_the_same_objects(bucket):
    name, client = bucket
    storage.write_atomic(f"minio://{name}/a/b/blob.bin", b"written through minio://")
    assert client.get_object(Bucket=name, Key="a/b/blob.bin")["Body"].read() == b"written through minio://"
    with storage.open_uri(f"s3://{name}/a/b/blob.bin") as handle:
        assert handle.read() == b"written through minio://"

    client.put_object(Bucket=name, Key="a/other.txt", Body=b"from another client")
    assert storage.exists(f"minio://{name}/a/other.txt"), "no stale listing hides another writer's object"
    with storage.open_uri(f"s3://{name}/a/c.json", "wb") as handle:
        handle.write(b"{}")
    assert keys(client, name, "a/") == {"b/blob.bin", "other.txt", "c.json"}
    storage.remove(f"minio://{name}/a/b")
    assert not storage.exists(f"s3://{name}/a/b/blob.bin") and keys(client, name, "a/") == {"other.txt", "c.json"}


def test_minio_without_aws_endpoint_uses_minio_endpoint(s3_env, bucket, monkeypatch):
    name, client = bucket
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MINIO_ENDPOINT", s3_env["AWS_ENDPOINT_URL"])
    storage.write_atomic(f"minio://{name}/m.txt", b"via MINIO_ENDPOINT")
    assert client.get_object(Bucket=name, Key="m.txt")["Body"].read() == b"via MINIO_ENDPOINT"


@pytest.mark.slow
def test_entry_point_trains_from_and_into_the_object_store(bucket, s3_env, caplog):
    name, client = bucket
    put_training_table(client, name, "data/train.parquet", rows=4000)
    model_uri = f"s3://{name}/models/run-1"
    spec = {**make_spec(epochs=3), "keep_checkpoints": True}
    env = {**os.environ, **s3_env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "training.train", *entry_args(f"s3://{name}/data/train.parquet",
                             model_uri, spec)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"checkpoint written after epoch 1 ({model_uri}/checkpoints/last.pt)" in result.stdout

    assert keys(client, name, "models/run-1/") == {"model.pt", "preprocessor.json", "metadata.json",
                                                   "checkpoints/last.pt"}
    body = client.get_object(Bucket=name, Key="models/run-1/checkpoints/last.pt")["Body"].read()
    checkpoint = torch.load(io.BytesIO(body), weights_only=True)
    assert checkpoint["state"]["epoch"] == 3

    model = load_model(model_uri)
    holdout = ReferenceTask(rows=2000, seed=99).generate()
    scores = model.predict_proba(holdout.drop(columns=["default"]))
    assert roc_auc_score(holdout["default"], scores) > 0.70
    assert model.metadata["metrics"]["epochs_run"] == 3
    np.testing.assert_array_equal(load_model(f"minio://{name}/models/run-1").predict_proba(holdout), scores)

    # A restarted pod finds the checkpoint in the bucket and resumes from it instead of starting over.
    caplog.set_level(logging.INFO, logger="flywheel.train")
    again = entry.train(f"minio://{name}/data/train.parquet", f"minio://{name}/models/run-1", spec)
    assert f"resumed from checkpoint after epoch 3 (minio://{name}/models/run-1/checkpoints/last.pt)" in caplog.text
    assert again["resumed_from_epoch"] == 3 and len(again["history"]) == 3


@pytest.mark.slow
def test_two_process_torchrun_job_with_minio_uris(bucket, s3_env):
    name, client = bucket
    put_training_table(client, name, "data/train.parquet", rows=4000)
    env = {**os.environ, **s3_env, **TORCHRUN_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = entry_args(f"minio://{name}/data/train.parquet", f"minio://{name}/models/ddp", make_spec(epochs=2))
    result = subprocess.run(torchrun_command(2, 0, args), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"checkpoint written after epoch 2 (minio://{name}/models/ddp/checkpoints/last.pt)" in result.stdout
    assert keys(client, name, "models/ddp/") == {"model.pt", "preprocessor.json", "metadata.json"}, \
        "the model is in the bucket and the checkpoints are cleaned up after success"
    metadata = json.loads(client.get_object(Bucket=name, Key="models/ddp/metadata.json")["Body"].read())
    assert metadata["world_size"] == 2 and metadata["backend"] == "gloo"
    scores = load_model(f"s3://{name}/models/ddp").predict_proba(ReferenceTask(rows=200, seed=1).generate())
    assert scores.shape == (200,) and np.all((scores > 0) & (scores < 1))
