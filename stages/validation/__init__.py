"""The data validation gate: expectation suites as config, validated with great-expectations 1.x.

`load_suite` runs at pipeline-compile time; `validate_file`/`validate_frame` run in the validate
task (or `flywheel validate`) and return a `ValidationOutcome` that names the expectations,
columns and sample rows that broke.
"""
from stages.validation.engine import check_suite, file_problem, validate_file, validate_frame
from stages.validation.outcome import ExpectationResult, ValidationFailed, ValidationOutcome
from stages.validation.report import render_html, write_reports
from stages.validation.suite import SuiteError, derive_suite, load_suite, normalize_suite, suggest_suite

__all__ = ["ExpectationResult", "SuiteError", "ValidationFailed", "ValidationOutcome", "check_suite", "derive_suite",
           "file_problem", "load_suite", "normalize_suite", "render_html", "suggest_suite", "validate_file",
           "validate_frame", "write_reports"]
