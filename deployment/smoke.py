"""The smoke test of a rollout: a real prediction against the new model before it takes traffic.

    SmokeTarget      what a test calls (the canary's `latest-` URL during a canary)
    http_smoke_test  POST records to {url}/v1/models/{name}:predict, want one prediction each
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class DeployError(RuntimeError):
    """The API refused a call, or a rollout could not finish (see `reason`)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class SmokeFailed(DeployError):
    """The smoke test rejected the new model."""


@dataclass(frozen=True)
class SmokeTarget:
    """What a smoke test calls: `url` is the component that takes client traffic (the
    transformer when separate), the canary's `latest-` URL during a canary."""

    url: str
    model_name: str
    model_version: str
    canary: bool
    revision: str | None = None
    predictor_url: str | None = None


SmokeTest = Callable[[SmokeTarget], Any]


def http_smoke_test(records: list[dict], *, ingress: str | None = None, timeout: float = 10.0,
                    headers: dict[str, str] | None = None) -> SmokeTest:
    """A smoke test that POSTs `records` to `{url}/v1/models/{name}:predict` and wants one
    prediction per record. With `ingress` (e.g. http://istio-ingressgateway.istio-system) the
    request goes there with the target's host in the Host header, as from outside the mesh."""

    def smoke(target: SmokeTarget) -> dict:
        parts = urlsplit(target.url)
        base = ingress.rstrip("/") if ingress else f"{parts.scheme}://{parts.netloc}"
        extra = {"Host": parts.netloc} if ingress else {}
        request = urllib.request.Request(
            f"{base}/v1/models/{target.model_name}:predict", data=json.dumps({"instances": records}).encode(),
            headers={"content-type": "application/json", **extra, **(headers or {})}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise SmokeFailed(f"POST {request.full_url} -> {err.code}: "
                              f"{err.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, OSError) as err:
            raise SmokeFailed(f"POST {request.full_url}: {err}") from None
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(records):
            raise SmokeFailed(f"expected {len(records)} predictions, got {str(answer)[:300]}")
        return answer

    return smoke
