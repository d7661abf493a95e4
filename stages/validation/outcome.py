"""What a validation found: per expectation, its status, columns, observed values and sample rows."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

SAMPLE_ROWS = 5


class ValidationFailed(Exception):
    """Blocking expectations failed; the message names expectations, columns and sample rows."""

    def __init__(self, outcome: ValidationOutcome):
        self.outcome = outcome
        super().__init__(outcome.failure_message())


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
    detail: str = ""  # what was found, in words, where GX's own numbers say less ("12 rows (100.00%) are str")

    @property
    def status(self) -> str:
        if self.success:
            return "passed"
        return "failed" if self.severity == "blocking" else "warning"

    def describe(self) -> str:
        """`<expectation> on <columns>: expected <what>; <what was found>; e.g. row 3 (age=-5), ...`,
        or `<expectation> on <columns>: <error>` when it could not be evaluated (a missing column)."""
        cols = ", ".join(repr(c) for c in self.columns) or "table"
        text = f"{self.type} on {cols}"
        if self.error:
            return f"{text}: {self.error}"
        found = self.detail or (f"{self.unexpected_count:,} unexpected rows ({self.unexpected_percent or 0:.2f}%)"
                                if self.unexpected_count else f"observed {self.observed}" if self.observed else "")
        if found:
            text += f": expected {self.expected}; {found}"
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
