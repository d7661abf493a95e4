"""Labels of any kind: 0/1, booleans or two strings, the positive class from config where it cannot
be inferred, the mapping saved with the model and shown in reports; bad targets stopped by
validation with the column named."""
import numpy as np
import pandas as pd
import pytest

from model.labels import LabelError, LabelMapping
from pipelines.config import load_settings
from pipelines.local_runner import execute
from stages.dataset import ReferenceTask
from stages.validation import derive_suite, validate_frame
from storage.tables import write_table


@pytest.mark.parametrize("values, negative, positive", [
    ([0, 1, 1, 0], 0, 1),
    ([1.0, 0.0, 1.0], 0, 1),  # a CSV column with a null elsewhere reads as float
    ([True, False, True], False, True),
    (["yes", "no", "no"], "no", "yes"),
    (["Y", "N"], "N", "Y"),
    (["False", "True"], "False", "True"),
])
def test_obvious_positive_classes_are_inferred(values, negative, positive):
    # Given a target whose positive class needs no config, When the mapping is inferred
    mapping = LabelMapping.infer(pd.Series(values), column="label")
    # Then it names the classes as they appear in the data, and encodes the positive one as 1
    assert (mapping.negative, mapping.positive) == (negative, positive)
    assert mapping.encode(pd.Series(values)).tolist() == [int(v == positive) for v in values]


def test_two_strings_need_the_positive_label_and_the_error_names_the_values():
    values = pd.Series(["good", "bad", "good"])
    # Given no positive_label, Then the error names the values found and the key to set
    with pytest.raises(LabelError, match=r"'bad', 'good'.*dataset.positive_label"):
        LabelMapping.infer(values, column="outcome")
    # Given positive_label 'bad', Then 'bad' is the positive class and decodes back to itself
    mapping = LabelMapping.infer(values, positive_label="bad", column="outcome")
    assert mapping.classes == ["good", "bad"]
    assert mapping.decode(mapping.encode(values)) == values.tolist()


def test_a_positive_label_that_is_not_in_the_data_is_an_error_naming_the_values():
    with pytest.raises(LabelError, match=r"positive_label 'defaulted' is not a value.*\['bad', 'good'\]"):
        LabelMapping.infer(pd.Series(["good", "bad"]), positive_label="defaulted", column="outcome")


def test_config_values_match_data_values_across_types():
    # Given config's positive_label 1 and a column read as strings "0"/"1" (and True for booleans)
    assert LabelMapping.infer(pd.Series(["0", "1"]), positive_label=1).positive == "1"
    assert LabelMapping.infer(pd.Series([False, True]), positive_label="true").positive is True


@pytest.mark.parametrize("values, message", [
    (["a", "a"], "exactly two classes, found one class"),
    (["a", "b", "c"], "exactly two classes, found 3 classes"),
    (["a", None, "b"], "1 missing values"),
])
def test_unusable_targets_are_refused_with_the_column_named(values, message):
    with pytest.raises(LabelError, match=f"'outcome'.*{message}"):
        LabelMapping.infer(pd.Series(values), column="outcome")


def test_encoding_an_unknown_value_names_it():
    mapping = LabelMapping("good", "bad")
    with pytest.raises(LabelError, match=r"1 values that are neither 'good' nor 'bad': \['ugly'\]"):
        mapping.encode(pd.Series(["good", "ugly"]), column="outcome")


@pytest.mark.parametrize("labels, failing", [
    (["no"] * 50, "expect_column_unique_value_count_to_be_between"),
    (["no", "yes", "maybe"] * 20, "expect_column_unique_value_count_to_be_between"),
    (["no", None, "yes"] * 20, "expect_column_values_to_not_be_null"),
])
def test_validation_stops_a_target_with_one_class_three_or_nulls(labels, failing):
    # Given a dataset whose label column is unusable and a suite derived from config
    settings = load_settings("local", overrides={"dataset": {"target": "outcome", "expectation_suite": None}})
    frame = ReferenceTask(rows=len(labels), seed=1).generate().drop(columns=["default"]).assign(outcome=labels)
    # When it is validated
    outcome = validate_frame(frame, derive_suite(settings.dataset))
    # Then validation fails on the label column, by name, before anything trains
    failed = [r for r in outcome.blocking_failures if "outcome" in r.columns]
    assert not outcome.passed and failing in {r.type for r in failed}


@pytest.mark.slow
def test_a_csv_with_a_text_label_trains_evaluates_and_registers_from_config_alone(tmp_path):
    # Given a CSV whose label says "bad"/"good", and config naming "bad" as the positive class
    frame = ReferenceTask(rows=3000, seed=5).generate()
    frame["outcome"] = np.where(frame.pop("default") == 1, "bad", "good")
    write_table(frame, tmp_path / "accounts.csv")
    settings = load_settings("local", overrides={
        "dataset": {"source": "file", "uri": str(tmp_path / "accounts.csv"), "target": "outcome",
                    "positive_label": "bad", "expectation_suite": None},
        "training": {"hyperparameters": {"epochs": 2}},
        "tuning": {"enabled": False},
        "evaluation": {"thresholds": {"roc_auc": 0.6}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    # When the lifecycle runs on it
    run = execute(settings, pipeline_root=tmp_path / "root")
    # Then the model carries the mapping, the reports name the classes, and the model is registered
    model = run.artifact("train-op", "model")["metadata"]
    assert model["labels"] == {"negative": "good", "positive": "bad"}
    with open(run.artifact("evaluate-op", "report")["uri"], encoding="utf-8") as handle:
        report = handle.read()
    assert "<th>good</th>" in report and "<th>bad</th>" in report
    assert run.tasks["register-op"].parameters["version"] == "1"


def test_a_mapping_that_travelled_through_kfp_metadata_keeps_int_labels():
    # Given the mapping as KFP metadata returns it (protobuf Struct: every number a double)
    mapping = LabelMapping.from_dict({"negative": 0.0, "positive": 1.0})
    # Then the labels are the ints the data held, and serving returns 0/1, not 0.0/1.0
    assert mapping.classes == [0, 1] and all(type(c) is int for c in mapping.classes)
    assert mapping.decode([1, 0]) == [1, 0]
