"""Serving's request codec without servers: raw records and v2 column tensors become exactly the
tensors training's Preprocessor makes, every bad input is one RequestError naming its field, the
response carries the original labels; and the pieces around it (error bodies, payload events,
the transformer staying torch-free)."""
import asyncio
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from model.labels import LabelMapping
from model.preprocessing import Preprocessor
from serving.errors import RequestError, from_body
from serving.middleware import normalise, validation_field
from serving.transform import FeatureCodec, Tensor
from stages.dataset import REFERENCE_CATEGORICAL, ReferenceTask

NUMERIC = ["age", "income", "credit_limit", "utilization", "debt_to_income", "late_payments", "months_on_book"]
COLUMNS = NUMERIC + REFERENCE_CATEGORICAL


@pytest.fixture(scope="module")
def frame():
    return ReferenceTask(rows=400, seed=11).generate()


@pytest.fixture(scope="module")
def codec(frame):
    pre = Preprocessor.fit(frame, NUMERIC, REFERENCE_CATEGORICAL)
    return FeatureCodec(pre, LabelMapping("no", "yes"), max_batch_rows=50, decision_threshold=0.3)


def records(frame, n=3) -> list[dict]:
    """Rows as a JSON client sends them (NaN as null)."""
    rows = frame[COLUMNS].head(n).astype(object).where(frame[COLUMNS].head(n).notna(), None)
    return json.loads(json.dumps(rows.to_dict("records")))


def tensors(rows: list[dict]) -> list[Tensor]:
    return [Tensor(c, "FP64" if c in NUMERIC else "BYTES", [len(rows)], [r[c] for r in rows]) for c in COLUMNS]


def test_the_nullable_columns_are_those_with_missing_training_values(frame, codec):
    # Given the reference data (income and employment are self-reported, so sometimes missing)
    assert codec.preprocessor.nullable == ["income", "employment"]
    # And a preprocessor saved before `nullable` was recorded reads back as "unknown"
    old = json.loads(codec.preprocessor.to_json())
    del old["nullable"]
    assert Preprocessor.from_json(json.dumps(old)).nullable is None


def test_v1_and_v2_encode_exactly_what_the_training_preprocessor_makes(frame, codec):
    # Given rows with a missing income and an unseen category
    rows = records(frame, 5)
    rows[1]["income"], rows[2]["housing"] = None, "castle"
    expected = codec.preprocessor.transform(pd.DataFrame(rows))
    # When they come as v1 records and as v2 column tensors
    for features in (codec.from_v1({"instances": rows}), codec.from_v2(tensors(rows))):
        # Then both are the Preprocessor's tensors for the same frame, bit for bit
        assert features.numeric.dtype == np.float32 and features.categorical.dtype == np.int64
        np.testing.assert_array_equal(features.numeric, expected[0])
        np.testing.assert_array_equal(features.categorical, expected[1])


def test_the_preprocessor_takes_columns_as_well_as_a_frame(frame, codec):
    # Given a batch with nulls and int-coded categories, as a DataFrame and as plain columns
    part = frame[COLUMNS].head(20)
    columns = {c: part[c].astype(object).where(part[c].notna(), None).tolist() for c in COLUMNS}
    # Then the one transform gives the same tensors for both
    for a, b in zip(codec.preprocessor.transform(part), codec.preprocessor.transform(columns)):
        np.testing.assert_array_equal(a, b)


def test_categories_may_be_strings_or_integer_codes():
    # Given a model trained on int-coded categories
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0], "code": [3, 1, 2]})
    codec = FeatureCodec(Preprocessor.fit(train, ["x"], ["code"]), LabelMapping(0, 1))
    # Then int codes and their text find the same vocabulary entries
    by_int = codec.from_v1({"instances": [{"x": 1.0, "code": 3}]}).categorical
    by_text = codec.from_v1({"instances": [{"x": 1.0, "code": "3"}]}).categorical
    assert by_int.tolist() == by_text.tolist() == [[3]]


