"""Expectation suites as config: read, check (without GX), derive from the dataset's columns, or
draft from trusted data. A suite is a JSON-serializable dict the compiled pipeline carries."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

SEVERITIES = ("blocking", "warn")
RESERVED = ("type", "severity", "why")

# Logical types for `type_list`, expanded to the dtype names GX compares against. Strings are read
# as pandas' pyarrow-backed StringDtype (storage.tables.read_table(arrow_strings=True)); "str" covers object columns.
INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"]
LOGICAL_TYPES = {
    "integer": INTEGER_DTYPES,
    "number": INTEGER_DTYPES + ["float16", "float32", "float64", "Float32", "Float64"],
    "string": ["str", "StringDtype"],
}


class SuiteError(ValueError):
    """An expectation suite file is missing or malformed; the message names file and entry."""


def _cfg_get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def normalize_suite(raw: dict, source: str = "<suite>") -> dict:
    """Check a suite's structure (without GX) and return {name, source, expectations:[...]}, each
    expectation as {type, kwargs, severity, why}, with logical `type_list`s expanded."""
    if not isinstance(raw, dict) or not isinstance(raw.get("expectations"), list):
        raise SuiteError(f"{source}: a suite is a mapping with a list under 'expectations'")
    out = []
    for i, entry in enumerate(raw["expectations"]):
        where = f"{source}: expectations[{i}]"
        if not isinstance(entry, dict) or not str(entry.get("type", "")).startswith("expect_"):
            raise SuiteError(f"{where}: needs 'type: expect_...', got {entry!r}")
        severity = entry.get("severity", "blocking")
        if severity not in SEVERITIES:
            raise SuiteError(f"{where} ({entry['type']}): severity {severity!r}; allowed: {', '.join(SEVERITIES)}")
        kwargs = {k: v for k, v in entry.items() if k not in RESERVED}
        if isinstance(kwargs.get("type_list"), str):
            logical = kwargs["type_list"]
            if logical not in LOGICAL_TYPES:
                raise SuiteError(f"{where}: type_list {logical!r}; allowed: {', '.join(LOGICAL_TYPES)} or a list")
            kwargs["type_list"] = list(LOGICAL_TYPES[logical])
        out.append({"type": entry["type"], "kwargs": kwargs, "severity": severity, "why": entry.get("why", "")})
    if not out:
        raise SuiteError(f"{source}: the suite has no expectations")
    suite = {"name": str(raw.get("name") or Path(source).stem), "source": source, "expectations": out}
    json.dumps(suite)  # must travel as a pipeline parameter
    return suite


def derive_suite(dataset_cfg: Any) -> dict:
    """Schema-only suite for bring-your-own data, from the config's features, target and id:
    the columns exist with the right kinds, label present with 2+ classes, key unique."""
    target, id_column = _cfg_get(dataset_cfg, "target"), _cfg_get(dataset_cfg, "id_column")
    features = _cfg_get(dataset_cfg, "features")
    numeric, categorical = list(_cfg_get(features, "numeric", [])), list(_cfg_get(features, "categorical", []))
    columns = ([id_column] if id_column else []) + numeric + categorical + [target]
    entries: list[dict] = [
        {"type": "expect_table_columns_to_match_set", "column_set": columns, "exact_match": False,
         "why": "every configured feature, the label and the key must be present"},
        {"type": "expect_table_row_count_to_be_between", "min_value": 1, "max_value": None},
        {"type": "expect_column_to_exist", "column": target, "why": "the label"},
        {"type": "expect_column_values_to_not_be_null", "column": target, "why": "unlabeled rows"},
        {"type": "expect_column_unique_value_count_to_be_between", "column": target, "min_value": 2,
         "max_value": 2, "why": "a binary classifier needs exactly two classes"},
    ]
    entries += [{"type": "expect_column_values_to_be_in_type_list", "column": c, "type_list": "number"}
                for c in numeric]
    entries += [{"type": "expect_column_values_to_be_in_type_list", "column": c, "type_list": "string"}
                for c in categorical]
    if id_column:
        entries += [{"type": "expect_column_values_to_not_be_null", "column": id_column},
                    {"type": "expect_column_values_to_be_unique", "column": id_column}]
    suite = normalize_suite({"name": "derived", "expectations": entries}, source="<derived from dataset config>")
    return {**suite, "id_column": id_column}


def load_suite(dataset_cfg: Any, config_dir: Path | str) -> dict:
    """The dataset's suite as a JSON-serializable dict (called at compile time): the named YAML
    under `<config_dir>/expectations/`, or a schema-only suite derived from the config when it is null."""
    name = _cfg_get(dataset_cfg, "expectation_suite")
    if not name:
        return derive_suite(dataset_cfg)
    id_column = _cfg_get(dataset_cfg, "id_column")
    path = Path(config_dir) / "expectations" / f"{name}.yaml"
    try:
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: ~10x
    except FileNotFoundError:
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SuiteError(f"{path}: not found (dataset.expectation_suite {name!r}); available: {available}") from None
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML: {err}") from None
    return {**normalize_suite(raw, source=str(path)), "id_column": id_column}


def suggest_suite(frame, name: str, target: str | None = None, id_column: str | None = None,
                  max_categories: int = 50) -> dict:
    """Draft a suite from a trusted frame: schema, types, allowed missing rates, loose ranges,
    category sets, key uniqueness, row count and (warn-only) mean bounds. A draft to review."""
    import pandas as pd

    entries: list[dict] = [
        {"type": "expect_table_columns_to_match_set", "column_set": list(map(str, frame.columns)), "exact_match": True},
        {"type": "expect_table_row_count_to_be_between", "min_value": max(1, len(frame) // 10), "max_value": None},
    ]
    for column in frame.columns:
        col = frame[column]
        name_ = str(column)
        missing = float(col.isna().mean())
        if pd.api.types.is_bool_dtype(col):
            kind = None
        elif pd.api.types.is_integer_dtype(col):
            kind = "integer"
        elif pd.api.types.is_numeric_dtype(col):
            kind = "number"
        else:
            kind = "string"
        if kind:
            entries.append({"type": "expect_column_values_to_be_in_type_list", "column": name_, "type_list": kind})
        if missing == 0:
            entries.append({"type": "expect_column_values_to_not_be_null", "column": name_})
        else:  # allow up to ~3x the observed missing rate before blocking
            mostly = max(0.0, round(1 - min(1.0, 3 * missing + 0.01), 3))
            entries.append({"type": "expect_column_values_to_not_be_null", "column": name_, "mostly": mostly,
                            "why": f"{missing:.1%} missing in the trusted data"})
        values = col.dropna()
        if len(values) == 0:
            continue
        if name_ == id_column or (kind == "string" and values.is_unique and len(values) > max_categories):
            entries.append({"type": "expect_column_values_to_be_unique", "column": name_})
        elif kind in ("integer", "number") and values.nunique() > 2:
            lo, hi = float(values.min()), float(values.max())
            pad = (hi - lo) * 0.5
            lower = 0.0 if lo >= 0 and lo - pad < 0 else lo - pad
            entries.append({"type": "expect_column_values_to_be_between", "column": name_,
                            "min_value": _round(lower), "max_value": _round(hi + pad)})
            mean, std = float(values.mean()), float(values.std() or 0.0)
            entries.append({"type": "expect_column_mean_to_be_between", "column": name_, "severity": "warn",
                            "min_value": _round(mean - std / 2), "max_value": _round(mean + std / 2),
                            "why": f"mean {mean:.4g} in the trusted data"})
        elif values.nunique() <= max_categories:
            observed = sorted(values.unique().tolist(), key=str)
            observed = [v.item() if hasattr(v, "item") else v for v in observed]
            entries.append({"type": "expect_column_values_to_be_in_set", "column": name_, "value_set": observed})
        if name_ == target:
            entries.append({"type": "expect_column_unique_value_count_to_be_between", "column": name_,
                            "min_value": 2, "max_value": None, "why": "the label needs 2+ classes"})
    return {"name": name, "description": f"drafted by `flywheel expectations suggest` from {len(frame):,} trusted rows",
            "expectations": entries}


def _round(x: float) -> float | int:
    r = float(f"{x:.4g}")
    return int(r) if r.is_integer() and abs(r) < 2**53 else r
