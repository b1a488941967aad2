"""Lesson 11's checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint, and
wrong or cheating answers never get points."""

import numpy as np
import pytest
from casebook import COURSE, TINY, FrameReader, assert_grades, assert_no_points, grade, liar, registered

from helpers.checks import PASS
from helpers.estimate import Dims
from helpers.exercises.lesson11 import (
    CALC_CONTEXT,
    CALC_MODEL,
    FIXES,
    PREDICT_BATCH,
    PREDICT_NEW,
    PREDICT_PROMPT,
    _fix_plans,
)
from helpers.generation import kv_cache_bytes
from helpers.models import reference_config

pytestmark = pytest.mark.usefixtures("lenient_checks")

NAMES = ["dynamic_cache_bytes", "long_context_cache", "fix_the_server"]
QWEN = Dims.of(reference_config(CALC_MODEL))


def predicted(dims, tokens=None):
    return kv_cache_bytes(dims, PREDICT_PROMPT + PREDICT_NEW - 1 if tokens is None else tokens, PREDICT_BATCH)


def cases(dims):
    right = predicted(dims)
    per = predicted(dims, 1)
    qwen = kv_cache_bytes(QWEN, CALC_CONTEXT, 1, "bf16")
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "dynamic_cache_bytes": (right, {"dims": dims},
                                [(right + per, "never fed back"), (predicted(dims, PREDICT_PROMPT), "prompt's cache"),
                                 (right * dims.heads // dims.kv_heads, "grouped-query"), (right // 2, "factor 2"),
                                 (right // dims.layers, "every one"), (right // 2 * 1.0, "factor 2"),
                                 (right // PREDICT_BATCH, "sequences"), (right / 2**20, "MiB"), (8 * right, "bits"),
                                 (round(right, -4), "do not round"), ("16 MB", "number"), (right * 7, "positions")]),
        "long_context_cache": (
            {"bytes_per_request": qwen, "gqa_saving": 7}, {"dims": QWEN},
            [({"bytes_per_request": qwen * 7, "gqa_saving": 7}, "key-value heads"),
             ({"bytes_per_request": qwen * 2, "gqa_saving": 7}, "bytes per value"),
             ({"bytes_per_request": qwen // 2, "gqa_saving": 7}, "factor 2"),
             ({"bytes_per_request": qwen / 2**30, "gqa_saving": 7}, "GiB"),
             ({"bytes_per_request": qwen, "gqa_saving": 1 / 7}, "other way round"),
             ({"bytes_per_request": qwen, "gqa_saving": 28}, "ratio"),
             ({"bytes_per_request": qwen}, "both keys"), ([qwen, 7], "dict"),
             ({"bytes_per_request": qwen - 57_344, "gqa_saving": 7}, "every one of the context")]),
        "fix_the_server": ("sdpa", {"plans": _fix_plans()},
                           [("static_cache", "same keys"), ("quantized_cache", "do not shrink"),
                            ("one_request", "not the problem"), ("fp32", "doubles"), ("flash", "not one of"),
                            (3, "string")]),
    }


def test_every_registered_exercise_has_cases():
    assert set(cases(COURSE)) == registered("11") == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_check(name):
    right, context, wrong = cases(COURSE)[name]
    assert_grades(name, right, wrong, context)


def test_the_prediction_follows_the_shapes_it_is_given():
    """The target is computed from the trusted dims: a tiny model's right answer is wrong for the course model."""
    assert grade("dynamic_cache_bytes", predicted(TINY), {"dims": TINY}).status == PASS
    assert_no_points("dynamic_cache_bytes", [predicted(TINY)], {"dims": COURSE})
    for answer in (np.int64(predicted(COURSE)), float(predicted(COURSE))):
        assert grade("dynamic_cache_bytes", answer, {"dims": COURSE}).status == PASS


def test_the_diagnosis_has_exactly_one_right_option():
    plans = _fix_plans()
    assert [f for f in FIXES if plans["requests"][f] >= 5] == ["sdpa"]
    assert grade("fix_the_server", " SDPA ", {"plans": plans}).status == PASS


def test_lies_and_cheats_get_no_points():
    right = predicted(COURSE)
    qwen = kv_cache_bytes(QWEN, CALC_CONTEXT, 1, "bf16")
    assert_no_points("dynamic_cache_bytes", [liar(1.0, right), liar(1, right), liar(1.0, FrameReader()),
                                             right + 1, right - 1], {"dims": COURSE})
    assert_no_points("long_context_cache", [liar({"bytes_per_request": 1, "gqa_saving": 1},
                                                 {"bytes_per_request": qwen, "gqa_saving": 7}),
                                            {"bytes_per_request": liar(1.0, qwen), "gqa_saving": liar(1.0, 7.0)}],
                     {"dims": QWEN})
    assert_no_points("fix_the_server", [liar("fp32", "sdpa"), liar("x", FrameReader())], {"plans": _fix_plans()})
