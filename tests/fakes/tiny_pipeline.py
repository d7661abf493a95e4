"""A registry with one small pipeline, same contract as `pipelines.catalog`.

It lets the submit/schedule tests compile in milliseconds while still sending every kind of
root parameter the real pipelines use (int, float, string, bool, STRUCT, an optional one).
(No `from __future__ import annotations` here: KFP reads the real annotation types.)
"""
from pathlib import Path

from kfp import compiler, dsl

NAME = "training"


def build(settings):
    @dsl.component(base_image=settings.image.ref, install_kfp_package=False)
    def fit(epochs: int, learning_rate: float, dataset: dict, env: str, tune: bool, note: str) -> str:
        return f"{env}: {epochs} epochs at {learning_rate} on {dataset} tune={tune} {note}"

    @dsl.pipeline(name=f"tiny-{settings.env}", description="tiny pipeline for submit tests")
    def tiny(epochs: int, learning_rate: float, dataset: dict, env: str, tune: bool, note: str = ""):
        fit(epochs=epochs, learning_rate=learning_rate, dataset=dataset, env=env, tune=tune, note=note)

    return tiny


PIPELINES = {NAME: build}


def pipeline_arguments(settings, name: str) -> dict:
    if name not in PIPELINES:
        raise KeyError(name)
    hp = settings.training.hyperparameters
    return {
        "epochs": hp.epochs,
        "learning_rate": hp.learning_rate,
        "dataset": {"rows": settings.dataset.rows, "target": settings.dataset.target},
        "env": settings.env,
        "tune": settings.tuning.enabled,
    }


def compile_pipeline(settings, name: str, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    compiler.Compiler().compile(PIPELINES[name](settings), str(path))
    return path
