"""The monitoring pipeline's check half (window -> drift -> decide) behind a stand-in for the
champion task, so that kfp.local can run the real ops without a model registry. (Components must
live in real files for kfp.local; no `from __future__ import annotations`: KFP reads the types.)"""
from kfp import dsl
from kfp.dsl import Artifact, Output

from components.factory import LOCAL_IMAGE, component
from components.monitor import decide_op, drift_op, window_op


@dsl.component(base_image=LOCAL_IMAGE, install_kfp_package=False)
def champion_stand_in(champion_json: str, champion: Output[Artifact]) -> str:
    import json

    with open(champion.path, "w", encoding="utf-8") as handle:
        handle.write(champion_json)
    return json.loads(champion_json)["model_version"]


def build():
    window, drift, decide = (component(fn, "") for fn in (window_op, drift_op, decide_op))

    @dsl.pipeline(name="monitoring-check")
    def monitoring_check(champion_json: str, monitoring_spec: dict, dataset_spec: dict, suite: dict, env: str):
        found = champion_stand_in(champion_json=champion_json)
        read = window(monitoring_spec=monitoring_spec, model_version=found.outputs["Output"])
        checked = drift(window=read.outputs["window"], champion=found.outputs["champion"],
                        monitoring_spec=monitoring_spec, dataset_spec=dataset_spec, suite=suite)
        decide(summary=checked.outputs["summary"], monitoring_spec=monitoring_spec, env=env)

    return monitoring_check
