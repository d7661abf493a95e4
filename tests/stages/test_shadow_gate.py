"""The gate with `evaluation.shadow` set: a winner against a champion becomes the `challenger`
(not the champion), promoted only after its shadow report passes (`stages.registry`,
`monitoring.shadow`). Registry cases against a real SQLite MLflow, versions without artifacts."""
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from monitoring.shadow import compare
from specs import EvaluationSpec
from specs.evaluation import ShadowSpec
from stages.gate import decide, shadowed
from stages.registry import CHALLENGER, drop_challenger, promote_challenger
from stages.versions import CHAMPION, PREVIOUS_CHAMPION
from tests.support import mlflow_store

NAME = "credit-default"
SHADOW = EvaluationSpec(shadow=ShadowSpec(rows=100, max_regression=0.01))


def test_a_winner_against_a_champion_becomes_the_challenger_only_when_shadow_is_set():
    wins = decide({"roc_auc": 0.80}, {"roc_auc": 0.75}, {"roc_auc": 0.7}, 0.002)
    assert shadowed(wins, EvaluationSpec()).label == "promote"
    challenger = shadowed(wins, SHADOW)
    assert challenger.label == "challenger" and challenger.promote and "100 shadow rows" in challenger.reason
    # nothing to shadow: the first model, or a champion that cannot be loaded, is promoted at once
    first = decide({"roc_auc": 0.80}, None, {"roc_auc": 0.7}, 0.002)
    assert shadowed(first, SHADOW).label == "promote"
    broken = decide({"roc_auc": 0.80}, None, {"roc_auc": 0.7}, 0.002, champion_error="v1 could not be loaded")
    assert shadowed(broken, SHADOW).label == "promote"
    loses = decide({"roc_auc": 0.70}, {"roc_auc": 0.75}, {"roc_auc": 0.6}, 0.002)
    assert shadowed(loses, SHADOW).label == "reject"


@pytest.fixture
def registry(tmp_path):
    """v1 the champion, v2 registered by a shadowing gate: the `challenger`."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, uri)
    client.create_registered_model(NAME)
    for number in (1, 2):
        client.create_model_version(NAME, source=str(tmp_path / f"v{number}"))
    client.set_registered_model_alias(NAME, CHAMPION, "1")
    client.set_registered_model_alias(NAME, CHALLENGER, "2")
    return uri, client


def aliases(client) -> dict:
    return {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()}


def test_promoting_the_challenger_moves_the_champion_and_drops_the_alias(registry):
    uri, client = registry
    assert promote_challenger(uri, NAME) == ("2", "1")
    assert aliases(client) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    assert client.get_model_version(NAME, "2").tags["previous_champion"] == "1"
    with pytest.raises(LookupError, match="no challenger"):
        promote_challenger(uri, NAME)


def test_a_refused_challenger_leaves_the_champion_alone(registry):
    uri, client = registry
    assert drop_challenger(uri, NAME) == "2"
    assert aliases(client) == {CHAMPION: "1"}


def _rows(version: str, scores, truth=None, suffix: str = "") -> pd.DataFrame:
    n = len(scores)
    return pd.DataFrame({"request_id": [f"r{i // 10}{suffix}" for i in range(n)],
                         "instance": [i % 10 for i in range(n)],
                         "model_version": version, "probability": scores,
                         "prediction": ["1" if s >= 0.5 else "0" for s in scores],
                         "truth": truth if truth is not None else [None] * n})


def test_the_report_measures_a_planted_disagreement_and_the_auc_regression():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 400)
    good = np.clip(truth * 0.6 + rng.uniform(0, 0.4, 400), 0, 1)  # separates the classes perfectly
    champion = _rows("1", good, [str(t) for t in truth])
    # the challenger flips its decision on exactly the first 100 rows: agreement 75%, and it ranks them wrongly
    flipped = good.copy()
    flipped[:100] = 1.0 - flipped[:100]
    shadow = _rows("2-shadow", flipped, suffix="-shadow")
    report = compare(champion, shadow, "1", "2", ShadowSpec(rows=400, max_regression=0.01))
    assert report.rows == 400 and report.agreement == pytest.approx(0.75)
    assert report.truth_rows == 400 and report.champion_auc == pytest.approx(1.0)
    assert report.challenger_auc < 0.9 and not report.passed
    assert report.verdict == "HOLD" and "drop" in report.reasons[0]
    assert report.score_psi is not None and report.score_ks > 0
    # the same challenger answering like the champion passes, and agreement is then 100%
    same = compare(champion, _rows("2-shadow", good, suffix="-shadow"), "1", "2", ShadowSpec(rows=400))
    assert same.passed and same.agreement == 1.0 and same.score_psi == pytest.approx(0.0, abs=1e-9)


def test_promotion_waits_for_enough_shadow_rows_and_checks_agreement_when_asked():
    scores = np.linspace(0.05, 0.95, 200)
    champion, shadow = _rows("1", scores), _rows("2-shadow", scores[::-1].copy(), suffix="-shadow")
    few = compare(champion.head(50), shadow, "1", "2", ShadowSpec(rows=100))
    assert few.rows == 50 and not few.passed and "only 50 of the 100" in few.reasons[0]
    enough = compare(champion, shadow, "1", "2", ShadowSpec(rows=100))
    assert enough.passed and "no live AUC" in enough.reasons[-1]  # no labels: judged on rows
    strict = compare(champion, shadow, "1", "2", ShadowSpec(rows=100, min_agreement=0.9))
    assert not strict.passed and "agreement" in strict.reasons[0]
