"""5-field cron expressions (minute hour day-of-month month day-of-week), checked field by field
so `99 3 * * 1` fails when config loads, with an example, not when KFP refuses the schedule."""
from __future__ import annotations

import re

EXAMPLE = "'0 3 * * 1' (03:00 every Monday)"
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# (name, low, high, names for low..): the ranges of robfig/cron, which KFP's scheduler runs
# (https://pkg.go.dev/github.com/robfig/cron#hdr-CRON_Expression_Format); 7 is Sunday too.
FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
          ("month", 1, 12, MONTHS), ("day of week", 0, 7, DAYS))
_PART = re.compile(r"^(?P<range>\*|\?|[a-z0-9]+(-[a-z0-9]+)?)(/(?P<step>[0-9]+))?$")


def _value(text: str, name: str, low: int, high: int, names: list[str] | None) -> int:
    if names and text in names:
        return names.index(text) + low
    if not text.isdigit():
        raise ValueError(f"{name} {text!r} is not a number{' or a name' if names else ''}")
    number = int(text)
    if not low <= number <= high:
        raise ValueError(f"{name} {number} is out of range {low}-{high}")
    return number


def _check_field(text: str, name: str, low: int, high: int, names: list[str] | None) -> None:
    for part in text.lower().split(","):
        match = _PART.match(part)
        if not match:
            raise ValueError(f"{name} {part!r} is not a value, a range (1-5), a step (*/15) or a list (1,3)")
        if match["step"] is not None and int(match["step"]) == 0:
            raise ValueError(f"{name} step '/0' never fires")
        if match["range"] == "?" and name not in ("day of month", "day of week"):
            raise ValueError(f"{name} '?' is only allowed for day of month or day of week")
        if match["range"] not in ("*", "?"):
            bounds = [_value(v, name, low, high, names) for v in match["range"].split("-")]
            if len(bounds) == 2 and bounds[0] > bounds[1]:
                raise ValueError(f"{name} range {match['range']!r} runs backwards")


def check_cron(expression: str) -> str:
    """The expression unchanged when every field is in range; ValueError naming the field otherwise."""
    fields = expression.split()
    if len(fields) != len(FIELDS):
        raise ValueError(f"cron needs 5 fields (minute hour day-of-month month day-of-week), got {len(fields)} in "
                         f"{expression!r}; e.g. {EXAMPLE}")
    for text, (name, low, high, names) in zip(fields, FIELDS):
        try:
            _check_field(text, name, low, high, names)
        except ValueError as err:
            raise ValueError(f"cron {expression!r}: {err}; e.g. {EXAMPLE}") from None
    return expression
