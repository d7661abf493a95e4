"""The training pipeline, defined once and compiled per environment:

    ingest -> validate -> split -> tune (parallel trials) -> train best -> evaluate -> gate
                                                                           `-> register (if promoted)

Each environment's config becomes the pipeline's parameter defaults at build time
(`pipelines.arguments.training_arguments`), so the compiled YAML is self-contained (image,
resources, node selectors, thresholds, suite) and a submission can still override any parameter.
"""

from kfp import dsl, kubernetes

import storage
from components.factory import component
from pipelines.arguments import TRAINING, training_arguments
from pipelines.config import Settings

NAME = TRAINING


def build(settings: Settings):
    """Return the pipeline function for `settings`' image and defaults."""
    from components import ops
    from stages.tuning import HALVING_ETA

    image = "" if settings.embedded else settings.image.ref
    op = {name: component(fn, image) for name, fn in ops().items()}
    ingest, validate, split, propose, trial, promote, select, train, evaluate, gate, register, deploy = (
        op[name] for name in ("ingest", "validate", "split", "propose", "trial", "promote", "select", "train",
                              "evaluate", "gate", "register", "deploy"))
    defaults = training_arguments(settings)
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

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
        ingested = ingest(dataset_spec=dataset_spec).set_display_name("ingest")
        validated = validate(dataset=ingested.outputs["dataset"], suite=suite).set_display_name("validate")
        parts = split(dataset=ingested.outputs["dataset"], dataset_spec=dataset_spec).after(validated)
        parts.set_display_name("split")
        tasks = [ingested, validated, parts]

        best_spec = train_spec
        if settings.tuning.enabled:
            proposals = propose(tuning_spec=tuning_spec, train_spec=train_spec).set_display_name("propose trials")
            with dsl.ParallelFor(proposals.output, parallelism=settings.tuning.parallelism) as proposal:
                trial_run = trial(train_data=parts.outputs["train_data"], train_spec=train_spec,
                                  dataset_spec=dataset_spec, tuning_spec=tuning_spec, trial=proposal,
                                  run_id=run_id).set_display_name("trial")
            tasks += [proposals, trial_run]
            screened = []
            if settings.tuning.strategy == "successive_halving":
                first_rung = trial_run
                promoted = promote(trials=dsl.Collected(first_rung.output)).set_display_name("promote best third")
                screened = dsl.Collected(first_rung.output)
                with dsl.ParallelFor(promoted.output, parallelism=settings.tuning.parallelism) as survivor:
                    trial_run = trial(train_data=parts.outputs["train_data"], train_spec=train_spec,
                                      dataset_spec=dataset_spec, tuning_spec=tuning_spec, trial=survivor,
                                      run_id=run_id, budget_factor=HALVING_ETA).set_display_name("trial, rung 2")
                tasks += [promoted, trial_run]
            chosen = select(trials=dsl.Collected(trial_run.output), train_spec=train_spec, tracking=tracking,
                            env=env, run_id=run_id, screened=screened).set_display_name("select best")
            best_spec = chosen.outputs["train_spec"]
            tasks.append(chosen)

        trained = train(train_data=parts.outputs["train_data"], train_spec=best_spec, dataset_spec=dataset_spec,
                        run_id=run_id, tracking=tracking).set_display_name("train")
        # No KFP retry: the PyTorchJob restarts its own workers (elastic policy, backoff limit).
        evaluated = evaluate(model=trained.outputs["model"], test_data=parts.outputs["test_data"],
                             dataset_spec=dataset_spec, evaluation_spec=evaluation_spec,
                             tracking=tracking).set_display_name("evaluate")
        gated = gate(model=trained.outputs["model"], test_data=parts.outputs["test_data"],
                     dataset_spec=dataset_spec, evaluation_spec=evaluation_spec,
                     tracking=tracking).set_display_name("champion/challenger gate")
        tasks += [trained, evaluated, gated]
        with dsl.If(gated.outputs["Output"] == "promote", name="promoted"):
            registered = register(model=trained.outputs["model"], test_data=parts.outputs["test_data"],
                                  tracking=tracking, env=env, evaluation_run_id=evaluated.outputs["run_id"],
                                  pipeline_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, pipeline_job_id=run_id,
                                  pipeline_task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
                                  pipeline_task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER).set_display_name("register")
            deployed = deploy(model=trained.outputs["model"], test_data=parts.outputs["test_data"],
                              version=registered.outputs["version"], deploy_spec=deploy_spec,
                              tracking=tracking).set_display_name("deploy")
            tasks += [registered, deployed]
        for task in tasks:
            task.set_cpu_limit(settings.kfp.task_cpu).set_memory_limit(settings.kfp.task_memory)
            # Never cached: ingest reads data that changes behind the same URI, the gate reads the
            # registry's current champion, register and select write to MLflow. A scheduled
            # retraining run that hit the cache would silently retrain nothing.
            task.set_caching_options(False)
            if settings.kfp.object_store_endpoint:
                task.set_env_variable("AWS_ENDPOINT_URL", settings.kfp.object_store_endpoint)
            if settings.training.on_cluster:
                # Tasks read and write the object store themselves (staged training-job models, the
                # registry's artifacts): credentials come from the namespace's secret, by reference.
                kubernetes.use_secret_as_env(task, secret_name=storage.CREDENTIALS_SECRET,
                                             secret_key_to_env={k: k for k in storage.CREDENTIAL_KEYS})

    return training
