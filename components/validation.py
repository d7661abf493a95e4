"""Data validation gate: expectation suites as config, validated with great-expectations 1.x.

Plain Python, no KFP. `load_suite` runs at pipeline-compile time and returns a JSON-serializable
suite that the compiled pipeline carries as a parameter; `validate_file`/`validate_frame` run in
the validate task (or `flywheel validate`) and return a `ValidationOutcome` that names the
expectations, columns and sample rows that broke. great_expectations is imported lazily: it
costs ~2 s and must stay off the CLI start path.
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SEVERITIES = ("blocking", "warn")
RESERVED = ("type", "severity", "why")
SAMPLE_ROWS = 5

# Logical types for `type_list`, expanded to the dtype names GX compares against. Strings are read
# as pandas' pyarrow-backed StringDtype (see read_for_validation); "str" covers object columns.
INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"]
LOGICAL_TYPES = {
    "integer": INTEGER_DTYPES,
    "number": INTEGER_DTYPES + ["float16", "float32", "float64", "Float32", "Float64"],
    "string": ["str", "StringDtype"],
}


class SuiteError(ValueError):
    """An expectation suite file is missing or malformed; the message names file and entry."""


class ValidationFailed(Exception):
    """Blocking expectations failed; the message names expectations, columns and sample rows."""

    def __init__(self, outcome: "ValidationOutcome"):
        self.outcome = outcome
        super().__init__(outcome.failure_message())


# ----------------------------------------------------------------------------- suites as config


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
         "max_value": None, "why": "a single-class label cannot train a classifier"},
    ]
    entries += [{"type": "expect_column_values_to_be_in_type_list", "column": c, "type_list": "number"} for c in numeric]
    entries += [{"type": "expect_column_values_to_be_in_type_list", "column": c, "type_list": "string"} for c in categorical]
    if id_column:
        entries += [{"type": "expect_column_values_to_not_be_null", "column": id_column},
                    {"type": "expect_column_values_to_be_unique", "column": id_column}]
    suite = normalize_suite({"name": "derived", "expectations": entries}, source="<derived from dataset config>")
    return {**suite, "id_column": id_column}


def load_suite(dataset_cfg: Any, config_dir: Path | str = CONFIG_DIR) -> dict:
    """The dataset's suite as a JSON-serializable dict (called at compile time): the named YAML
    under config/expectations/, or a schema-only suite derived from the config when it is null."""
    name = _cfg_get(dataset_cfg, "expectation_suite")
    if not name:
        return derive_suite(dataset_cfg)
    id_column = _cfg_get(dataset_cfg, "id_column")
    path = Path(config_dir) / "expectations" / f"{name}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
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


# ----------------------------------------------------------------------------- outcome


@dataclass
class ExpectationResult:
    """One expectation's verdict, flattened for reports, metrics and error messages."""

    index: int
    type: str
    severity: str
    success: bool
    columns: list[str]
    expected: str
    observed: str = ""
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    sample_rows: list[dict] = field(default_factory=list)  # {"row": 0-based data row, col: value, ...}
    error: str = ""
    why: str = ""

    @property
    def status(self) -> str:
        if self.success:
            return "passed"
        return "failed" if self.severity == "blocking" else "warning"

    def describe(self) -> str:
        cols = ", ".join(repr(c) for c in self.columns) or "table"
        text = f"{self.type} on {cols}"
        detail = self.error or (f"observed {self.observed}" if self.observed else "")
        if self.unexpected_count:
            detail = f"{self.unexpected_count:,} unexpected rows ({self.unexpected_percent:.2f}%)"
        if detail:
            text += f": {detail}; expected {self.expected}"
        if self.sample_rows:
            text += "; e.g. " + ", ".join(_sample_text(r, self.columns) for r in self.sample_rows[:3])
        return text


def _sample_text(row: dict, columns: list[str]) -> str:
    shown = {c: row[c] for c in columns if c in row} or {k: v for k, v in row.items() if k != "row"}
    return f"row {row['row']} (" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


