"""Lesson 08's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones."""

import pytest
from casebook import assert_grades, registered

from helpers.checks import FAIL, PASS, run_check
from helpers.estimate import Recipe, optimizer_state_bytes, predict, trainable_params, trainable_tensor_shapes
from helpers.exercises.lesson08 import OPTIMIZERS, bytes_per_parameter

pytestmark = pytest.mark.usefixtures("lenient_checks")


def measured_like(dims):
    """A lesson-like table: predicted peaks (bytes) and made-up perplexities where AdamW is best but too big."""
    peaks = {o: predict(dims, Recipe(batch_size=2, seq_len=64, optimizer=o)).peak for o in OPTIMIZERS}
    ppl = {"adamw": 20.0, "sgd": 25.0, "adamw8bit": 20.1, "paged_adamw8bit": 20.1, "adafactor": 22.0}
    budget = (peaks["sgd"] + peaks["adamw8bit"]) / 2  # AdamW and SGD do not fit
    return peaks, ppl, budget


def cases(dims):
    shapes = trainable_tensor_shapes(dims, Recipe())
    n = trainable_params(dims, Recipe())
    ada = optimizer_state_bytes(dims, Recipe(optimizer="adafactor"))
    rows_only = 4 * sum(s[0] for s in shapes)
    no_vectors = 4 * sum(s[0] + s[1] for s in shapes if len(s) == 2)
    right = {o: bytes_per_parameter(dims, o) for o in OPTIMIZERS}
    rounded = {"adamw": 16, "sgd": 12, "adamw8bit": 10, "paged_adamw8bit": 10, "adafactor": 8}
    peaks, ppl, budget = measured_like(dims)
    context = {"peaks": peaks, "perplexity": ppl, "budget": budget}
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "adafactor_state_bytes": (ada, {"dims": dims},
                                  [(4 * n, "factors"), (8 * n, "no first moment"), (ada + 4 * n, "beta1"),
                                   (rows_only, "column"), (no_vectors, "norm"), (8 * ada, "bits"),
                                   (ada * 3, "rows + columns"), ("big", "number")]),
        "full_finetune_bytes_per_parameter": (
            right, {"dims": dims},
            [({**right, "sgd": 8}, "plain SGD"), ({**right, "adamw": 8}, "state alone"),
             ({**right, "adamw8bit": 16}, "one byte"), ({**right, "paged_adamw8bit": 8}, "moves"),
             ({**right, "adafactor": 12}, "factors"), ({**right, "adamw": 12}, "missing"),
             ({k: v for k, v in right.items() if k != "adafactor"}, "no entry"), ([16, 12, 10, 10, 8], "dict"),
             ({**right, "adamw": 128}, "bits"), ({**rounded, "sgd": 13}, "momentum")]),
        "optimizer_for_budget": ("adamw8bit", context,
                                 [("adamw", "over the budget"), ("sgd", "over the budget"),
                                  ("adafactor", "lower held-out perplexity"), ("AdamW8bit", "choose among"),
                                  (3, "string")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("08")


@pytest.mark.parametrize("name", ["adafactor_state_bytes", "full_finetune_bytes_per_parameter", "optimizer_for_budget"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, **context)


def test_rounded_answers_pass_and_ties_count_as_equal(dims):
    rounded = {"adamw": 16, "sgd": 12, "adamw8bit": 10, "paged_adamw8bit": 10, "adafactor": 8}
    if dims.hidden >= 512:  # on the course shapes the 8-bit and Adafactor extras are well under 1 %
        assert run_check("full_finetune_bytes_per_parameter", rounded, dims=dims).status == PASS
    peaks, ppl, budget = measured_like(dims)
    context = {"peaks": peaks, "perplexity": ppl, "budget": budget}
    assert run_check("optimizer_for_budget", "paged_adamw8bit", **context).status == PASS  # the same perplexity
    tight = {**context, "budget": peaks["adafactor"]}
    assert run_check("optimizer_for_budget", "adafactor", **tight).status == PASS  # only Adafactor fits
    assert run_check("optimizer_for_budget", "adamw8bit", **tight).status == FAIL


def test_the_adafactor_check_allows_leaving_out_the_rms_scalars(dims):
    tensors = len(trainable_tensor_shapes(dims, Recipe()))
    without = optimizer_state_bytes(dims, Recipe(optimizer="adafactor")) - 4 * tensors
    assert run_check("adafactor_state_bytes", without, dims=dims).status == PASS


def test_context_missing_says_what_to_pass():
    assert "dims=dims" in run_check("adafactor_state_bytes", 5).message
    assert "dims=dims" in run_check("full_finetune_bytes_per_parameter", {"adamw": 16}).message
    assert "budget=" in run_check("optimizer_for_budget", "adamw").message
