"""The training pipeline, defined once and compiled per environment:

    ingest -> validate -> split -> tune (parallel trials) -> train best -> evaluate -> gate
                                                                           `-> register (if promoted)

Each environment's config becomes the pipeline's parameter defaults at build time
(`pipelines.arguments.training_arguments`), so the compiled YAML is self-contained (image,
resources, node selectors, thresholds, suite) and a submission can still override any parameter.
`build` declares the parameters; each stage of the graph is a function below, called inside the
pipeline function (the tasks it makes are collected in `tasks`, in the order they are made).
"""

from typing import NamedTuple

from kfp import dsl

from components.factory import component
from pipelines.arguments import TRAINING, training_arguments
from pipelines.config import Settings
from pipelines.tasks import configure
from specs.tuning import TuningSpec

NAME = TRAINING
RUN_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER


class Inputs(NamedTuple):
    """The pipeline's parameters, as the tasks read them."""

    env: object
    dataset_spec: object
    suite: object
    train_spec: object
    tuning_spec: object
    evaluation_spec: object
    tracking: object
    deploy_spec: object


def build(settings: Settings):
    """Return the pipeline function for `settings`' image and defaults."""
    from components import ops

    image = "" if settings.embedded else settings.image.ref
    op = {name: component(fn, image) for name, fn in ops().items()}
    defaults = training_arguments(settings)

    @dsl.pipeline(name=f"flywheel-{NAME}",
                  description="Validate data, tune and train a DDP classifier, gate it against the champion, "
                              "register and deploy.")
    def training(
        env: str = defaults["env"],
        dataset_spec: dict = defaults["dataset_spec"],
        suite: dict = defaults["suite"],
        train_spec: dict = defaults["train_spec"],
        tuning_spec: dict = defaults["tuning_spec"],
        evaluation_spec: dict = defaults["evaluation_spec"],
        tracking: dict = defaults["tracking"],
        deploy_spec: dict = defaults["deploy_spec"],
    ):
        given = Inputs(env, dataset_spec, suite, train_spec, tuning_spec, evaluation_spec, tracking, deploy_spec)
        tasks: list = []
        parts = _prepare_data(op, given, tasks)
        best_spec = _tune(op, settings.tuning, given, parts, tasks) if settings.tuning.enabled else train_spec
        _train_and_release(op, given, parts, best_spec, tasks)
        for task in tasks:
            configure(task, settings)

    return training


def _prepare_data(op: dict, given: Inputs, tasks: list):
    """ingest -> validate -> split; returns the split task (its train_data and test_data)."""
    ingested = op["ingest"](dataset_spec=given.dataset_spec).set_display_name("ingest")
    validated = op["validate"](dataset=ingested.outputs["dataset"], suite=given.suite).set_display_name("validate")
    parts = op["split"](dataset=ingested.outputs["dataset"], dataset_spec=given.dataset_spec).after(validated)
    parts.set_display_name("split")
    tasks += [ingested, validated, parts]
    return parts


def _trial(op: dict, given: Inputs, parts, trial, **budget):
    """One tuning trial on the training split (`budget_factor` for a later rung)."""
    return op["trial"](train_data=parts.outputs["train_data"], train_spec=given.train_spec,
                       dataset_spec=given.dataset_spec, tuning_spec=given.tuning_spec, trial=trial,
                       run_id=RUN_ID, **budget)


def _tune(op: dict, tuning: TuningSpec, given: Inputs, parts, tasks: list):
    """Parallel trials of the proposed hyperparameters (successive halving: the best third again, on
    a bigger budget), then the best one's train spec (an output)."""
    from stages.tuning import HALVING_ETA

    proposals = op["propose"](tuning_spec=given.tuning_spec, train_spec=given.train_spec)
    proposals.set_display_name("propose trials")
    with dsl.ParallelFor(proposals.output, parallelism=tuning.parallelism) as proposal:
        trial_run = _trial(op, given, parts, proposal).set_display_name("trial")
    tasks += [proposals, trial_run]
    screened = []
    if tuning.strategy == "successive_halving":
        first_rung = trial_run
        promoted = op["promote"](trials=dsl.Collected(first_rung.output)).set_display_name("promote best third")
        screened = dsl.Collected(first_rung.output)
        with dsl.ParallelFor(promoted.output, parallelism=tuning.parallelism) as survivor:
            trial_run = _trial(op, given, parts, survivor, budget_factor=HALVING_ETA).set_display_name("trial, rung 2")
        tasks += [promoted, trial_run]
    chosen = op["select"](trials=dsl.Collected(trial_run.output), train_spec=given.train_spec, tracking=given.tracking,
                          env=given.env, run_id=RUN_ID, screened=screened).set_display_name("select best")
    tasks.append(chosen)
    return chosen.outputs["train_spec"]


def _train_and_release(op: dict, given: Inputs, parts, best_spec, tasks: list) -> None:
    """train -> evaluate, gate against the champion -> register and deploy when promoted."""
    test_data = parts.outputs["test_data"]
    trained = op["train"](train_data=parts.outputs["train_data"], train_spec=best_spec,
                          dataset_spec=given.dataset_spec, run_id=RUN_ID, tracking=given.tracking)
    trained.set_display_name("train")
    model = trained.outputs["model"]
    # No KFP retry: the PyTorchJob restarts its own workers (elastic policy, backoff limit).
    evaluated = op["evaluate"](model=model, test_data=test_data, dataset_spec=given.dataset_spec,
                               evaluation_spec=given.evaluation_spec, tracking=given.tracking)
    evaluated.set_display_name("evaluate")
    gated = op["gate"](model=model, test_data=test_data, dataset_spec=given.dataset_spec,
                       evaluation_spec=given.evaluation_spec, tracking=given.tracking)
    gated.set_display_name("champion/challenger gate")
    tasks += [trained, evaluated, gated]
    with dsl.If(gated.outputs["Output"] == "promote", name="promoted"):
        registered = op["register"](model=model, test_data=test_data, tracking=given.tracking, env=given.env,
                                    evaluation_run_id=evaluated.outputs["run_id"],
                                    pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, pipeline_job_id=RUN_ID,
                                    pipeline_task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
                                    pipeline_task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER).set_display_name("register")
        deployed = op["deploy"](model=model, test_data=test_data, version=registered.outputs["version"],
                                deploy_spec=given.deploy_spec, tracking=given.tracking).set_display_name("deploy")
        tasks += [registered, deployed]
