"""Every pipeline Flywheel ships, and what `compile`, `check` and `publish` do with them: build one
for an env, its arguments (`pipelines.arguments`), compile it, check config against its signature."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from pipelines import monitoring_pipeline, scoring_pipeline, training_pipeline
from pipelines.arguments import monitoring_arguments, scoring_arguments, training_arguments
from pipelines.config import ConfigError, Settings, column_problems, environments, load_settings

PIPELINES: dict[str, ModuleType] = {training_pipeline.NAME: training_pipeline,
                                    monitoring_pipeline.NAME: monitoring_pipeline,
                                    scoring_pipeline.NAME: scoring_pipeline}
ARGUMENTS: dict[str, Callable[[Settings], dict]] = {training_pipeline.NAME: training_arguments,
                                                    monitoring_pipeline.NAME: monitoring_arguments,
                                                    scoring_pipeline.NAME: scoring_arguments}


def get(name: str) -> ModuleType:
    try:
        return PIPELINES[name]
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(sorted(PIPELINES))}") from None


def pipeline_arguments(settings: Settings, name: str) -> dict:
    get(name)  # an unknown name fails with the known ones
    return ARGUMENTS[name](settings)


def compile_pipeline(settings: Settings, name: str, out_dir: Path) -> Path:
    from kfp import compiler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    compiler.Compiler().compile(get(name).build(settings), str(path))
    return path


def load_compiled(path: Path) -> dict:
    """A compiled pipeline as one dict: the PipelineSpec, plus `platforms` when kfp-kubernetes
    settings (secrets, node selectors) add a second YAML document."""
    import yaml

    # libyaml's loader (in PyYAML's wheels) reads an IR file ~10x faster than the pure-Python one
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec, *platform = yaml.load_all(Path(path).read_text(), Loader=loader)
    return spec | (platform[0] if platform else {})


def built_spec(settings: Settings, name: str) -> dict:
    """What `load_compiled(compile_pipeline(...))` gives, without writing and parsing the YAML
    (KFP writes it with PyYAML's pure-Python dumper): the built pipeline's PipelineSpec and
    PlatformSpec as the compiler serialises them (`json_format.MessageToDict`,
    kfp/compiler/pipeline_spec_builder.py `write_pipeline_spec_to_file`)."""
    from google.protobuf import json_format

    pipeline = get(name).build(settings)
    platform = pipeline.platform_spec
    return json_format.MessageToDict(pipeline.pipeline_spec) | (
        json_format.MessageToDict(platform) if len(platform.platforms) else {})


def compile_components(settings: Settings, out_dir: Path) -> dict[str, Path]:
    """Each op as its own component YAML for the env's image (`out_dir/<name>.yaml`), for
    `kfp.components.load_component_from_file` in another team's pipeline."""
    from kfp import compiler

    from components import ops
    from components.factory import component

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = "" if settings.embedded else settings.image.ref
    paths = {}
    for name, fn in ops().items():
        paths[name] = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(component(fn, image), str(paths[name]))
    return paths


def compile_all(settings: Settings, out_dir: Path) -> dict[str, Path]:
    """Every pipeline to `out_dir/<pipeline>.yaml` and every component to `out_dir/components/`."""
    paths = {name: compile_pipeline(settings, name, out_dir) for name in PIPELINES}
    return paths | {f"components/{name}": path
                    for name, path in compile_components(settings, Path(out_dir) / "components").items()}


# KFP IR parameter types and the Python values config may give them.
_IR_TYPES = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "STRUCT": (dict,),
    "LIST": (list,),
}


def signature_errors(pipeline_spec: dict, arguments: dict) -> list[str]:
    """Compare arguments with a compiled pipeline's root input definitions."""
    declared = pipeline_spec["root"].get("inputDefinitions", {}).get("parameters", {})
    errors = [f"argument {k!r} is not a parameter of the pipeline" for k in sorted(set(arguments) - set(declared))]
    for key, definition in declared.items():
        if key not in arguments:
            if not definition.get("isOptional"):
                errors.append(f"parameter {key!r} has no value")
            continue
        kind = definition["parameterType"]
        value = arguments[key]
        if not isinstance(value, _IR_TYPES[kind]) or (kind != "BOOLEAN" and isinstance(value, bool)):
            errors.append(f"parameter {key!r} expects {kind}, config gives {type(value).__name__}")
    return errors


def check_all(config_dir: Path | None = None, notes: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Validate each env's config, the columns it names against a file dataset's header, then its
    arguments against every pipeline's compiled signature. What could not be checked from here
    (an unreachable object store) goes to `notes` when given, not to the problems."""
    problems: dict[str, list[str]] = {}
    for env in environments(config_dir):
        try:
            settings = load_settings(env, config_dir)
        except ConfigError as err:
            problems[env] = str(err).splitlines()
            continue
        problems[env], skipped = column_problems(settings, config_dir)
        if notes is not None and skipped:
            notes[env] = skipped
        for name in PIPELINES:
            try:
                spec, arguments = built_spec(settings, name), pipeline_arguments(settings, name)
            except Exception as err:  # a pipeline that cannot build for an env is a config problem
                problems[env].append(f"{name}: does not compile: {err}")
                continue
            problems[env] += [f"{name}: {e}" for e in signature_errors(spec, arguments)]
    return problems
