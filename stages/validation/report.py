"""The validation report: HTML (the Kubeflow UI shows it) and JSON, written side by side."""
from __future__ import annotations

import html
import json
from pathlib import Path

from stages.validation.outcome import ValidationOutcome

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px} .meta{color:#57606a;margin-bottom:16px}
.banner{padding:12px 16px;border-radius:6px;font-weight:600;margin-bottom:16px;color:#fff}
.banner.passed{background:#1a7f37} .banner.failed{background:#cf222e}
.cards{display:flex;gap:12px;margin-bottom:20px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:110px}
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
                       + "".join("<tr>" + "".join(f"<td>{_esc(s.get(k))}</td>" for k in keys) + "</tr>"
                                 for s in r.sample_rows)
                       + "</table>")
        unexpected = ("" if r.unexpected_count is None
                      else f"{r.unexpected_count:,} ({(r.unexpected_percent or 0):.2f}%)")
        observed = _esc(r.error or r.detail or r.observed)
        rows.append(
            f"<tr class='{r.status}'><td class='status'>{r.status}</td><td>{_esc(r.severity)}</td>"
            f"<td><code>{_esc(r.type)}</code>" + (f"<div class='why'>{_esc(r.why)}</div>" if r.why else "") + "</td>"
            f"<td>{_esc(', '.join(r.columns)) or '<i>table</i>'}</td><td class='obs'>{observed}</td>"
            f"<td class='exp'><code>{_esc(r.expected)}</code></td>"
            f"<td>{unexpected}{samples}</td></tr>"
        )
    cards = "".join(f"<div class='card'>{_esc(k.replace('_', ' '))}<b>{v:,}</b></div>" if isinstance(v, int)
                    else f"<div class='card'>{_esc(k.replace('_', ' '))}<b>{v:.2f}%</b></div>" for k, v in m.items())
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Data validation: {_esc(outcome.suite_name)} - {verdict}</title><style>{_CSS}</style></head><body>"
        f"<h1>Data validation report</h1><div class='meta'>suite <b>{_esc(outcome.suite_name)}</b> &middot; "
        f"{_esc(outcome.source or 'in-memory frame')} &middot; {outcome.rows:,} rows &times; "
        f"{len(outcome.columns)} columns</div>"
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
