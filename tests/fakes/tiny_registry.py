"""A registry with the tiny training pipeline and a tiny monitoring pipeline, same contract as
`pipelines.catalog`, for the tests that schedule both recurring runs (`flywheel schedule`).
(No `from __future__ import annotations` here: KFP reads the real annotation types.)"""
from pathlib import Path

from kfp import compiler, dsl

from tests.fakes import tiny_pipeline


def build_monitoring(settings):
    @dsl.component(base_image=settings.image.ref, install_kfp_package=False)
    def check(window_rows: int, psi_threshold: float, env: str) -> str:
        return f"{env}: {window_rows} rows, PSI > {psi_threshold}"

    @dsl.pipeline(name=f"tiny-monitoring-{settings.env}", description="tiny monitoring pipeline for schedule tests")
    def tiny_monitoring(window_rows: int, psi_threshold: float, env: str):
        check(window_rows=window_rows, psi_threshold=psi_threshold, env=env)

    return tiny_monitoring


PIPELINES = {"training": tiny_pipeline.build, "monitoring": build_monitoring}


def pipeline_arguments(settings, name: str) -> dict:
    if name == "monitoring":
        return {"window_rows": settings.monitoring.window_rows, "psi_threshold": settings.monitoring.psi_threshold,
                "env": settings.env}
    return tiny_pipeline.pipeline_arguments(settings, name)


def compile_pipeline(settings, name: str, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    compiler.Compiler().compile(PIPELINES[name](settings), str(path))
    return path


def build_training_with_defaults(settings):
    """The tiny training pipeline with the env's arguments compiled in as defaults, as the real
    pipelines have them: a run started with no parameters (the trigger task's) uses those."""
    defaults = tiny_pipeline.pipeline_arguments(settings, "training")

    @dsl.component(base_image=settings.image.ref, install_kfp_package=False)
    def fit(epochs: int, learning_rate: float, dataset: dict, env: str, tune: bool) -> str:
        return f"{env}: {epochs} epochs at {learning_rate} on {dataset} tune={tune}"

    @dsl.pipeline(name=f"tiny-defaults-{settings.env}", description="tiny pipeline with compiled defaults")
    def tiny_defaults(epochs: int = defaults["epochs"], learning_rate: float = defaults["learning_rate"],
                      dataset: dict = defaults["dataset"], env: str = defaults["env"], tune: bool = defaults["tune"]):
        fit(epochs=epochs, learning_rate=learning_rate, dataset=dataset, env=env, tune=tune)

    return tiny_defaults


class WithDefaults:
    """A registry whose training pipeline carries its defaults (same contract as `pipelines.catalog`)."""

    PIPELINES = {"training": build_training_with_defaults}
    pipeline_arguments = staticmethod(tiny_pipeline.pipeline_arguments)

    @staticmethod
    def compile_pipeline(settings, name: str, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(WithDefaults.PIPELINES[name](settings), str(path))
        return path