V1_CASES = [
    # (what, change to the first row or the body, status, field)
    ("not an object", lambda rows: rows, 400, None),
    ("no instances", lambda rows: {"rows": rows}, 400, "instances"),
    ("instances not a list", lambda rows: {"instances": rows[0]}, 400, "instances"),
    ("a row not an object", lambda rows: {"instances": [list(rows[0].values())]}, 400, "instances[0]"),
    ("missing column", lambda rows: {"instances": [{k: v for k, v in rows[0].items() if k != "age"}]}, 422,
     "instances[0].age"),
    ("unknown column", lambda rows: {"instances": [{**rows[0], "shoe_size": 44}]}, 422, "instances[0].shoe_size"),
    ("string in a numeric column", lambda rows: {"instances": [{**rows[0], "age": "42"}]}, 422, "instances[0].age"),
    ("'NaN' string", lambda rows: {"instances": [rows[0], {**rows[1], "utilization": "NaN"}]}, 422,
     "instances[1].utilization"),
    ("'inf' string", lambda rows: {"instances": [{**rows[0], "credit_limit": "inf"}]}, 422,
     "instances[0].credit_limit"),
    ("NaN float", lambda rows: {"instances": [{**rows[0], "income": math.nan}]}, 422, "instances[0].income"),
    ("infinite float", lambda rows: {"instances": [{**rows[0], "income": -math.inf}]}, 422, "instances[0].income"),
    ("bool in a numeric column", lambda rows: {"instances": [{**rows[0], "age": True}]}, 422, "instances[0].age"),
    ("null where training had none", lambda rows: {"instances": [{**rows[0], "age": None}]}, 422,
     "instances[0].age"),
    ("float category", lambda rows: {"instances": [{**rows[0], "housing": 1.5}]}, 422, "instances[0].housing"),
    ("null category where training had none", lambda rows: {"instances": [{**rows[0], "region": None}]}, 422,
     "instances[0].region"),
    ("empty batch", lambda rows: {"instances": []}, 422, "instances"),
    ("too many rows", lambda rows: {"instances": rows[:1] * 51}, 413, "instances"),
]


@pytest.mark.parametrize("what, change, status, field", V1_CASES, ids=[c[0] for c in V1_CASES])
def test_bad_v1_requests_name_their_status_and_field(frame, codec, what, change, status, field):
    with pytest.raises(RequestError) as caught:
        codec.from_v1(change(records(frame)))
    assert (caught.value.status, caught.value.field) == (status, field), caught.value.message


def test_nulls_are_accepted_where_training_had_missing_values(frame, codec):
    rows = records(frame, 1)
    features = codec.from_v1({"instances": [{**rows[0], "income": None, "employment": None}]})
    income = 2 * NUMERIC.index("income")
    assert features.numeric[0, income + 1] == 1.0  # the missing-indicator the model learnt
    assert features.categorical[0, REFERENCE_CATEGORICAL.index("employment")] == 0  # the unknown bucket


def _set(k, **fields):
    def change(ts):
        ts[k] = Tensor(**{**ts[k].__dict__, **fields})
        return ts
    return change


V2_CASES = [
    ("data shorter than shape", _set(2, data=[1.0]), 400, "inputs[2].data"),
    ("shape not sizes", _set(0, shape=["3"]), 400, "inputs[0].shape"),
    ("matrix shape", _set(0, shape=[3, 2], data=[1.0] * 6), 422, "inputs[0].shape"),
    ("unknown column", _set(9, name="planet"), 422, "inputs[9].name"),
    ("BYTES for a numeric column", _set(1, datatype="BYTES"), 422, "inputs[1].datatype"),
    ("NaN value", _set(3, data=[0.1, math.nan, 0.2]), 422, "inputs[3].data[1]"),
    ("'inf' string", _set(3, data=[0.1, 0.2, "inf"]), 422, "inputs[3].data[2]"),
    ("null where training had none", _set(0, data=[30, None, 40]), 422, "inputs[0].data[1]"),
    ("rows differ between columns", _set(4, shape=[2], data=[0.1, 0.2]), 422, "inputs[4].shape"),
    ("float category", _set(8, data=["own", 2.5, "rent"]), 422, "inputs[8].data[1]"),
]


@pytest.mark.parametrize("what, change, status, field", V2_CASES, ids=[c[0] for c in V2_CASES])
def test_bad_v2_requests_name_their_status_and_field(frame, codec, what, change, status, field):
    with pytest.raises(RequestError) as caught:
        codec.from_v2(change(tensors(records(frame))))
    assert (caught.value.status, caught.value.field) == (status, field), caught.value.message


def test_v2_batch_limits_and_missing_columns(frame, codec):
    rows = records(frame)
    with pytest.raises(RequestError) as caught:
        codec.from_v2(tensors(rows)[:-1])
    assert (caught.value.status, caught.value.field) == (422, "inputs") and "region" in caught.value.message
    with pytest.raises(RequestError) as caught:
        codec.from_v2([Tensor(t.name, t.datatype, [0], []) for t in tensors(rows)])
    assert caught.value.status == 422
    with pytest.raises(RequestError) as caught:
        codec.from_v2(tensors(rows[:1] * 51))
    assert caught.value.status == 413


