"""Publishing a check's numbers to the monitor service (`POST /drift`), whence Prometheus scrapes
them as drift gauges per feature and model version."""
from __future__ import annotations

import json
import urllib.error
import urllib.request


def drift_url(sink_url: str) -> str:
    """The monitor service's /drift, from the sink URL serving sends events to (its /events)."""
    base = sink_url.rstrip("/")
    return base.removesuffix("/events") + "/drift"


def post_drift(sink_url: str, model_version: str, metrics: dict, timeout: float = 10.0) -> str:
    """POST the check's flat metrics to the monitor service; a line saying what happened (a
    monitor that is down does not fail the check)."""
    url = drift_url(sink_url)
    body = json.dumps({"model_version": str(model_version), "metrics": metrics}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read() or b"{}")
        return f"metrics: {answer.get('gauges', len(metrics))} gauges set at {url}"
    except urllib.error.HTTPError as err:
        return f"metrics: {url} answered HTTP {err.code}: {err.read()[:200].decode('utf-8', 'replace')}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"metrics: not posted to {url}: {getattr(err, 'reason', err)}"
