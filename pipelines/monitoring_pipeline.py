"""The monitoring pipeline, defined once and compiled per environment like the training pipeline:

    champion -> read window -> drift + quality (metrics, HTML report) -> decide
                                                                        `-> trigger retraining (if "retrain")

`flywheel schedule` runs it every `monitoring.check_every_hours` hours on a cluster. Its trigger
task starts the env's published training pipeline (`gateways.kfp_api.start_published_run`, as
every retraining entry point does) through `monitoring.trigger.GuardedTrigger`, whose guards
(cool-down, one run in flight, dedup, trigger_on_drift) keep a storm of drifting windows to one
retraining run.

On this machine the pipeline is only compiled: a kfp.local task cannot start a nested local
pipeline run, so `flywheel monitor --env local [--trigger]` runs the same check outside KFP.
"""

from kfp import dsl, kubernetes

from components.factory import component
from pipelines.arguments import MONITORING, monitoring_arguments
from pipelines.config import Settings
from pipelines.tasks import configure

NAME = MONITORING
# Kubeflow's PodDefault that mounts the KFP ServiceAccount token (audience pipelines.kubeflow.org)
# into pods carrying this label; the trigger task authenticates with it (gateways.kfp_api).
KFP_TOKEN_POD_LABEL = ("access-ml-pipeline", "true")


def build(settings: Settings):
    """Return the pipeline function for `settings`' image and defaults."""
    from components.monitor import champion_op, decide_op, drift_op, trigger_op, window_op

    image = "" if settings.embedded else settings.image.ref
    champion, window, drift, decide, trigger = (component(fn, image) for fn in (
        champion_op, window_op, drift_op, decide_op, trigger_op))
    defaults = monitoring_arguments(settings)

    @dsl.pipeline(name=f"flywheel-{NAME}",
                  description="Check the champion's live traffic for drift and quality against its training "
                              "profile; retrain (guarded) when the breach persists.")
    def monitoring(
        env: str = defaults["env"],
        tracking: dict = defaults["tracking"],
        dataset_spec: dict = defaults["dataset_spec"],
        suite: dict = defaults["suite"],
        monitoring_spec: dict = defaults["monitoring_spec"],
        retraining_spec: dict = defaults["retraining_spec"],
        kfp_target: dict = defaults["kfp_target"],
    ):
        found = champion(tracking=tracking).set_display_name("champion profile")
        read = window(monitoring_spec=monitoring_spec, model_version=found.outputs["Output"])
        read.set_display_name("read window")
        checked = drift(window=read.outputs["window"], champion=found.outputs["champion"],
                        monitoring_spec=monitoring_spec, dataset_spec=dataset_spec, suite=suite)
        checked.set_display_name("drift and quality")
        decided = decide(summary=checked.outputs["summary"], monitoring_spec=monitoring_spec, env=env)
        decided.set_display_name("decision")
        tasks = [found, read, checked, decided]
        with dsl.If(decided.outputs["Output"] == "retrain", name="retrain"):
            fired = trigger(decision=decided.outputs["decision"], retraining_spec=retraining_spec,
                            kfp_target=kfp_target, tracking=tracking, env=env, monitoring_spec=monitoring_spec)
            fired.set_display_name("trigger retraining")
            tasks.append(fired)
            if not settings.embedded:
                kubernetes.add_pod_label(fired, *KFP_TOKEN_POD_LABEL)
        for task in tasks:
            configure(task, settings)

    return monitoring
