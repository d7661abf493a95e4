"""The alert rules: the PrometheusRule template (`fleet/data/prometheus-rules.yaml`, which
fleet/observability.py scopes to each env's namespace) is the source, and the plain Prometheus
rules file in `manifests/monitoring/` (for `rule_files:` without the operator, and for `promtool`) is
rendered from it.

    python -m pipelines.alerts --write     regenerate prometheus-rules.plain.yaml
    python -m pipelines.alerts             exit 1 when it is out of date
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

MONITORING_DIR = Path(__file__).resolve().parent.parent / "manifests" / "monitoring"
RULES = Path(__file__).resolve().parent.parent / "fleet" / "data" / "prometheus-rules.yaml"
PLAIN_RULES = MONITORING_DIR / "prometheus-rules.plain.yaml"
HEADER = ("# GENERATED from fleet/data/prometheus-rules.yaml (the PrometheusRule template) by\n"
          "# `python -m pipelines.alerts --write`. Do not edit: change the template and regenerate\n"
          "# (tests/pipelines/test_alerts.py fails when they disagree).\n")


class _Literal(str):
    """A multi-line expression, written as a YAML block scalar."""


def _literal(dumper, value):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def rule_groups(path: Path = RULES) -> list[dict]:
    """The `spec.groups` of the PrometheusRule at PATH."""
    doc = yaml.safe_load(Path(path).read_text())
    if doc.get("kind") != "PrometheusRule" or "groups" not in (doc.get("spec") or {}):
        raise ValueError(f"{path}: not a PrometheusRule with spec.groups")
    return doc["spec"]["groups"]


def plain_rules(path: Path = RULES) -> str:
    """The plain Prometheus rules file (`groups:` at the top) with the same groups."""
    groups = rule_groups(path)
    for group in groups:
        for rule in group["rules"]:
            if "\n" in rule["expr"]:
                rule["expr"] = _Literal(rule["expr"])
    return HEADER + yaml.dump({"groups": groups}, Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"regenerate {PLAIN_RULES.name}")
    args = parser.parse_args(argv)
    text = plain_rules()
    if args.write:
        PLAIN_RULES.write_text(text)
        print(f"wrote {PLAIN_RULES}")
        return 0
    current = PLAIN_RULES.read_text() if PLAIN_RULES.exists() else ""
    if current != text:
        print(f"{PLAIN_RULES} is out of date: python -m pipelines.alerts --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
