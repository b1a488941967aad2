"""Lesson 03's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones."""

import math

import pytest
import torch
from casebook import assert_grades, registered
from torch.utils.checkpoint import checkpoint

from helpers.checks import FAIL, PASS, SKIP, run_check
from helpers.estimate import Recipe, block_activation_bytes, predict
from helpers.exercises.lesson03 import toy_stack

pytestmark = pytest.mark.usefixtures("lenient_checks")



TOY = {"n_blocks": 16, "width": 32, "tokens": 256, "fraction": 0.47}


def segments(k, reentrant=False):
    """forward(stack, x) checkpointing segments of k blocks."""
    def forward(stack, x):
        blocks = list(stack)
        for start in range(0, len(blocks), k):
            x = checkpoint(torch.nn.Sequential(*blocks[start:start + k]), x, use_reentrant=reentrant)
        return x
    return forward


def skip_last_block(stack, x):
    return torch.nn.Sequential(*list(stack)[:-1])(x)


def cases(dims):
    tokens = 8 * 128
    without = dims.layers * block_activation_bytes(dims, tokens)
    with_ = dims.layers * tokens * dims.hidden * 4
    peak = predict(dims, Recipe(batch_size=8, seq_len=128, gradient_checkpointing=True)).peak
    plain_peak = predict(dims, Recipe(batch_size=8, seq_len=128)).peak
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "block_activations": ((without, with_), {"dims": dims},
                              [((without / dims.layers, with_), "one block"),
                               ((without / 4, with_), "elements"),
                               ((without, with_ / 4), "elements"),
                               ((without, without), "without checkpointing again"),
                               ((without, with_ + without / dims.layers), "recomputed"),
                               ((without, with_ / dims.layers), "one block's input"),
                               ((without / 2**20, with_ / 2**20), "MiB"),
                               (without, "two numbers")]),
        "checkpointed_peak": (peak, {"dims": dims},
                              [(plain_peak, "without checkpointing"), (peak / 2**20, "MiB"),
                               ("a lot", "number")]),
        "toy_under_target": (segments(round(math.sqrt(TOY["n_blocks"]))), TOY,
                             [(segments(1), "no saving"), (segments(TOY["n_blocks"] // 2), "above the"),
                              (segments(2), "above the"),
                              (segments(4, reentrant=True), "use_reentrant=False"),
                              (skip_last_block, "every block"), ("checkpoint", "function")]),
        "time_cost": ("b", {}, [("a", "optimizer"), ("c", "compressed"), ("d", "backward runs once"),
                                ("e", "one of the letters"), (2, "string")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("03")


@pytest.mark.parametrize("name", ["block_activations", "checkpointed_peak", "toy_under_target", "time_cost"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, **context)


def test_checkpointed_peak_hints_at_the_moments(dims):
    """The start of backward and the model state alone are the two plausible partial answers."""
    from helpers.exercises.lesson03 import _backward_start

    recipe = Recipe(batch_size=8, seq_len=128, gradient_checkpointing=True)
    start = _backward_start(dims, recipe)
    peak = predict(dims, recipe)
    if not math.isclose(start, peak.peak, rel_tol=0.02):  # on the course shapes the two moments differ
        message = run_check("checkpointed_peak", start, dims=dims).message
        assert "start of backward" in message
    state = peak.weights + peak.optimizer + 4 * dims.params
    message = run_check("checkpointed_peak", state, dims=dims).message
    assert "tied embedding" in message


def test_toy_check_follows_the_fraction():
    strict = {**TOY, "fraction": 0.2}
    result = run_check("toy_under_target", segments(4), **strict)
    assert result.status == FAIL and "above the 20% target" in result.message


def test_context_missing_says_what_to_pass():
    assert "dims=dims" in run_check("block_activations", (1, 2)).message
    assert "dims=dims" in run_check("checkpointed_peak", 3).message


def test_answers_in_other_forms(dims):
    assert run_check("time_cost", " (B) ").status == PASS
    assert run_check("block_activations", (1e9, None), dims=dims).status == SKIP


def test_toy_stack_shape():
    stack = toy_stack(3, 8)
    assert len(stack) == 3 and stack[0][0].in_features == 8
    assert torch.equal(toy_stack(3, 8)[0][0].weight, stack[0][0].weight)  # seeded
