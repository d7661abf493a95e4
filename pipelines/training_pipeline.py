"""The training pipeline, defined once and compiled per environment:

    ingest -> validate -> split -> train -> evaluate

Each environment's config becomes the pipeline's parameter defaults at build time, so the
compiled YAML is self-contained (image, resources, node selectors, thresholds) and a submission
can still override any parameter.
"""
from __future__ import annotations

from kfp import dsl

from components.base import component
from pipelines.config import Settings

NAME = "training"


def as_parameter(model) -> dict:
    """A config section as a STRUCT parameter (KFP structs cannot hold null: unset keys are omitted)."""
    return model.model_dump(mode="json", exclude_none=True)


def arguments(settings: Settings) -> dict:
    """The pipeline's parameter values for an environment (see `check`)."""
    train_spec = as_parameter(settings.training) | {
        "image": settings.image.ref,
        "namespace": settings.namespace,
        "staging_uri": f"{settings.kfp.pipeline_root or 'runs'}/flywheel-jobs",
    }
    return {
        "env": settings.env,
        "dataset_spec": as_parameter(settings.dataset),
        "train_spec": train_spec,
        "evaluation_spec": as_parameter(settings.evaluation),
        "tracking": as_parameter(settings.mlflow),
    }


def build(settings: Settings):
    """Return the pipeline function for `settings`' image and defaults."""
    from components.evaluate import evaluate_op
    from components.ingest import ingest_op, split_op
    from components.train import train_op

    image = "" if settings.env == "local" else settings.image.ref
    ingest, split, train, evaluate = (component(fn, image) for fn in (ingest_op, split_op, train_op, evaluate_op))
    defaults = arguments(settings)

    @dsl.pipeline(name=f"flywheel-{NAME}", description="Ingest, validate, split, train (DDP) and evaluate a tabular classifier.")
    def training(
        env: str = defaults["env"],
        dataset_spec: dict = defaults["dataset_spec"],
        train_spec: dict = defaults["train_spec"],
        evaluation_spec: dict = defaults["evaluation_spec"],
        tracking: dict = defaults["tracking"],
    ):
        ingested = ingest(dataset_spec=dataset_spec).set_display_name("ingest")
        parts = split(dataset=ingested.outputs["dataset"], dataset_spec=dataset_spec).set_display_name("split")
        trained = train(train_data=parts.outputs["train_data"], train_spec=train_spec, dataset_spec=dataset_spec,
                        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_display_name("train")
        evaluate(model=trained.outputs["model"], test_data=parts.outputs["test_data"], dataset_spec=dataset_spec,
                 evaluation_spec=evaluation_spec, tracking=tracking).set_display_name("evaluate")
        for task in (ingested, parts, trained):
            task.set_cpu_limit(settings.kfp.task_cpu).set_memory_limit(settings.kfp.task_memory)
        trained.set_retry(num_retries=1)

    return training
