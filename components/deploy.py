"""Deploy: serve the newly registered champion with the env's deployer and smoke-test it."""

from kfp.dsl import Dataset, Input, Model


def deploy_op(model: Input[Model], test_data: Input[Dataset], version: str, deploy_spec: dict,
              tracking: dict) -> dict:
    """Serve the promoted model (locally on loopback, or as a KServe InferenceService) and smoke-test it.

    Args:
        model: The promoted model directory.
        test_data: Held-out rows; a few become the smoke test's requests (features only).
        version: The registered model version now behind the `champion` alias.
        deploy_spec: The environment's serving section plus image, namespace and model name.
        tracking: MLflow tracking URI (where a cluster's storage initializer finds the version's files).

    Returns:
        Output: What is live: {deployer, version, outcome, live, url, detail}.
    """
    from components.factory import skip_final_gc

    skip_final_gc()
    import json

    from deployment.deployers import deploy_model
    from model.artifact import feature_columns, read_metadata
    from specs import DeploySpec
    from stages.registry import input_example
    from storage.tables import read_table

    spec = DeploySpec.model_validate(deploy_spec)
    columns = feature_columns(read_metadata(model.path))
    records = json.loads(input_example(read_table(test_data.path), columns, rows=3).to_json(orient="records"))
    live = deploy_model(spec, model.path, version, records, tracking_uri=tracking["tracking_uri"])
    print(f"deploy: {live['live']} {live['outcome']} ({live['detail']})")
    return live
