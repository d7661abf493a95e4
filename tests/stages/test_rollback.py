"""Rollback semantics in the registry (`stages.registry`): rollback walks the champion history
(`previous_champion` tags) back and never re-promotes a version tagged `rolled_back`, so rolling
back twice never flip-flops; `promote_version` rolls forward and clears the tag. Against a real
SQLite MLflow registry, versions created without artifacts (the aliases and tags are the subject)."""
import shutil

import pytest
from mlflow.tracking import MlflowClient

from stages.registry import NothingToRollBack, check_version, promote_version, roll_back, rollback_target
from stages.versions import CHAMPION, PREVIOUS_CHAMPION
from tests.support import mlflow_store

NAME = "credit-default"


@pytest.fixture(scope="module")
def _history_db(tmp_path_factory):
    """v1 -> v2 -> v3 promoted in turn, as `register_model` leaves them: v3 the champion, v2 the
    previous champion, each version tagged with the champion it replaced. Built once per module
    (creating an MLflow database runs its schema migrations, seconds); each test gets a copy."""
    folder = tmp_path_factory.mktemp("history")
    uri = mlflow_store(folder / "mlflow.db")
    client = MlflowClient(uri, uri)
    client.create_registered_model(NAME)
    for number in (1, 2, 3):
        client.create_model_version(NAME, source=str(folder / f"v{number}"))
        if number > 1:
            client.set_model_version_tag(NAME, str(number), "previous_champion", str(number - 1))
    client.set_registered_model_alias(NAME, PREVIOUS_CHAMPION, "2")
    client.set_registered_model_alias(NAME, CHAMPION, "3")
    return folder / "mlflow.db"


@pytest.fixture
def history(_history_db, tmp_path):
    """A copy of that registry for one test, which may change it."""
    shutil.copyfile(_history_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri, uri)


def state(client) -> tuple[dict, list[str]]:
    aliases = {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()}
    rolled = sorted(str(mv.version) for mv in client.search_model_versions(f"name='{NAME}'")
                    if mv.tags.get("rolled_back") == "true")
    return aliases, rolled


def back(uri: str) -> str:
    target, current = rollback_target(uri, NAME)
    roll_back(uri, NAME, target, current)
    return target


def test_rolling_back_twice_walks_further_back_then_says_there_is_nothing_older(history):
    uri, client = history
    assert back(uri) == "2"
    assert state(client) == ({CHAMPION: "2", PREVIOUS_CHAMPION: "1"}, ["3"])
    # The second rollback goes to v1, not back to v3 (which was rolled back)
    assert back(uri) == "1"
    assert state(client) == ({CHAMPION: "1"}, ["2", "3"])
    with pytest.raises(NothingToRollBack, match="nothing older to roll back to.*v1 is the champion.*--to N"):
        rollback_target(uri, NAME)
    assert state(client) == ({CHAMPION: "1"}, ["2", "3"])


def test_roll_forward_clears_the_tag_and_records_the_history(history):
    uri, client = history
    back(uri)
    back(uri)
    # When v3 is promoted again by hand
    assert promote_version(uri, NAME, "3") == "1"
    # Then it is the champion, untagged; v1 is the previous champion; v2 stays rolled back
    assert state(client) == ({CHAMPION: "3", PREVIOUS_CHAMPION: "1"}, ["2"])
    assert client.get_model_version(NAME, "3").tags["previous_champion"] == "1"
    # And a rollback from there goes to v1, skipping rolled-back v2 for the next previous champion
    assert back(uri) == "1"
    assert state(client) == ({CHAMPION: "1"}, ["2", "3"])


def test_a_rolled_back_previous_champion_is_skipped_along_the_history(history):
    uri, client = history
    client.set_model_version_tag(NAME, "2", "rolled_back", "true")
    assert rollback_target(uri, NAME) == ("1", "3")


def test_promoting_an_unknown_version_names_the_versions_there_are(history):
    uri, client = history
    with pytest.raises(ValueError, match=r"has no version '7' \(versions: 1, 2, 3\)"):
        check_version(uri, NAME, "7")
    with pytest.raises(ValueError, match="has no version"):
        promote_version(uri, NAME, "7")
    assert state(client) == ({CHAMPION: "3", PREVIOUS_CHAMPION: "2"}, [])