def test_responses_carry_original_labels_probabilities_and_version(codec):
    # Given probabilities around the model's decision threshold (0.3)
    probabilities = np.array([0.1, 0.3, 0.9], dtype=np.float32)
    # Then v1 labels them with the original values and keeps the probabilities and the version
    body = codec.to_v1(probabilities, "credit", "7")
    assert body["predictions"] == ["no", "yes", "yes"] and body["model_version"] == "7"
    assert body["probabilities"] == pytest.approx([0.1, 0.3, 0.9])
    # And v2 answers a label tensor of the label's type beside the probabilities
    label, probability = codec.to_v2(probabilities)
    assert (label.name, label.datatype, label.data) == ("label", "BYTES", ["no", "yes", "yes"])
    assert (probability.name, probability.datatype, probability.shape) == ("probability", "FP32", [3])


def test_every_error_renders_to_one_body():
    error = RequestError(422, "inputs[2].data[5]", "must be a number")
    assert error.body() == {"error": {"status": 422, "field": "inputs[2].data[5]", "message": "must be a number"}}
    # And it reads back (the transformer reading its predictor), as do stock KServe bodies
    assert repr(from_body(error.json(), 400)) == repr(error)
    assert (from_body(b'{"error": "Model not ready"}', 503).status, from_body(b"oops", 502).message) == (503, "oops")
    # And KServe's and FastAPI's own error bodies are rewritten into it
    assert normalise(404, b'{"error": "Model with name x does not exist."}')["error"]["message"].startswith("Model")
    assert normalise(400, b'{"detail": "There was an error parsing the body"}')["error"]["status"] == 400
    assert validation_field(("body", "InferenceRequest", "inputs", 0, "shape")) == "inputs[0].shape"


@pytest.mark.parametrize("version, ids", [("3", ["req-1", "req-1"]), ("3-shadow", ["req-1-shadow", "req-1-shadow"])])
def test_a_challengers_payload_events_never_share_the_champions_ids(version, ids):
    """A mesh mirror copies the client's x-request-id to the challenger, and the sink pairs halves by
    ce-id: the challenger (serving a shadow version) suffixes its events' ids, the champion does not."""
    import argparse

    from serving.records import payload_middleware
    from specs.serving import PayloadLogging, ServingSpec

    spec = ServingSpec(payload_logging=PayloadLogging(url="http://127.0.0.1:9/events"))
    args = argparse.Namespace(model_name="credit", model_version=version, payload_queue_size=10)
    ((_, options),) = payload_middleware(spec, args, "predictor")
    logger, sent = options["logger"], []
    logger.put = sent.append
    logger.call("req-1", "http://x/v1/models/credit:predict", b"{}", 200, b"{}")
    logger.call("req-2-shadow", "http://x/v1/models/credit:predict", b"{}", 200, b"{}")  # a local mirror's copy
    assert [event.id for event in sent[:2]] == ids
    assert [event.id for event in sent[2:]] == ["req-2-shadow"] * 2, "suffixed once"


def test_payload_events_never_wait_and_are_dropped_when_the_queue_is_full():
    from serving.payload import REQUEST_TYPE, Event, PayloadLogger
    from serving.server_metrics import PAYLOAD_EVENTS

    async def flood():
        # Given a logger whose sink never answers and a queue of two events
        logger = PayloadLogger("http://127.0.0.1:9/", queue_size=2, model_name="credit")
        before = PAYLOAD_EVENTS.labels(outcome="dropped")._value.get()
        # When five events arrive before the background task runs
        for i in range(5):
            logger.put(Event(REQUEST_TYPE, f"id-{i}", "http://x/v1/models/credit:predict", b"{}"))
        dropped = PAYLOAD_EVENTS.labels(outcome="dropped")._value.get() - before
        headers = logger.headers(Event(REQUEST_TYPE, "id-0", "src", b"{}"))
        await logger.close()
        return dropped, headers

    dropped, headers = asyncio.run(flood())
    # Then three are dropped and counted, none waited
    assert dropped == 3
    assert headers["ce-specversion"] == "1.0" and headers["ce-type"] == REQUEST_TYPE and headers["ce-id"] == "id-0"
    assert headers["ce-inferenceservicename"] == "credit" and headers["ce-time"].endswith("Z")


