"""The batch scoring pipeline, defined once and compiled per environment like the others:

    resolve champion -> screen (quarantine) -> ParallelFor(row ranges) score -> collect -> drift report

It scores a table with the registry's champion in process (no HTTP: serving's preprocessing and
forward pass, `stages.scoring`), writes Parquet predictions with lineage columns to `out_uri`
and a KFP `Dataset` with lineage metadata, and checks the scored batch like a window of served
traffic (`monitoring.check.assess`, the HTML drift report). `flywheel score` runs it here on
kfp.local; `flywheel submit scoring` on a cluster.

Never cached: the champion alias moves, and the same input URI may hold new rows.
"""

from kfp import dsl

from components.factory import component
from pipelines.arguments import scoring_arguments
from pipelines.config import Settings
from pipelines.tasks import configure

NAME = SCORING = "scoring"


def build(settings: Settings):
    """Return the pipeline function for `settings`' image and defaults."""
    from components.score import batch_drift_op, collect_op, resolve_op, score_op, screen_op

    image = "" if settings.embedded else settings.image.ref
    resolve, screen, score, collect, drift = (component(fn, image) for fn in (
        resolve_op, screen_op, score_op, collect_op, batch_drift_op))
    defaults = scoring_arguments(settings)

    @dsl.pipeline(name=f"flywheel-{NAME}",
                  description="Score a table with the champion in parallel partitions: quarantine rows that break "
                              "the training suite, write predictions with lineage, report the batch's drift.")
    def scoring(
        env: str = defaults["env"],
        tracking: dict = defaults["tracking"],
        dataset_spec: dict = defaults["dataset_spec"],
        suite: dict = defaults["suite"],
        scoring_spec: dict = defaults["scoring_spec"],
        monitoring_spec: dict = defaults["monitoring_spec"],
        decision_threshold: float = defaults["decision_threshold"],
        data_uri: str = defaults["data_uri"],
        out_uri: str = defaults["out_uri"],
    ):
        found = resolve(tracking=tracking).set_display_name("resolve champion")
        screened = screen(data_uri=data_uri, suite=suite, scoring_spec=scoring_spec, model=found.outputs["model"])
        screened.set_display_name("screen rows")
        tasks = [found, screened]
        with dsl.ParallelFor(screened.outputs["Output"], parallelism=settings.scoring.partitions) as partition:
            scored = score(clean=screened.outputs["clean"], model=found.outputs["model"],
                           champion=found.outputs["champion"], partition=partition,
                           decision_threshold=decision_threshold).set_display_name("score partition")
            tasks.append(scored)
        joined = collect(parts=dsl.Collected(scored.outputs["predictions"]), champion=found.outputs["champion"],
                         quarantine=screened.outputs["quarantine"], data_uri=data_uri, out_uri=out_uri)
        joined.set_display_name("write predictions")
        checked = drift(clean=screened.outputs["clean"], predictions=joined.outputs["predictions"],
                        champion=found.outputs["champion"], monitoring_spec=monitoring_spec,
                        dataset_spec=dataset_spec, suite=suite).set_display_name("batch drift")
        tasks += [joined, checked]
        for task in tasks:
            configure(task, settings)

    return scoring
