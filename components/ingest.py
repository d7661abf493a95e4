"""Ingest and split: snapshot the env's dataset as a KFP artifact, then split the validated data
into train and a held-out test set that training and tuning never see."""

from kfp.dsl import Dataset, Input, Output


def ingest_op(dataset_spec: dict, dataset: Output[Dataset]):
    """Snapshot the environment's dataset into the pipeline's artifact store.

    Args:
        dataset_spec: The dataset section of the environment's config (source, uri, columns, target).

    Returns:
        dataset: The snapshot: the generated reference task as Parquet, or the configured file byte for
            byte; metadata carries its source, format and content hash.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    from specs import DatasetSpec
    from stages.dataset import materialise

    dataset.metadata.update(materialise(DatasetSpec.model_validate(dataset_spec), dataset.path))
    print(f"ingested {dataset.metadata['source']} -> {dataset.metadata['content_hash']}")


def split_op(dataset: Input[Dataset], dataset_spec: dict, train_data: Output[Dataset], test_data: Output[Dataset]):
    """Split the validated dataset into train and held-out test, stable per row.

    Args:
        dataset: The validated snapshot from ingest.
        dataset_spec: The dataset section of the environment's config (test_fraction, seed, id_column).

    Returns:
        train_data: Rows for training and tuning (Parquet), with their content hash.
        test_data: Held-out rows for evaluation and the gate (Parquet), with their content hash.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    from specs import DatasetSpec
    from stages.dataset import split_snapshot

    for artifact, (frame, metadata) in zip((train_data, test_data),
                                           split_snapshot(dataset.path, DatasetSpec.model_validate(dataset_spec))):
        frame.to_parquet(artifact.path, index=False)
        artifact.metadata.update({**metadata, "source_hash": dataset.metadata.get("content_hash", "")})
    print(f"split -> train {train_data.metadata['rows']:,} / test {test_data.metadata['rows']:,}")