@dataclass
class ValidationOutcome:
    """The gate's verdict: passed unless a blocking expectation failed or the file is unreadable."""

    suite_name: str
    rows: int
    columns: list[str]
    results: list[ExpectationResult]
    error: str = ""  # file-level problem: empty, truncated, corrupt
    source: str = ""
    gx_result: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.error and not self.blocking_failures

    @property
    def blocking_failures(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.success and r.severity == "blocking"]

    @property
    def warnings(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.success and r.severity == "warn"]

    @property
    def unexpected_percent(self) -> float:
        """The worst row-level unexpected percent among failed expectations (0 when none failed);
        passing `mostly` checks (e.g. 3% missing income) are within tolerance, not counted."""
        return max((r.unexpected_percent or 0.0 for r in self.results if not r.success), default=0.0)

    def metrics(self) -> dict[str, float]:
        return {
            "expectations_evaluated": len(self.results),
            "expectations_passed": sum(r.success for r in self.results),
            "expectations_failed": len(self.blocking_failures),
            "expectations_warned": len(self.warnings),
            "unexpected_percent_max": round(self.unexpected_percent, 4),
            "rows": self.rows,
        }

    def failure_message(self) -> str:
        if self.error:
            return f"data validation failed: {self.source or 'dataset'}: {self.error}"
        lines = [f"data validation failed ({self.source or 'dataset'}, suite {self.suite_name!r}): "
                 f"{len(self.blocking_failures)} blocking expectation(s) broke:"]
        lines += [f"  - {r.describe()}" for r in self.blocking_failures]
        return "\n".join(lines)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        m = self.metrics()
        return (f"{verdict}: {m['expectations_passed']}/{m['expectations_evaluated']} expectations passed, "
                f"{m['expectations_failed']} blocking failure(s), {m['expectations_warned']} warning(s), "
                f"{self.rows:,} rows")

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "gx_result"}
        data.update(passed=self.passed, metrics=self.metrics(), gx_result=self.gx_result)
        return json.loads(json.dumps(data, default=_json_default))


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


# ----------------------------------------------------------------------------- reading


def read_for_validation(path: str | Path):
    """Read CSV, gzip-compressed CSV or Parquet once with pyarrow (multi-threaded, types inferred,
    strict row widths), strings as pyarrow-backed pandas strings (no Python str objects). The
    format is sniffed by content where the path has no extension. The frame is consolidated
    (one block per dtype): GX filters the whole frame per column check, and on a split frame
    every filter re-consolidates (measured 2.3x slower on 1M rows)."""
    import pandas as pd
    import pyarrow as pa

    from components.dataset import table_format

    path = Path(path)
    fmt = table_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    else:
        import pyarrow.csv as pcsv

        options = pcsv.ConvertOptions(strings_can_be_null=True)
        if fmt == "csv.gz":  # name the codec: pyarrow infers it only from a .gz extension, artifacts have none
            with pa.CompressedInputStream(pa.OSFile(str(path)), "gzip") as stream:
                table = pcsv.read_csv(stream, convert_options=options)
        else:
            table = pcsv.read_csv(path, convert_options=options)
        for column, kind in zip(table.column_names, table.schema.types):
            if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):  # pyarrow's fallback for bad UTF-8
                raise ValueError(f"column {column!r} is not valid UTF-8 text (corrupt file or wrong encoding)")
    string = pd.StringDtype("pyarrow")
    mapping = {pa.string(): string, pa.large_string(): string}
    return table.to_pandas(types_mapper=mapping.get)


def file_problem(path: str | Path, err: Exception) -> str:
    """A one-line reason why a data file cannot be read."""
    path = Path(path)
    if not path.exists():
        return f"file not found: {path}"
    if path.stat().st_size == 0:
        return "empty file (0 bytes): no header, no rows"
    from components.dataset import table_format

    kind = table_format(path)
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if kind == "parquet":
        return f"unreadable Parquet (truncated or corrupt): {text}"
    if kind == "csv.gz":
        return f"unreadable gzip-compressed CSV (truncated, corrupt or ragged rows): {text}"
    return f"unreadable CSV (truncated, corrupt or ragged rows): {text}"


# ----------------------------------------------------------------------------- GX engine

