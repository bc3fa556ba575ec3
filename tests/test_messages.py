"""The Flower encoding of payloads: every array of a payload in one byte buffer.

Flower moves each ``Array`` of a record as an object of its own through the
SuperLink's store; a payload's 50-300 arrays as one buffer cost one. The index that
lays the buffer out comes from the other side, so it is checked as hostile input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from radfed.shared.messages import INDEX, PACKED, from_record, roundtrip, to_record


def test_a_payload_travels_as_one_buffer_and_comes_back_equal():
    rng = np.random.default_rng(0)
    payload = {
        "hessian": rng.normal(size=(3, 4, 4)),
        "counts": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3)),
        "single": np.float32([1.5]),
        "number": np.float64(2.0),
        "zero_d": np.array(7.0),
        "name": "x",
        "names": ["a", "b"],
        "protocol": {"k": [1, 2]},
    }
    record = to_record(payload)
    assert list(record["arrays"].keys()) == [PACKED]  # one object, whatever the arrays
    back = roundtrip(payload)
    assert back.keys() == payload.keys()
    for key in ("hessian", "counts", "mask", "empty", "single"):
        assert back[key].dtype == payload[key].dtype and back[key].shape == payload[key].shape
        np.testing.assert_array_equal(back[key], payload[key])
        assert back[key].flags.writeable  # the statistics update arrays in place
    assert (back["number"], back["zero_d"], back["names"]) == (2.0, 7.0, ["a", "b"])
    assert back["protocol"] == {"k": [1, 2]}
    assert "arrays" not in to_record({"task": "hello"})["config"]  # no arrays, no index


def test_a_record_in_the_older_one_array_per_key_form_still_decodes():
    old = RecordDict(
        {
            "arrays": ArrayRecord(array_dict={"beta": Array(np.array([0.5, -1.0]))}),
            "config": ConfigRecord({"task": "logistic"}),
        }
    )
    got = from_record(old)
    assert got["task"] == "logistic"
    np.testing.assert_array_equal(got["beta"], [0.5, -1.0])


def test_unsendable_arrays_and_the_index_name_are_refused():
    with pytest.raises(TypeError, match="dtype"):
        to_record({"x": np.array(["a", "b"])})
    with pytest.raises(TypeError, match="dtype"):
        to_record({"x": np.array([object()])})
    with pytest.raises(TypeError, match="encoding's own key"):
        to_record({INDEX: "[]"})


@pytest.mark.parametrize(
    ("index", "why"),
    [
        ("not json", "not JSON"),
        ('{"a": 1}', "not a list"),
        ('[["a", "|O", [2]]]', "malformed"),  # object arrays: never unpickled
        ('[["a", ">f8", [2]]]', "malformed"),
        ('[["a", "<f8", [-2]]]', "malformed"),
        ('[["a", "<f8", [2.0]]]', "malformed"),
        ('[["a", "<f8", [1, 1, 1, 1, 1]]]', "malformed"),
        ('[["a", "<f8"]]', "malformed"),
        ('[["a", "<f8", [1]], ["a", "<f8", [1]]]', "twice"),
        ('[["a", "<f8", [3]]]', "overruns"),
        ('[["a", "<f8", [1]]]', "does not name"),
        ('[["a", "<f8", [1000000000000]]]', "overruns"),
    ],
)
def test_a_hostile_index_is_refused_in_one_line(index, why):
    record = to_record({"x": np.zeros(2)})
    record["config"][INDEX] = index
    with pytest.raises(ValueError, match=why) as caught:
        from_record(record)
    assert "\n" not in str(caught.value)


def test_an_index_without_its_buffer_is_refused():
    record = RecordDict({"config": ConfigRecord({INDEX: json.dumps([["a", "<f8", [1]]])})})
    with pytest.raises(ValueError, match="no buffer"):
        from_record(record)
    record = to_record({"x": np.zeros(2)})
    record["arrays"] = ArrayRecord(array_dict={PACKED: Array(np.zeros(2))})  # not bytes
    with pytest.raises(ValueError, match="not bytes"):
        from_record(record)
