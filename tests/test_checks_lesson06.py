"""Lesson 06's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones."""

import pytest
from casebook import COURSE, assert_grades, registered

from helpers.checks import FAIL, run_check
from helpers.exercises.lesson06 import autocast_crossover, largest_safe_scale

pytestmark = pytest.mark.usefixtures("lenient_checks")


def cases(dims):
    blocks = dims.layers * dims.block_linear_params
    copies = 2 * (blocks + dims.embedding_params)
    seq = 128 if dims == COURSE else 16
    crossover = autocast_crossover(dims, seq)
    assert crossover and crossover > 2, "pick a sequence length where small batches do not pay yet"
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "autocast_copy_bytes": (copies, {"dims": dims},
                                [(2 * blocks, "lm_head"), (2 * dims.params, "norm"), (2 * copies, "fp32"),
                                 (2 * (blocks + 2 * dims.embedding_params), "embedding lookup"),
                                 (copies / 2, "half"), (copies * 8 + 1, "linear layer"), ("lots", "number")]),
        "largest_loss_scale": (2.0 ** 14, {"largest_gradient": 3.2},
                               [(2.0 ** 16, "inf"), (14, "exponent"), (65504 / 3.2, "powers of two"),
                                (2.0 ** 13, "not the largest"), (-1, "positive"), ([2.0 ** 14], "number")]),
        "autocast_pays_from_batch": (crossover, {"dims": dims, "seq_len": seq},
                                     [(1, "not lower yet"), (crossover - 1, "not lower yet"),
                                      (crossover + 3, "smallest"), (2.5, "whole number"), ("many", "batch size")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("06")


@pytest.mark.parametrize("name", ["autocast_copy_bytes", "largest_loss_scale", "autocast_pays_from_batch"])
def test_lesson06_checks(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, **context)


def test_largest_loss_scale_is_the_power_of_two_below_the_overflow():
    for g in (3.2, 0.01, 1.0, 65504.0, 1e-3):
        s = largest_safe_scale(g)
        assert g * s <= 65504 < g * 2 * s
    assert largest_safe_scale(1.0) == 32768.0


def test_lesson06_checks_without_context_say_what_to_run():
    for name in ("autocast_copy_bytes", "largest_loss_scale", "autocast_pays_from_batch"):
        result = run_check(name, 5)
        assert result.status == FAIL and "run the cells above" in result.message
