"""Strict parsing of a plain dict into OpenAPI-generated pydantic models, with JSON paths.

The `kubeflow_trainer_api` models (openapi-generator's pydantic v2 flavour) are lenient on their
own: `Model.from_dict` copies only the keys it knows, so an unknown or misspelt field vanishes
without a word (as the API server would prune it), and a nested model's error names only that
model, not where it sits. Nor can plain pydantic validation take over: oneOf types such as
`Quantity` ("2", 0.5) are wrapper models that only their own `from_dict` parses.

`model_problems` walks the dict alongside the model classes instead: every key must be a field
(by its JSON name), every required field present, every value of a model type is walked in turn,
a oneOf wrapper is parsed by its own `from_dict`, and every other value goes through pydantic's
validator for that very field (strict types, the generated enum checks).
"""
from __future__ import annotations

from types import NoneType
from typing import Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

# openapi-generator's oneOf wrapper models keep the parsed value in this field.
ONE_OF_FIELD = "actual_instance"


def model_problems(model: type[BaseModel], value, path: str = "") -> list[str]:
    """Everything `model` would reject, or silently drop, in `value`.

    Args:
        model: An OpenAPI-generated pydantic model class (e.g. `TrainerV1alpha1TrainJob`).
        value: The plain dict (as the API receives it: JSON names, no model instances).
        path: The JSON path of `value`, prefixed to every problem.

    Returns:
        One `<json path>: <problem>` line per problem; empty when `value` parses cleanly.
    """
    if ONE_OF_FIELD in model.model_fields:
        try:
            model.from_dict(value)
        except ValueError as err:  # pydantic's ValidationError is a ValueError too
            return [f"{_where(path)}: {str(err).splitlines()[0]}"]
        return []
    if not isinstance(value, dict):
        return [f"{_where(path)}: must be an object, got {type(value).__name__}"]
    fields = {info.alias or name: name for name, info in model.model_fields.items()}
    problems = [f"{_at(path, key)}: unknown field" for key in value if key not in fields]
    for key, name in fields.items():
        if key in value:
            problems += _field_problems(model, name, value[key], _at(path, key))
        elif model.model_fields[name].is_required():
            problems.append(f"{_at(path, key)}: required")
    return problems


def _field_problems(model: type[BaseModel], name: str, value, path: str) -> list[str]:
    annotation = model.model_fields[name].annotation
    if _holds_models(annotation):
        return _value_problems(annotation, value, path)
    try:  # the field's own validator: its type (Strict*), enum and pattern checks
        model.__pydantic_validator__.validate_assignment(model.model_construct(), name, value)
    except ValidationError as err:
        return [f"{_at(path, *error['loc'][1:])}: {error['msg']}" for error in err.errors()]
    return []


def _value_problems(annotation, value, path: str) -> list[str]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Union:  # Optional[X]: null is "not set"
        if value is None:
            return []
        (annotation,) = [arg for arg in args if arg is not NoneType]
        return _value_problems(annotation, value, path)
    if origin is list:
        if not isinstance(value, list):
            return [f"{_where(path)}: must be a list, got {type(value).__name__}"]
        return [p for index, item in enumerate(value) for p in _value_problems(args[0], item, f"{path}[{index}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{_where(path)}: must be an object, got {type(value).__name__}"]
        return [p for key, item in value.items() for p in _value_problems(args[1], item, _at(path, key))]
    return model_problems(annotation, value, path)


def _holds_models(annotation) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_models(arg) for arg in get_args(annotation))


def _at(path: str, *keys) -> str:
    for key in keys:
        path = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
    return path


def _where(path: str) -> str:
    return path or "(root)"
