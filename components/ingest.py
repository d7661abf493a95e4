"""Ingest and split: materialise the env's dataset as a KFP artifact, then split the validated
data into train and a held-out test set that training and tuning never see."""

from kfp.dsl import Dataset, Input, Output


def load_dataset(dataset_spec: dict):
    """The env's dataset as a DataFrame: the generated reference task or the configured file,
    read through `training.storage` (local paths, s3://, minio://), as the pipeline's ingest does,
    and sniffed by content like the pipeline's artifact (Parquet, CSV or gzip-compressed CSV)."""
    from components.dataset import Drift, ReferenceTask, read_table
    from pipelines.config import Dataset as DatasetConfig
    from training import storage

    spec = DatasetConfig.model_validate(dataset_spec)
    if spec.source == "reference":
        return ReferenceTask(rows=spec.rows, seed=spec.seed, drift=Drift(**spec.drift.model_dump())).generate()
    with storage.open_uri(spec.uri) as handle:
        return read_table(handle)


def materialise(dataset_spec: dict, path: str) -> dict:
    """Write the dataset to `path` (the reference task as Parquet; a user file byte for byte, so a
    corrupt file reaches validation as it is) and return its lineage metadata."""
    import shutil

    from components.dataset import file_hash, table_format, write_table
    from pipelines.config import Dataset as DatasetConfig
    from training import storage

    dataset_spec = DatasetConfig.model_validate(dataset_spec).model_dump()

    if dataset_spec["source"] == "reference":
        frame = load_dataset(dataset_spec)
        write_table(frame, path + ".parquet")
        shutil.move(path + ".parquet", path)
        source, fmt = f"reference(rows={dataset_spec['rows']}, seed={dataset_spec['seed']})", "parquet"
    else:
        with storage.open_uri(dataset_spec["uri"]) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        source = dataset_spec["uri"]
        fmt = table_format(path)  # by content, as every later stage reads the artifact
    return {"source": source, "format": fmt, "content_hash": file_hash(path)}


def ingest_op(dataset_spec: dict, dataset: Output[Dataset]):
    """Snapshot the env's dataset into the pipeline's artifact store, with its content hash."""
    from components.ingest import materialise

    dataset.metadata.update(materialise(dataset_spec, dataset.path))
    print(f"ingested {dataset.metadata['source']} -> {dataset.metadata['content_hash']}")


def split_op(dataset: Input[Dataset], dataset_spec: dict, train_data: Output[Dataset], test_data: Output[Dataset]):
    """Deterministic train/test split of the validated dataset, stable per row (by the spec's
    id_column, else by row content): rows keep their side as the dataset grows or reorders."""
    from components.dataset import content_hash, read_table, split
    from pipelines.config import Dataset as DatasetConfig

    dataset_spec = DatasetConfig.model_validate(dataset_spec).model_dump()
    frame = read_table(dataset.path)
    train, test = split(frame, dataset_spec["test_fraction"], dataset_spec["seed"], stratify=dataset_spec["target"],
                        id_column=dataset_spec.get("id_column"))
    for artifact, part, role in ((train_data, train, "train"), (test_data, test, "test")):
        part.to_parquet(artifact.path, index=False)
        artifact.metadata.update({"rows": len(part), "role": role, "content_hash": content_hash(part),
                                  "source_hash": dataset.metadata.get("content_hash", ""),
                                  "positive_rate": float(part[dataset_spec["target"]].mean())})
    print(f"split {len(frame):,} rows -> train {len(train):,} / test {len(test):,}")
