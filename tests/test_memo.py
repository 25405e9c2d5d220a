"""policies/memo.py: values kept on disk come back as they were, in their own dtypes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from finemoe.policies.memo import ContentMemo, narrowed, stored_in, widened

_DTYPES = st.sampled_from([np.int64, np.int32, np.uint16, np.float64, np.float32, np.bool_])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "rows", "__x"]),
                       _DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=2, min_side=0)))))
def test_narrowed_then_widened_is_the_same_arrays(arrays):
    back = widened(dict(narrowed(arrays)))
    assert back.keys() == arrays.keys()
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        assert np.array_equal(back[name], a, equal_nan=a.dtype.kind == "f")


def test_narrowed_by_hand():
    small = narrowed({"ids": np.array([0, 7, 31], np.int64), "neg": np.array([-1, 300]),
                      "p": np.array([0.5, 0.25]), "q": np.array([0.1]), "flag": np.array(True)})
    assert small["ids"].dtype == np.int8 and small["neg"].dtype == np.int16
    assert small["p"].dtype == np.float32 and small["q"].dtype == np.float64  # 0.1 is no float32
    assert small["flag"].dtype == np.bool_


def test_a_value_kept_on_disk_comes_back_in_its_own_dtypes(tmp_path):
    value = {"steps": np.arange(5, dtype=np.int64), "p": np.array([0.5, np.nan, -0.0])}
    memo = ContentMemo(2, "t", dict, dict)
    with stored_in(tmp_path):
        memo.get("k", lambda: value)
        again = ContentMemo(2, "t", dict, dict).get("k", lambda: {"steps": np.zeros(1)})
    assert again["steps"].dtype == np.int64 and np.array_equal(again["steps"], value["steps"])
    assert again["p"].dtype == np.float64 and np.array_equal(again["p"], value["p"], equal_nan=True)
    assert np.signbit(again["p"][2])


def test_the_widest_integers_are_kept_as_they_are():
    a = np.array([-1, 2**63 - 1], np.int64)  # no narrower type holds both (and no float may stand in)
    assert narrowed({"a": a})["a"].dtype == np.int64
    assert np.array_equal(widened(narrowed({"a": a}))["a"], a)