def test_the_transformer_process_never_imports_torch():
    # The transformer image carries no torch: importing its module (and what it imports) must not
    # pull it in; the predictor's does.
    probe = ("import sys, serving.transformer, serving.payload, serving.hop; "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


class FakeHop:
    """A predictor connection that answers readiness and metadata as told."""

    def __init__(self, ready=True, inputs=None):
        self.is_ready, self.inputs, self.probes = ready, inputs, 0

    async def ready(self):
        self.probes += 1
        return self.is_ready

    async def metadata(self):
        return {"inputs": self.inputs}


def test_readiness_needs_a_ready_predictor_that_declares_our_tensors(codec):
    from serving.contract import input_types
    from serving.readiness import PredictorReadiness

    ours = input_types(codec.preprocessor)
    other = [{**ours[0], "shape": [-1, ours[0]["shape"][1] + 2]}, ours[1]]  # another model's width

    async def check(hop):
        readiness = PredictorReadiness(hop, ours, ttl=60)
        first = await readiness.check()
        again = await readiness.check()  # cached: no second probe
        readiness.lost()  # the hop found the predictor unreachable
        return first, again, hop.probes, await readiness.check(), hop.probes

    assert asyncio.run(check(FakeHop(True, ours))) == (True, True, 1, True, 2)
    assert asyncio.run(check(FakeHop(True, other)))[0] is False  # ready, but a different contract
    assert asyncio.run(check(FakeHop(False, ours)))[0] is False


# ---- the request contract: id column, categoricals as strings, request id, gzip -------------------

@pytest.fixture(scope="module")
def id_codec(frame):
    pre = Preprocessor.fit(frame, NUMERIC, REFERENCE_CATEGORICAL)
    return FeatureCodec(pre, LabelMapping("no", "yes"), max_batch_rows=50, id_column="customer_id")


def test_the_id_column_is_carried_beside_the_features_not_in_them(frame, id_codec):
    # Given rows that keep their join key, as v1 records and as v2 tensors
    rows = records(frame, 3)
    ids = ["C1", 2, "C3"]
    keyed = [{"customer_id": i, **row} for i, row in zip(ids, rows)]
    v2 = [Tensor("customer_id", "BYTES", [3], ids), *tensors(rows)]
    plain = id_codec.from_v1({"instances": rows})
    for features in (id_codec.from_v1({"instances": keyed}), id_codec.from_v2(v2)):
        # Then the model's tensors are those of the rows without it, and the ids ride along
        np.testing.assert_array_equal(features.numeric, plain.numeric)
        np.testing.assert_array_equal(features.categorical, plain.categorical)
        assert features.ids == ids and plain.ids is None
    # And the responses echo them row for row: v1 a list named after the column, v2 a tensor
    probabilities = np.array([0.1, 0.6, 0.9], dtype=np.float32)
    assert id_codec.to_v1(probabilities, "credit", "1", ids)["customer_id"] == ids
    assert "customer_id" not in id_codec.to_v1(probabilities, "credit", "1")
    echoed = id_codec.to_v2(probabilities, ids)[-1]
    assert (echoed.name, echoed.datatype, echoed.data) == ("customer_id", "BYTES", ["C1", "2", "C3"])
    echoed = id_codec.to_v2(probabilities, [7, 8, 9])[-1]
    assert (echoed.datatype, echoed.data.tolist()) == ("INT64", [7, 8, 9])


def test_a_codec_without_an_id_column_still_refuses_it(frame, codec):
    rows = records(frame, 1)
    with pytest.raises(RequestError) as caught:
        codec.from_v1({"instances": [{**rows[0], "customer_id": "C1"}]})
    assert (caught.value.status, caught.value.field) == (422, "instances[0].customer_id")


def test_an_id_column_that_is_a_feature_or_a_response_name_is_refused(frame):
    pre = Preprocessor.fit(frame, NUMERIC, REFERENCE_CATEGORICAL)
    for name in ("age", "predictions", "probability"):
        with pytest.raises(ValueError, match=name):
            FeatureCodec(pre, LabelMapping("no", "yes"), id_column=name)


ID_CASES = [
    ("only some rows", lambda rows: [{"customer_id": "C1", **rows[0]}, rows[1]], "instances[1].customer_id"),
    ("a later row only", lambda rows: [rows[0], {"customer_id": "C1", **rows[1]}], "instances[1].customer_id"),
    ("a float id", lambda rows: [{"customer_id": 1.5, **rows[0]}], "instances[0].customer_id"),
    ("a null id", lambda rows: [{"customer_id": None, **rows[0]}], "instances[0].customer_id"),
    ("an id past int64", lambda rows: [{"customer_id": 1 << 64, **rows[0]}], "instances[0].customer_id"),
]


@pytest.mark.parametrize("what, change, field", ID_CASES, ids=[c[0] for c in ID_CASES])
def test_bad_ids_name_their_field(frame, id_codec, what, change, field):
    with pytest.raises(RequestError) as caught:
        id_codec.from_v1({"instances": change(records(frame, 2))})
    assert (caught.value.status, caught.value.field) == (422, field), caught.value.message


def test_a_number_in_a_text_categorical_column_is_refused_in_v1_and_v2(frame, codec):
    rows = records(frame, 3)
    k = COLUMNS.index("housing")
    # v1: the number 3 would otherwise score as an unseen housing
    with pytest.raises(RequestError) as caught:
        codec.from_v1({"instances": [{**rows[0], "housing": 3}]})
    assert (caught.value.status, caught.value.field) == (422, "instances[0].housing")
    assert '"3"' in caught.value.message  # the message says how to send it
    # v2: a number inside a BYTES tensor, or an integer tensor for a text column
    with pytest.raises(RequestError) as caught:
        codec.from_v2(_set(k, data=["own", 3, "rent"])(tensors(rows)))
    assert (caught.value.status, caught.value.field) == (422, f"inputs[{k}].data[1]")
    with pytest.raises(RequestError) as caught:
        codec.from_v2(_set(k, datatype="INT64", data=[1, 2, 3])(tensors(rows)))
    assert (caught.value.status, caught.value.field) == (422, f"inputs[{k}].datatype")


def test_int_coded_categories_take_integers_in_v1_and_v2():
    # Given a model trained on int-coded categories (the vocabulary keys are "1", "2", "3")
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0], "code": [3, 1, 2]})
    codec = FeatureCodec(Preprocessor.fit(train, ["x"], ["code"]), LabelMapping(0, 1))
    # Then an INT64 tensor and a BYTES tensor of the same codes encode alike
    as_ints = codec.from_v2([Tensor("x", "FP64", [2], [1.0, 2.0]), Tensor("code", "INT64", [2], np.array([3, 9]))])
    as_text = codec.from_v2([Tensor("x", "FP64", [2], [1.0, 2.0]), Tensor("code", "BYTES", [2], ["3", "9"])])
    assert as_ints.categorical.tolist() == as_text.categorical.tolist() == [[3], [0]]  # 9: unseen, unknown bucket
    # But a float code stays a 422, as before
    with pytest.raises(RequestError):
        codec.from_v1({"instances": [{"x": 1.0, "code": 3.0}]})


