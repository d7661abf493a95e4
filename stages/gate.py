"""The champion/challenger gate: promote the candidate or keep the champion, with the reason."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from specs import EvaluationSpec
from stages.metrics import LOWER_IS_BETTER, EvaluationResult, evaluate


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate: dict
    champion: dict | None
    shadow: bool = False  # promoted as the challenger: it shadows the champion before it answers clients

    @property
    def label(self) -> str:
        """What the pipeline branches on (dsl.If): "promote", "reject", or "challenger" (a winner
        registered under the `challenger` alias by the gate itself; nothing is deployed)."""
        if self.promote:
            return "challenger" if self.shadow else "promote"
        return "reject"

    def to_dict(self) -> dict:
        return {"decision": self.label, **asdict(self)}


_EPSILON = 1e-9  # a gain of exactly the margin is a tie, whatever the float rounding of the subtraction


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def threshold_failures(metrics: Mapping[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """Each absolute threshold the metrics miss, named with value and limit; [] when all pass."""
    failures = []
    for metric, limit in thresholds.items():
        value = metrics.get(metric)
        if not _finite(value):
            failures.append(f"{metric} is missing or not a number ({value!r})")
        elif metric in LOWER_IS_BETTER and value > limit:
            failures.append(f"{metric} {value:.4f} is above the maximum {limit:g}")
        elif metric not in LOWER_IS_BETTER and value < limit:
            failures.append(f"{metric} {value:.4f} is below the minimum {limit:g}")
    return failures


def decide(candidate: dict, champion: dict | None, thresholds: dict, margin: float, primary: str = "roc_auc",
           champion_error: str | None = None) -> Decision:
    """Promote the candidate or keep the champion; the reason names the numbers that decided.

    Order: absolute thresholds first (a candidate below them is never promoted), then the
    comparison on `primary` against the champion measured on the same test data. The candidate
    must beat the champion by more than `margin`; a tie within the margin keeps the champion.

    `champion_error` says the registry has a champion that could not be loaded or scored. Then
    the candidate is judged on the absolute thresholds alone and promoted if it passes them:
    a champion that cannot be loaded cannot be served or rolled back to either, so keeping it
    would freeze the flywheel on a broken model, while the thresholds are the floor every
    production model must clear anyway. The broken version stays in the registry under
    `previous-champion`, and the reason says what happened. (Registry outages are not this
    case: `load_champion` raises on them, and the task fails.)
    """
    if not _finite(candidate.get(primary)):
        return Decision(False, f"candidate has no {primary} to compare", candidate, champion)
    failures = threshold_failures(candidate, thresholds)
    if failures:
        return Decision(False, "candidate below absolute thresholds: " + "; ".join(failures), candidate, champion)
    value = candidate[primary]
    passed = f"candidate passes the absolute thresholds ({_describe_thresholds(candidate, thresholds)})"
    if champion_error:
        return Decision(True, f"champion unreadable ({champion_error}); judged on absolute thresholds only: "
                        f"{passed}; promoting", candidate, None)
    if champion is None:
        return Decision(True, f"no champion yet; {passed}; promoting", candidate, None)
    incumbent = champion.get(primary)
    if not _finite(incumbent):
        raise ValueError(f"champion metrics have no {primary}: {champion!r}")
    gain = (incumbent - value) if primary in LOWER_IS_BETTER else (value - incumbent)
    numbers = f"{primary} {value:.4f} vs champion {incumbent:.4f} (gain {gain:+.4f}, margin {margin:g})"
    if gain > margin + _EPSILON:
        return Decision(True, f"challenger wins: {numbers}", candidate, champion)
    if gain >= -margin - _EPSILON:
        return Decision(False, f"tie within margin, keeping the champion: {numbers}", candidate, champion)
    return Decision(False, f"champion wins: {numbers}", candidate, champion)


def _describe_thresholds(metrics: Mapping[str, float], thresholds: Mapping[str, float]) -> str:
    parts = []
    for metric, limit in thresholds.items():
        op = "<=" if metric in LOWER_IS_BETTER else ">="
        parts.append(f"{metric} {metrics[metric]:.4f} {op} {limit:g}")
    return ", ".join(parts) or "none set"


@dataclass
class GateOutcome:
    decision: Decision
    candidate: EvaluationResult
    champion: EvaluationResult | None  # the champion's scores on the same test data, if it could score
    champion_label: str = ""  # "name vN", empty without a champion
    champion_version: str = ""


def challenge(candidate_model, champion, frame, target: str, spec: EvaluationSpec) -> GateOutcome:
    """Score the candidate and the registry's champion (`stages.registry.Champion` or None) on the
    same test data and decide. A champion that cannot be loaded, or cannot score this data (e.g.
    it expects features the data lacks), is reported and judged as in `decide`."""
    threshold, slice_column = spec.decision_threshold, spec.slice_column
    candidate = evaluate(candidate_model, frame, target, threshold, slice_column)
    champion_result, champion_error = None, None
    if champion is not None and champion.readable:
        try:
            champion_result = evaluate(champion.model, frame, target, threshold, slice_column)
        except Exception as err:
            champion_error = f"{champion.label} could not score the test data: {type(err).__name__}: {str(err)[:300]}"
    elif champion is not None:
        champion_error = champion.error
    decision = decide(candidate.metrics, champion_result.metrics if champion_result else None,
                      spec.thresholds.configured(), spec.promotion_margin, champion_error=champion_error)
    decision = shadowed(decision, spec)
    return GateOutcome(decision, candidate, champion_result, champion.label if champion else "",
                       champion.version["version"] if champion else "")


def shadowed(decision: Decision, spec: EvaluationSpec) -> Decision:
    """With `evaluation.shadow` set, a candidate that beat a champion it was scored against becomes
    the challenger instead (promoted after its shadow rows agree). Without a champion to shadow
    (none yet, or one that cannot be loaded or serve) the winner is the champion at once."""
    if spec.shadow is None or not decision.promote or decision.champion is None:
        return decision
    return replace(decision, shadow=True, reason=f"{decision.reason}; evaluation.shadow is set: registered as the "
                                                 f"challenger, promoted after {spec.shadow.rows:,} shadow rows pass")
