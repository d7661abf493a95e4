"""The data validation gate: bad data never reaches training, and the report says what broke.

Each defect test: given a clean ReferenceTask frame with one defect, when it is validated with the
real great-expectations engine, then the gate fails and the message names column and expectation.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.config import CONFIG_DIR, load_settings
from stages.dataset import ReferenceTask
from stages.validation import (
    SuiteError,
    ValidationFailed,
    check_suite,
    load_suite,
    normalize_suite,
    render_html,
    suggest_suite,
    validate_file,
    validate_frame,
)
from storage.tables import write_table
from tests.support import ROOT, chromium_screenshot, find_chromium

ROWS = 2000


@pytest.fixture(scope="module")
def settings():
    return load_settings("local")


@pytest.fixture(scope="module")
def suite(settings):
    return load_suite(settings.dataset, CONFIG_DIR)


@pytest.fixture(scope="module")
def _clean():
    return ReferenceTask(rows=ROWS, seed=11).generate()


@pytest.fixture
def clean(_clean):
    return _clean.copy()


def failed(outcome, expectation: str, column: str):
    """Then: the gate failed, on a blocking `expectation` about `column`, and the message says so."""
    assert not outcome.passed, outcome.summary()
    hits = [r for r in outcome.blocking_failures if r.type == expectation and column in r.columns]
    assert hits, (f"no blocking {expectation} on {column!r}; "
                  f"got {[(r.type, r.columns) for r in outcome.blocking_failures]}")
    message = str(ValidationFailed(outcome))
    assert expectation in message and repr(column) in message, message
    return hits[0]


# ---------------------------------------------------------------------------- clean and warn


def test_a_clean_reference_frame_passes_every_expectation(clean, suite):
    outcome = validate_frame(clean, suite, id_column="customer_id")
    assert outcome.passed, outcome.failure_message()
    assert len(outcome.results) == len(suite["expectations"]) >= 40
    assert not outcome.warnings and outcome.unexpected_percent == 0


def test_clean_csv_and_parquet_files_pass(clean, suite, tmp_path):
    for name in ("clean.csv", "clean.csv.gz", "clean.parquet"):
        outcome = validate_file(write_table(clean, tmp_path / name), suite)
        assert outcome.passed, f"{name}: {outcome.failure_message()}"


def test_warn_only_expectations_report_without_failing(clean, suite):
    # Given 6% missing employment: over the 3% warn line, under the 10% blocking line
    rng = np.random.default_rng(1)
    clean.loc[rng.random(ROWS) < 0.06, "employment"] = None
    outcome = validate_frame(clean, suite)
    assert outcome.passed, outcome.failure_message()
    (warning,) = outcome.warnings
    assert warning.type == "expect_column_values_to_not_be_null" and warning.columns == ["employment"]
    assert warning.status == "warning" and 4 < warning.unexpected_percent < 9
    assert outcome.metrics()["expectations_warned"] == 1 and outcome.metrics()["expectations_failed"] == 0


# ---------------------------------------------------------------------------- defects


def test_missing_column_fails_naming_it(clean, suite):
    failed(validate_frame(clean.drop(columns=["region"]), suite), "expect_table_columns_to_match_set", "region")


def test_extra_column_fails_naming_it(clean, suite):
    clean["notes"] = "x"
    result = failed(validate_frame(clean, suite), "expect_table_columns_to_match_set", "notes")
    assert "notes" in result.observed


def test_numbers_as_strings_fail_the_type_check(clean, suite, tmp_path):
    # Given income exported with thousands separators ("52,310.50"): a string column in the CSV
    clean["income"] = clean["income"].map(lambda v: "" if np.isnan(v) else f"{v:,.2f}")
    outcome = validate_file(write_table(clean, tmp_path / "strings.csv"), suite)
    result = failed(outcome, "expect_column_values_to_be_in_type_list", "income")
    assert result.observed == "str"


def test_a_type_failure_says_how_many_rows_and_shows_values_that_do_not_convert(clean, suite, tmp_path):
    # Given an income column with one word among numbers: the CSV reader makes every value a string
    clean["income"] = clean["income"].astype(object)
    clean.loc[7, "income"] = "unknown"
    outcome = validate_file(write_table(clean, tmp_path / "word.csv"), suite, id_column="customer_id")
    result = failed(outcome, "expect_column_values_to_be_in_type_list", "income")
    strings = int(clean["income"].notna().sum())
    assert result.unexpected_count == strings and result.detail.startswith(f"{strings:,} rows (")
    assert result.sample_rows[0] == {"row": 7, "customer_id": clean.customer_id[7], "income": "unknown"}, \
        "the value that is not a number comes first"
    message = str(ValidationFailed(outcome))
    assert f"{strings:,} rows (" in message and "are str" in message and "row 7 (income='unknown')" in message
    assert "expected a type in [" in message


def test_a_missing_column_is_reported_as_missing_by_every_expectation_on_it(clean, suite):
    outcome = validate_frame(clean.drop(columns=["income"]), suite)
    on_income = [r for r in outcome.blocking_failures if r.columns and "income" in r.columns
                 and r.type != "expect_table_columns_to_match_set"]
    assert len(on_income) >= 3, [r.type for r in on_income]
    assert all(r.error.startswith("column 'income' is missing") for r in on_income), [r.error for r in on_income]
    message = str(ValidationFailed(outcome))
    assert "list index out of range" not in message and "Traceback" not in message
    assert "expect_column_values_to_be_in_type_list on 'income': column 'income' is missing" in message


def test_nulls_above_the_allowed_rate_fail(clean, suite):
    clean.loc[np.random.default_rng(2).random(ROWS) < 0.25, "income"] = None
    result = failed(validate_frame(clean, suite), "expect_column_values_to_not_be_null", "income")
    assert 20 < result.unexpected_percent < 32
    assert all(row["income"] is None for row in result.sample_rows) and result.sample_rows


def test_out_of_range_values_fail_with_their_row_numbers(clean, suite):
    clean.loc[[3, 7], "age"] = [-5, 240]
    result = failed(validate_frame(clean, suite, id_column="customer_id"), "expect_column_values_to_be_between", "age")
    assert result.unexpected_count == 2
    assert [(r["row"], r["age"], r["customer_id"]) for r in result.sample_rows] == [
        (3, -5, clean.customer_id[3]), (7, 240, clean.customer_id[7])]
    assert "row 3 (age=-5)" in str(ValidationFailed(validate_frame(clean, suite)))


def test_unknown_categories_fail(clean, suite):
    clean.loc[[10, 11, 12], "housing"] = "castle"
    result = failed(validate_frame(clean, suite), "expect_column_values_to_be_in_set", "housing")
    assert {r["housing"] for r in result.sample_rows} == {"castle"} and result.unexpected_count == 3


def test_duplicated_keys_fail(clean, suite):
    clean.loc[5, "customer_id"] = clean.loc[4, "customer_id"]
    result = failed(validate_frame(clean, suite), "expect_column_values_to_be_unique", "customer_id")
    assert {r["row"] for r in result.sample_rows} == {4, 5}


def test_cross_column_rule_catches_limits_above_income(clean, suite):
    clean.loc[20, "credit_limit"] = clean.loc[20, "income"] * 1000 if clean.loc[20, "income"] > 0 else 1e7
    clean.loc[20, "income"] = 1000.0
    failed(validate_frame(clean, suite), "expect_column_pair_values_a_to_be_greater_than_b", "credit_limit")


def test_missing_label_column_fails(clean, suite):
    outcome = validate_frame(clean.drop(columns=["default"]), suite)
    failed(outcome, "expect_column_to_exist", "default")
    failed(outcome, "expect_table_columns_to_match_set", "default")


def test_single_class_label_fails(clean, suite):
    clean["default"] = 0
    failed(validate_frame(clean, suite), "expect_column_distinct_values_to_equal_set", "default")


@pytest.mark.parametrize("name, damage, reason", [
    ("empty.csv", lambda p: p.write_bytes(b""), "empty file"),
    ("truncated.csv", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2 - 7]), "unreadable CSV"),
    ("corrupt.csv",
     lambda p: p.write_bytes(p.read_bytes()[:4000] + bytes(range(128, 256)) * 40 + p.read_bytes()[4000:]),
     "unreadable CSV"),
    ("truncated.parquet", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "unreadable Parquet"),
    ("corrupt.parquet", lambda p: p.write_bytes(b"PAR1" + os.urandom(3000)), "unreadable Parquet"),
    ("truncated.csv.gz", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
     "unreadable gzip-compressed CSV"),
])
def test_broken_files_become_failed_outcomes(clean, suite, tmp_path, name, damage, reason):
    path = write_table(clean, tmp_path / name)
    damage(path)
    outcome = validate_file(path, suite)
    assert not outcome.passed and outcome.rows == 0
    assert reason in outcome.error and str(path) in str(ValidationFailed(outcome))
    if name == "corrupt.csv":
        assert "column 'region' is not valid UTF-8" in outcome.error
    assert outcome.blocking_failures[0].type == "file_is_readable"


def test_header_only_csv_fails_the_row_count(clean, suite, tmp_path):
    path = write_table(clean.head(0), tmp_path / "header.csv")
    outcome = validate_file(path, suite)
    assert not outcome.passed
    assert any(r.type == "expect_table_row_count_to_be_between" for r in outcome.blocking_failures)


def test_file_without_extension_is_sniffed(clean, suite, tmp_path):
    # KFP artifact paths have no extension: Parquet is recognised by its magic bytes
    write_table(clean, tmp_path / "d.parquet").rename(tmp_path / "dataset")
    assert validate_file(tmp_path / "dataset", suite).passed


def test_gzip_csv_without_extension_is_sniffed(clean, suite, tmp_path):
    # ingest copies a user's .csv.gz byte for byte to an extension-less artifact: gzip magic bytes
    write_table(clean, tmp_path / "d.csv.gz").rename(tmp_path / "dataset")
    outcome = validate_file(tmp_path / "dataset", suite, id_column="customer_id")
    assert outcome.passed and outcome.rows == ROWS, outcome.failure_message()
    (tmp_path / "broken").write_bytes((tmp_path / "dataset").read_bytes()[:3000])
    assert "unreadable gzip-compressed CSV" in validate_file(tmp_path / "broken", suite).error


# ---------------------------------------------------------------------------- suites as config


def test_suite_is_json_and_carries_severity(suite):
    assert json.loads(json.dumps(suite)) == suite
    severities = {e["severity"] for e in suite["expectations"]}
    assert severities == {"blocking", "warn"} and suite["id_column"] == "customer_id"
    check_suite(suite)  # every entry builds as a real GX expectation


def test_bad_suite_entries_are_named(tmp_path):
    with pytest.raises(SuiteError, match=r"expectations\[1\].*severity 'fatal'"):
        normalize_suite({"expectations": [
            {"type": "expect_column_to_exist", "column": "a"},
            {"type": "expect_column_to_exist", "column": "b", "severity": "fatal"}]}, "s.yaml")
    with pytest.raises(SuiteError, match=r"expectations\[0\] \(expect_column_values_to_be_between\).*"):
        check_suite(normalize_suite({"expectations": [
            {"type": "expect_column_values_to_be_between", "column": "a", "min_value": "x", "nonsense": 1}]}))
    with pytest.raises(SuiteError, match="unknown expectation type"):
        check_suite(normalize_suite({"expectations": [{"type": "expect_the_unexpected"}]}))


def test_missing_suite_file_lists_the_available_ones(settings, tmp_path):
    dataset = settings.dataset.model_copy(update={"expectation_suite": "nope"})
    with pytest.raises(SuiteError, match=r"nope.yaml: not found.*credit_default"):
        load_suite(dataset, CONFIG_DIR)


def test_bring_your_own_data_gets_a_derived_schema_suite(settings, clean):
    dataset = settings.dataset.model_copy(update={"expectation_suite": None})
    suite = load_suite(dataset, CONFIG_DIR)
    assert suite["name"] == "derived"
    assert validate_frame(clean, suite).passed
    failed(validate_frame(clean.drop(columns=["default"]), suite), "expect_column_to_exist", "default")
    clean["default"] = 1
    failed(validate_frame(clean, suite), "expect_column_unique_value_count_to_be_between", "default")


def test_suggested_suite_accepts_its_trusted_data_and_catches_defects(clean):
    draft = suggest_suite(clean, "draft", target="default", id_column="customer_id")
    suite = normalize_suite(yaml.safe_load(yaml.safe_dump(draft, sort_keys=False)), "draft.yaml")
    assert validate_frame(clean, suite).passed
    clean.loc[0, "age"] = 500
    clean.loc[1, "region"] = "atlantis"
    outcome = validate_frame(clean, suite)
    failed(outcome, "expect_column_values_to_be_between", "age")
    failed(outcome, "expect_column_values_to_be_in_set", "region")


def test_great_expectations_keeps_its_info_lines_to_itself_where_the_root_logger_takes_info(tmp_path):
    # Given a fresh process whose root logger prints INFO, as kfp's executor and kfp.local's runner set it
    script = tmp_path / "quiet.py"
    script.write_text(
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='LOG %(name)s %(levelname)s %(message)s')\n"
        "import pandas as pd\n"
        "from stages.validation import normalize_suite, validate_frame\n"
        "suite = normalize_suite({'name': 't', 'expectations': [\n"
        "    {'type': 'expect_column_values_to_not_be_null', 'column': 'x'}]}, source='t')\n"
        "logging.getLogger('flywheel').info('ours')\n"
        "print(validate_frame(pd.DataFrame({'x': [1.0, None]}), suite).summary())\n")
    done = subprocess.run([os.sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    # When it validates a frame, then only its own lines are printed: no GX housekeeping
    assert done.returncode == 0, done.stderr
    assert "FAILED: 0/1 expectations passed" in done.stdout
    assert "LOG flywheel INFO ours" in done.stdout, "the process's own INFO logging still prints"
    assert "great_expectations" not in done.stdout + done.stderr, (done.stdout + done.stderr)[:2000]


# ---------------------------------------------------------------------------- HTML report


def test_html_report_names_status_columns_and_sample_rows(clean, suite):
    clean.loc[3, "age"] = -5
    page = render_html(validate_frame(clean, suite, id_column="customer_id"))
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert "FAILED" in page and "expect_column_values_to_be_between" in page
    assert "<td>-5</td>" in page and clean.customer_id[3] in page
    assert page.index("class='failed'") < page.index("class='passed'"), "failures first"


def test_html_report_screenshot_is_not_blank(clean, suite, tmp_path):
    chromium = find_chromium()
    if not chromium:
        pytest.skip("chromium not installed (CI: apt-get install -y chromium); HTML screenshot not checked")
    clean.loc[[3, 7], "age"] = [-5, 240]
    clean.loc[np.random.default_rng(1).random(ROWS) < 0.06, "employment"] = None
    page = tmp_path / "report.html"
    page.write_text(render_html(validate_frame(clean, suite, id_column="customer_id", source="customers.csv")))
    png = tmp_path / "report.png"
    chromium_screenshot(chromium, page, png, tmp_path, size=(1200, 900))
    from PIL import Image

    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 20, "a rendered report has text and coloured status cells, not one flat colour"
    rgb = {c for _, c in colours}
    assert any(r > 180 and g < 80 and b < 80 for r, g, b in rgb), "the red FAILED banner is visible"
    if os.environ.get("FLYWHEEL_KEEP_SCREENSHOT"):
        shutil.copy(png, os.environ["FLYWHEEL_KEEP_SCREENSHOT"])


# ---------------------------------------------------------------------------- KFP component


def _validate_pipeline():
    from kfp import dsl

    from components.factory import component
    from components.ingest import ingest_op
    from components.validate import validate_op

    ingest, validate = component(ingest_op, ""), component(validate_op, "")

    @dsl.pipeline(name="validate-under-test")
    def pipeline(dataset_spec: dict, suite: dict):
        validate(dataset=ingest(dataset_spec=dataset_spec).outputs["dataset"], suite=suite)

    return pipeline


def test_component_passes_clean_data_with_metrics_and_lineage(run_pipeline, small_settings, suite):
    from pipelines.arguments import training_arguments as arguments

    run = run_pipeline(_validate_pipeline(), dataset_spec=arguments(small_settings)["dataset_spec"], suite=suite)
    result, report = run.artifact("validate-op", "result"), run.artifact("validate-op", "report")
    content_hash = run.artifact("ingest-op", "dataset")["metadata"]["content_hash"]
    assert result["metadata"]["dataset_content_hash"] == content_hash == report["metadata"]["dataset_content_hash"]
    assert result["metadata"]["passed"] is True
    metrics = run.artifact("validate-op", "metrics")["metadata"]
    assert metrics["expectations_evaluated"] == len(suite["expectations"]) == metrics["expectations_passed"]
    assert metrics["expectations_failed"] == 0
    assert json.loads(Path(result["uri"]).read_text())["passed"] is True
    assert "PASSED" in Path(report["uri"]).read_text()
    # a browser opens the files from the artifact store by their names: report.html, result.json
    assert report["uri"].endswith("/validate-op/report.html") and result["uri"].endswith("/validate-op/result.json")


def test_component_writes_reports_then_fails_on_blocking_expectation(kfp_local, small_settings, suite, clean, tmp_path):
    from pipelines.arguments import training_arguments as arguments

    clean.loc[[3, 7], "age"] = [-5, 240]
    source = write_table(clean, tmp_path / "customers.csv")
    spec = arguments(small_settings)["dataset_spec"] | {"source": "file", "uri": str(source)}
    with pytest.raises(RuntimeError):
        _validate_pipeline()(dataset_spec=spec, suite=suite)
    (result_path,) = kfp_local.glob("*/validate-op/result.json")
    (report_path,) = kfp_local.glob("*/validate-op/report.html")
    result = json.loads(result_path.read_text())
    assert result["passed"] is False and result["gx_result"]["success"] is False
    broken = [r for r in result["results"] if not r["success"]]
    assert [(r["type"], r["columns"], r["unexpected_count"]) for r in broken] == [
        ("expect_column_values_to_be_between", ["age"], 2)]
    assert "<td>240</td>" in report_path.read_text()
