"""Lesson 07's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones."""

import pytest
from casebook import assert_grades, registered

from helpers.checks import FAIL, PASS, run_check
from helpers.estimate import Recipe, predict
from helpers.exercises.lesson07 import split_for_budget

pytestmark = pytest.mark.usefixtures("lenient_checks")

LENGTHS = [32, 24, 8, 4]  # the lesson's padded rows: one row per micro-batch
GROUPED = [[64, 40], [16, 6]]  # two micro-batches of two rows
FULL = Recipe(seq_len=512)


def budget_case(dims):
    """A budget that fits micro-batches of 4 (k = 8) but not 8, at an effective batch of 32."""
    peak = {b: predict(dims, FULL.but(batch_size=b, gradient_accumulation_steps=32 // b)).peak for b in (8, 4)}
    return (peak[4] + peak[8]) // 2


def cases(dims):
    lora = {"dims": dims, "batch_size": 1, "seq_len": 64, "steps": 4, "lora_rank": 16}
    recipe = Recipe(batch_size=1, seq_len=64, gradient_accumulation_steps=4, lora_rank=16, lora_targets="all-linear")
    right = predict(dims, recipe)
    whole = predict(dims, recipe.but(batch_size=4, gradient_accumulation_steps=1))
    no_grads = predict(dims, recipe.but(gradient_accumulation_steps=1))
    budget = budget_case(dims)
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "num_items_in_batch": (sum(n - 1 for n in LENGTHS), {"lengths": LENGTHS, "seq_len": 32},
                               [(sum(LENGTHS), "shift"), (4 * 32, "padding"), (4, "counts micro-batches"),
                                (31, "first micro-batch"), (4 * 31, "padding"), ("64", "number")]),
        "accumulation_peak": (right.peak, lora,
                              [(whole.peak, "without accumulation"), (whole.peak / 4, "stay the same"),
                               (no_grads.peak, "gradients"),
                               (whole.weights + whole.optimizer + whole.activations / 4, "gradients"),
                               (right.peak / 2**20, "MiB"), ("big", "number")]),
        "micro_batch_for_budget": ((4, 8), {"dims": dims, "recipe": FULL, "effective_batch": 32, "budget": budget},
                                   [((8, 4), "over the"), ((2, 16), "larger micro-batch"), ((4, 4), "effective batch"),
                                    ((32, 1), "over the"), ((4.5, 7), "whole numbers"), (4, "two numbers")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("07")


@pytest.mark.parametrize("name", ["num_items_in_batch", "accumulation_peak", "micro_batch_for_budget"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, **context)


def test_token_count_with_several_rows_per_micro_batch():
    want = sum(n - 1 for m in GROUPED for n in m)
    assert run_check("num_items_in_batch", want, lengths=GROUPED, seq_len=64).status == PASS
    first_only = run_check("num_items_in_batch", 63 + 39, lengths=GROUPED, seq_len=64)
    assert first_only.status == FAIL and "every micro-batch" in first_only.message
    per_micro = run_check("num_items_in_batch", sum(sum(m) for m in GROUPED) - 2, lengths=GROUPED, seq_len=64)
    assert per_micro.status == FAIL and "one per row" in per_micro.message
    average = run_check("num_items_in_batch", want / 2, lengths=GROUPED, seq_len=64)
    assert average.status == FAIL and "sum" in average.message


def test_full_fine_tuning_peak(dims):
    """The same check for full fine-tuning, where the gradients are a large share of the peak."""
    recipe = Recipe(batch_size=2, seq_len=128, gradient_accumulation_steps=4)
    context = {"dims": dims, "batch_size": 2, "seq_len": 128, "steps": 4}
    assert run_check("accumulation_peak", predict(dims, recipe).peak, **context).passed
    forgot = run_check("accumulation_peak", predict(dims, recipe.but(gradient_accumulation_steps=1)).peak, **context)
    assert forgot.status == FAIL and "gradients" in forgot.message


def test_split_for_budget_finds_the_largest_and_none_below_the_floor(dims):
    budget = budget_case(dims)
    assert split_for_budget(dims, FULL, 32, budget) == (4, 8)
    assert split_for_budget(dims, FULL, 32, 10**12) == (32, 1)
    floor = predict(dims, FULL.but(batch_size=1, gradient_accumulation_steps=32)).peak
    assert split_for_budget(dims, FULL, 32, floor - 1) is None


def test_context_missing_says_what_to_pass():
    assert "lengths=" in run_check("num_items_in_batch", 5).message
    assert "dims=dims" in run_check("accumulation_peak", 5).message
    assert "budget=" in run_check("micro_batch_for_budget", (1, 2)).message