_ENGINE: dict = {}


def _gx_engine():
    """One ephemeral GX context per process: no files, no $HOME, no analytics, no progress bars."""
    if not _ENGINE:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        import great_expectations.execution_engine.pandas_execution_engine as pandas_engine

        # GX md5-hashes every frame under 1 GB into a batch marker on each batch load (0.9 s per
        # 1M rows). We never read that marker: lineage uses components.dataset.content_hash.
        pandas_engine.HASH_THRESHOLD = 0
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("flywheel").add_dataframe_asset("frame")
        _ENGINE.update(gx=gx, context=context, batch_definition=asset.add_batch_definition_whole_dataframe("whole"))
    return _ENGINE


def gx_suite(suite: dict):
    """Build the GX ExpectationSuite; errors name the entry, its type and what is wrong."""
    engine = _gx_engine()
    from great_expectations.expectations.registry import get_expectation_impl

    gx_suite_ = engine["gx"].ExpectationSuite(name=suite["name"])
    for i, entry in enumerate(suite["expectations"]):
        where = f"{suite.get('source', suite['name'])}: expectations[{i}] ({entry['type']})"
        try:
            cls = get_expectation_impl(entry["type"])
        except Exception:
            raise SuiteError(f"{where}: unknown expectation type") from None
        try:
            expectation = cls(**entry["kwargs"], meta={"index": i, "severity": entry["severity"], "why": entry["why"]},
                              severity="critical" if entry["severity"] == "blocking" else "warning")
        except Exception as err:  # pydantic errors name the bad argument
            raise SuiteError(f"{where}: {err}") from None
        gx_suite_.add_expectation(expectation)
    return gx_suite_


def check_suite(suite: dict) -> None:
    """Fail with SuiteError if any entry does not build as a GX expectation."""
    gx_suite(suite)


def _columns_of(kwargs: dict) -> list[str]:
    cols = [kwargs[k] for k in ("column", "column_A", "column_B") if kwargs.get(k)]
    return cols + list(kwargs.get("column_list") or [])


def _expected_text(kwargs: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("column", "column_A", "column_B", "batch_id", "result_format")}
    if "type_list" in shown and len(shown["type_list"]) > 4:
        shown["type_list"] = shown["type_list"][:4] + ["..."]
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "true"


def _observed_text(result: dict) -> str:
    mismatch = (result.get("details") or {}).get("mismatched") if isinstance(result.get("details"), dict) else None
    if mismatch:  # column-set expectations: say what differs, not the whole list
        return "; ".join(f"{k} columns: {v}" for k, v in mismatch.items() if v)
    if "observed_value" in result:
        value = result["observed_value"]
        if isinstance(value, float):
            return f"{value:.6g}"
        if isinstance(value, list) and len(value) > 6:
            return f"{len(value)} values: {', '.join(map(str, value[:5]))}, ..."
        if isinstance(value, dict) and "values" in value:  # quantiles
            return str([round(v, 4) if isinstance(v, float) else v for v in value["values"]])
        return str(value)
    if "unexpected_count" in result:
        return f"{result['unexpected_count']:,} of {result.get('element_count', 0):,} unexpected"
    return ""


