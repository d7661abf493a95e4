"""The great-expectations 1.x engine: one ephemeral context per process, every expectation of a
suite in one batched run, failures re-run only for their sample rows. great_expectations is
imported lazily: it costs ~2 s and must stay off the CLI start path."""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

from stages.validation.outcome import SAMPLE_ROWS, ExpectationResult, ValidationOutcome, _json_default
from stages.validation.suite import SuiteError
from storage.tables import read_table, table_format

_ENGINE: dict = {}


@contextmanager
def _quiet_gx_logs():
    """Import GX inside this block to keep its INFO housekeeping out of sight.

    GX logs at INFO on import ("Skipping registering function ...", dozens of lines) and when a
    context starts ("Created temporary directory ... for ephemeral docs site": its
    `data_context.types.base` module pins its own logger to INFO). Wherever a handler takes INFO
    (kfp's executor runs `logging.basicConfig(level=INFO)`, kfp.local's runner sets the root
    logger to INFO) those lines land in front of a person. So GX's loggers start at WARNING; a
    level someone set on the `great_expectations` logger on purpose is kept."""
    package = logging.getLogger("great_expectations")
    quiet = package.level == logging.NOTSET
    if quiet:
        package.setLevel(logging.WARNING)
    yield
    if quiet:
        for name, child in list(logging.root.manager.loggerDict.items()):
            if name.startswith("great_expectations.") and isinstance(child, logging.Logger) \
                    and logging.NOTSET < child.level < logging.WARNING:
                child.setLevel(logging.NOTSET)  # inherit WARNING from the package logger


def gx_engine():
    """One ephemeral GX context per process: no files, no $HOME, no analytics, no progress bars."""
    if not _ENGINE:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        with _quiet_gx_logs():
            import great_expectations as gx
            import great_expectations.execution_engine.pandas_execution_engine as pandas_engine
            from great_expectations.data_context.types.base import ProgressBarsConfig

        # GX md5-hashes every frame under 1 GB into a batch marker on each batch load (0.9 s per
        # 1M rows). We never read that marker: lineage uses storage.tables.content_hash.
        pandas_engine.HASH_THRESHOLD = 0
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("flywheel").add_dataframe_asset("frame")
        _ENGINE.update(gx=gx, context=context, batch_definition=asset.add_batch_definition_whole_dataframe("whole"))
    return _ENGINE


def gx_suite(suite: dict):
    """Build the GX ExpectationSuite; errors name the entry, its type and what is wrong."""
    engine = gx_engine()
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
    shown = {k: v for k, v in kwargs.items()
             if k not in ("column", "column_A", "column_B", "batch_id", "result_format")}
    if "type_" in shown:  # expect_column_values_to_be_of_type: "float64"
        return str(shown.pop("type_")) + "".join(f", {k}={v}" for k, v in shown.items())
    if "type_list" in shown:  # "a type in [int8, int16, ...]" (the suite's logical kinds expand to many)
        types = [str(t) for t in shown.pop("type_list")]
        listed = ", ".join(types[:4]) + (f", ... ({len(types)} types)" if len(types) > 4 else "")
        return f"a type in [{listed}]" + "".join(f", {k}={v}" for k, v in shown.items())
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


TYPE_EXPECTATIONS = ("expect_column_values_to_be_in_type_list", "expect_column_values_to_be_of_type")
NUMERIC_TYPES = ("int", "uint", "float", "number", "decimal", "double")


def _missing_text(missing: list[str], frame) -> str:
    names = ", ".join(repr(c) for c in missing)
    shown = ", ".join(map(str, frame.columns[:8])) + (", ..." if len(frame.columns) > 8 else "")
    return (f"column {names} is missing" if len(missing) == 1 else f"columns {names} are missing") + \
        f" (the data has {len(frame.columns)}: {shown})"