def test_the_v2_response_carries_the_requests_own_id():
    from kserve import InferInput, InferRequest

    from serving.tensors import response

    tensor = InferInput("x", [1], "FP64")
    tensor.set_data_from_numpy(np.array([1.0]), binary_data=False)
    outputs = [Tensor("probability", "FP32", [1], np.array([0.5], dtype=np.float32))]
    # The request's id wins over the tracing id (Open Inference Protocol: "must be returned")
    assert response(InferRequest("m", [tensor], request_id="oip-1"), "m", "1", "trace", outputs).id == "oip-1"
    # And a request without one gets the id it travelled by
    assert response(InferRequest("m", [tensor]), "m", "1", "trace", outputs).id == "trace"


def test_gzip_bodies_are_decompressed_up_to_the_limit_only():
    import gzip

    from serving.middleware import gunzip

    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), 4) == b"abcd"  # members concatenated
    cases = [(gzip.compress(b"x" * 10_000), 100, 413), (gzip.compress(b"x" * 100)[:-9], 1000, 400),
             (b'{"instances": []}', 1000, 400)]
    for data, limit, status in cases:
        with pytest.raises(RequestError) as caught:
            gunzip(data, limit)
        assert caught.value.status == status, caught.value.message


def test_the_id_column_comes_from_the_models_metadata_unless_given(frame, tmp_path):
    from model.artifact import METADATA_FILE, PREPROCESSOR_FILE

    pre = Preprocessor.fit(frame, NUMERIC, REFERENCE_CATEGORICAL)
    (tmp_path / PREPROCESSOR_FILE).write_text(pre.to_json())
    (tmp_path / METADATA_FILE).write_text(json.dumps({"labels": LabelMapping("no", "yes").to_dict(),
                                                      "id_column": "customer_id"}))
    assert FeatureCodec.from_model_dir(str(tmp_path)).id_column == "customer_id"
    assert FeatureCodec.from_model_dir(str(tmp_path), id_column="account").id_column == "account"