def _python(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _samples(frame, indices: list, columns: list[str], id_column: str | None) -> list[dict]:
    positions = [i for i in indices if isinstance(i, (int,)) or hasattr(i, "__index__")][:SAMPLE_ROWS]
    shown = [c for c in ([id_column] if id_column else []) + columns if c in frame.columns]
    shown = list(dict.fromkeys(shown))
    rows = []
    for pos in positions:
        try:
            record = frame.loc[pos, shown] if shown else {}
        except KeyError:
            continue
        rows.append({"row": int(pos), **{c: _python(record[c]) for c in shown}})
    return rows


def _run(validator, suite_obj, result_format):
    # `mode.string_storage=pyarrow` makes GX's "StringDtype" match our pyarrow-backed strings.
    import pandas as pd

    validator.result_format = result_format
    with pd.option_context("mode.string_storage", "pyarrow"):
        return validator.validate_expectation_suite(suite_obj)


def validate_frame(frame, suite: dict, id_column: str | None = None, source: str = "") -> ValidationOutcome:
    """Validate a DataFrame against a suite in one batched GX run.

    All expectations run in one validation with the cheap BASIC result format; only those that
    failed row-wise are re-run with SUMMARY, for their sample offending rows (row numbers are
    0-based positions in the data, header excluded).
    """
    engine = _gx_engine()
    if frame.index.has_duplicates or not frame.index.is_monotonic_increasing:
        frame = frame.reset_index(drop=True)
    from great_expectations.validator.v1_validator import Validator

    suite_obj = gx_suite(suite)
    # One Validator loads the batch once and serves both passes (Batch.validate reloads per call).
    batch = Validator(engine["batch_definition"], batch_parameters={"dataframe": frame})
    first = _run(batch, suite_obj, {"result_format": "BASIC", "partial_unexpected_count": 0})
    by_index: dict[int, dict] = {}
    for res in first.results:
        by_index[res.expectation_config.meta["index"]] = res.to_json_dict()

    failed = [i for i, r in by_index.items() if not r["success"] and "unexpected_count" in r.get("result", {})]
    if failed:
        detail_suite = engine["gx"].ExpectationSuite(name=suite["name"] + "-details")
        for expectation in suite_obj.expectations:
            if expectation.meta["index"] in failed:
                detail_suite.add_expectation(expectation.copy() if hasattr(expectation, "copy") else expectation)
        detail = _run(batch, detail_suite, {"result_format": "SUMMARY", "partial_unexpected_count": SAMPLE_ROWS})
        for res in detail.results:
            by_index[res.expectation_config.meta["index"]] = res.to_json_dict()

    results = []
    for i, entry in enumerate(suite["expectations"]):
        raw = by_index.get(i, {"success": False, "result": {}, "exception_info": {"exception_message": "not evaluated"}})
        result = raw.get("result") or {}
        exc = raw.get("exception_info") or {}
        error = ""
        if exc.get("raised_exception") or (not raw.get("success") and exc.get("exception_message")):
            error = (exc.get("exception_message") or "raised an exception").strip().splitlines()[-1]
        columns = _columns_of(entry["kwargs"])
        if entry["type"] == "expect_table_columns_to_match_set" and not raw.get("success"):
            mismatch = (result.get("details") or {}).get("mismatched") or {}
            columns = sorted(set(mismatch.get("unexpected", [])) | set(mismatch.get("missing", [])))
        results.append(ExpectationResult(
            index=i, type=entry["type"], severity=entry["severity"], success=bool(raw.get("success")),
            columns=columns, expected=_expected_text(entry["kwargs"]), observed=_observed_text(result),
            unexpected_count=result.get("unexpected_count"), unexpected_percent=result.get("unexpected_percent"),
            sample_rows=_samples(frame, result.get("partial_unexpected_index_list") or [], columns, id_column),
            error=error, why=entry.get("why", ""),
        ))
    gx_json = first.to_json_dict()
    gx_json["results"] = [by_index[i] for i in sorted(by_index)]
    return ValidationOutcome(suite_name=suite["name"], rows=len(frame), columns=[str(c) for c in frame.columns],
                             results=results, source=source, gx_result=json.loads(json.dumps(gx_json, default=_json_default)))


def validate_file(path: str | Path, suite: dict, id_column: str | None = None) -> ValidationOutcome:
    """Read and validate a CSV/Parquet file; an empty, truncated or corrupt file becomes a failed
    outcome with a clear message instead of an exception."""
    try:
        frame = read_for_validation(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError/UnicodeDecodeError/...
        problem = file_problem(path, err)
        result = ExpectationResult(index=-1, type="file_is_readable", severity="blocking", success=False,
                                   columns=[], expected="a readable CSV or Parquet file with a header", error=problem)
        return ValidationOutcome(suite_name=suite["name"], rows=0, columns=[], results=[result],
                                 error=problem, source=str(path))
    return validate_frame(frame, suite, id_column=id_column, source=str(path))


# ----------------------------------------------------------------------------- HTML report

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px} .meta{color:#57606a;margin-bottom:16px}
.banner{padding:12px 16px;border-radius:6px;font-weight:600;margin-bottom:16px;color:#fff}
.banner.passed{background:#1a7f37} .banner.failed{background:#cf222e}
.cards{display:flex;gap:12px;margin-bottom:20px} .card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px} table{border-collapse:collapse;width:100%;margin-bottom:18px}
th,td{border:1px solid #d0d7de;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.exp{max-width:230px;overflow-wrap:anywhere} td.obs{max-width:180px;overflow-wrap:anywhere}
tr.failed td.status{background:#ffebe9;color:#a40e26;font-weight:600}
tr.warning td.status{background:#fff8c5;color:#7d4e00;font-weight:600}
tr.passed td.status{background:#dafbe1;color:#116329}
code{font:12px ui-monospace,Menlo,monospace} .why{color:#57606a;font-size:12px}
table.rows{width:auto;margin:6px 0 0} table.rows td,table.rows th{font:12px ui-monospace,monospace;padding:2px 6px}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def render_html(outcome: ValidationOutcome) -> str:
    """A self-contained HTML report (inline CSS, no scripts): verdict, counts, then one row per
    expectation with status, columns, observed vs expected and sample offending rows."""
    m = outcome.metrics()
    verdict = "passed" if outcome.passed else "failed"
    headline = outcome.summary() if not outcome.error else f"FAILED: {outcome.error}"
    order = {"failed": 0, "warning": 1, "passed": 2}
    rows = []
    for r in sorted(outcome.results, key=lambda r: (order[r.status], r.index)):
        samples = ""
        if r.sample_rows:
            keys = list(r.sample_rows[0])
            samples = ("<table class='rows'><tr>" + "".join(f"<th>{_esc(k)}</th>" for k in keys) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_esc(s.get(k))}</td>" for k in keys) + "</tr>" for s in r.sample_rows)
                       + "</table>")
        unexpected = "" if r.unexpected_count is None else f"{r.unexpected_count:,} ({(r.unexpected_percent or 0):.2f}%)"
        observed = _esc(r.error or r.observed)
        rows.append(
            f"<tr class='{r.status}'><td class='status'>{r.status}</td><td>{_esc(r.severity)}</td>"
            f"<td><code>{_esc(r.type)}</code>" + (f"<div class='why'>{_esc(r.why)}</div>" if r.why else "") + "</td>"
            f"<td>{_esc(', '.join(r.columns)) or '<i>table</i>'}</td><td class='obs'>{observed}</td><td class='exp'><code>{_esc(r.expected)}</code></td>"
            f"<td>{unexpected}{samples}</td></tr>"
        )
    cards = "".join(f"<div class='card'>{_esc(k.replace('_', ' '))}<b>{v:,}</b></div>" if isinstance(v, int)
                    else f"<div class='card'>{_esc(k.replace('_', ' '))}<b>{v:.2f}%</b></div>" for k, v in m.items())
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Data validation: {_esc(outcome.suite_name)} - {verdict}</title><style>{_CSS}</style></head><body>"
        f"<h1>Data validation report</h1><div class='meta'>suite <b>{_esc(outcome.suite_name)}</b> &middot; "
        f"{_esc(outcome.source or 'in-memory frame')} &middot; {outcome.rows:,} rows &times; {len(outcome.columns)} columns</div>"
        f"<div class='banner {verdict}'>{_esc(headline)}</div><div class='cards'>{cards}</div>"
        "<table><tr><th>status</th><th>severity</th><th>expectation</th><th>columns</th><th>observed</th>"
        "<th>expected</th><th>unexpected rows (sample, 0-based row numbers)</th></tr>"
        + "".join(rows) + "</table></body></html>"
    )


def write_reports(outcome: ValidationOutcome, out_dir: str | Path, stem: str = "validation") -> tuple[Path, Path]:
    """Write <stem>.json (our outcome + the raw GX result) and <stem>.html into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / f"{stem}.json", out_dir / f"{stem}.html"
    json_path.write_text(json.dumps(outcome.to_dict(), indent=1))
    html_path.write_text(render_html(outcome))
    return json_path, html_path