def _type_failure(frame, entry: dict, result: dict, id_column: str | None) -> dict:
    """A failed type expectation as rows: GX checks a typed (e.g. pyarrow string) column once, by
    its dtype, and reports only `observed_value: str`; every non-null row then has the wrong type.
    Sample rows show first the values that would not even convert (`'n/a'` in a number column)."""
    import pandas as pd

    column = entry["kwargs"]["column"]
    values = frame[column]
    wrong = values.notna()
    wanted = entry["kwargs"].get("type_list") or [entry["kwargs"].get("type_", "")]
    first = wrong
    if any(str(t).lower().startswith(NUMERIC_TYPES) for t in wanted):
        first = wrong & pd.to_numeric(values.where(wrong), errors="coerce").isna()
    order = list(values.index[first]) + list(values.index[wrong & ~first])
    count = int(wrong.sum())
    kind = result.get("observed_value") or "/".join(sorted({type(v).__name__ for v in values[wrong].head(100)}))
    if "unexpected_count" in result:  # GX checked row by row (object dtype): its rows, our wording
        count = int(result["unexpected_count"])
        order = list(result.get("partial_unexpected_index_list") or order)
    percent = 100.0 * count / len(frame) if len(frame) else 0.0
    return {"unexpected_count": count, "unexpected_percent": percent,
            "detail": f"{count:,} rows ({percent:.2f}%) are {kind}",
            "sample_rows": _samples(frame, order, [column], id_column)}


def _flatten(i: int, entry: dict, raw: dict | None, frame, id_column: str | None) -> ExpectationResult:
    """One GX result as an ExpectationResult: a missing column is named as such (GX would add an
    internal error such as `list index out of range`), a type failure gets its rows and values."""
    raw = raw or {"success": False, "result": {}, "exception_info": {"exception_message": "not evaluated"}}
    result = raw.get("result") or {}
    success = bool(raw.get("success"))
    columns = _columns_of(entry["kwargs"])
    found = {"unexpected_count": result.get("unexpected_count"), "unexpected_percent": result.get("unexpected_percent"),
             "sample_rows": _samples(frame, result.get("partial_unexpected_index_list") or [], columns, id_column)}
    error, missing = "", [c for c in columns if c not in frame.columns]
    if missing and not success:
        error, found = _missing_text(missing, frame), {}
    elif not success and _raised(raw):
        exc = raw.get("exception_info") or {}
        error = (exc.get("exception_message") or "raised an exception").strip().splitlines()[-1]
    elif not success and entry["type"] in TYPE_EXPECTATIONS:
        found = _type_failure(frame, entry, result, id_column)
    if entry["type"] == "expect_table_columns_to_match_set" and not success:
        mismatch = (result.get("details") or {}).get("mismatched") or {}
        columns = sorted(set(mismatch.get("unexpected", [])) | set(mismatch.get("missing", [])))
    return ExpectationResult(index=i, type=entry["type"], severity=entry["severity"], success=success,
                             columns=columns, expected=_expected_text(entry["kwargs"]), observed=_observed_text(result),
                             error=error, why=entry.get("why", ""), **found)


def _raised(raw: dict) -> bool:
    exc = raw.get("exception_info") or {}
    return bool(exc.get("raised_exception") or exc.get("exception_message"))


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
    engine = gx_engine()
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

    results = [_flatten(i, entry, by_index.get(i), frame, id_column) for i, entry in enumerate(suite["expectations"])]
    gx_json = first.to_json_dict()
    gx_json["results"] = [by_index[i] for i in sorted(by_index)]
    return ValidationOutcome(suite_name=suite["name"], rows=len(frame), columns=[str(c) for c in frame.columns],
                             results=results, source=source,
                             gx_result=json.loads(json.dumps(gx_json, default=_json_default)))


def file_problem(path: str | Path, err: Exception) -> str:
    """A one-line reason why a data file cannot be read."""
    path = Path(path)
    if not path.exists():
        return f"file not found: {path}"
    if path.stat().st_size == 0:
        return "empty file (0 bytes): no header, no rows"
    kind = table_format(path)
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if kind == "parquet":
        return f"unreadable Parquet (truncated or corrupt): {text}"
    if kind == "csv.gz":
        return f"unreadable gzip-compressed CSV (truncated, corrupt or ragged rows): {text}"
    return f"unreadable CSV (truncated, corrupt or ragged rows): {text}"


def validate_file(path: str | Path, suite: dict, id_column: str | None = None) -> ValidationOutcome:
    """Read and validate a CSV/Parquet file; an empty, truncated or corrupt file becomes a failed
    outcome with a clear message instead of an exception."""
    try:
        frame = read_table(path, arrow_strings=True)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError/UnicodeDecodeError/...
        problem = file_problem(path, err)
        result = ExpectationResult(index=-1, type="file_is_readable", severity="blocking", success=False,
                                   columns=[], expected="a readable CSV or Parquet file with a header", error=problem)
        return ValidationOutcome(suite_name=suite["name"], rows=0, columns=[], results=[result],
                                 error=problem, source=str(path))
    return validate_frame(frame, suite, id_column=id_column, source=str(path))
