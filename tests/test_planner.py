"""The batch planner: the largest batch whose predicted peak fits a budget, on tiny and course shapes."""

import pytest
from casebook import COURSE

from helpers.estimate import Recipe, predict
from helpers.models import tiny_config
from helpers.planner import fits, largest_batch

GiB = 2**30


@pytest.mark.parametrize("config", [tiny_config(), COURSE], ids=["tiny", "course-shaped"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_answer_fits_and_the_next_batch_does_not(config, checkpointing):
    recipe = Recipe(seq_len=64, gradient_checkpointing=checkpointing)
    budget = 1.4 * predict(config, recipe.but(batch_size=3)).peak
    b = largest_batch(config, recipe, budget)
    assert 3 <= b < 256
    assert predict(config, recipe.but(batch_size=b)).peak <= budget
    assert predict(config, recipe.but(batch_size=b + 1)).peak > budget
    assert fits(config, recipe.but(batch_size=b), budget) and not fits(config, recipe.but(batch_size=b + 1), budget)


def test_recipe_batch_size_is_ignored():
    budget = 2.25 * GiB
    assert largest_batch(COURSE, Recipe(batch_size=50), budget) == largest_batch(COURSE, Recipe(), budget)


def test_course_model_numbers_in_the_docstring():
    budget = int(2.25 * GiB)
    assert largest_batch(COURSE, Recipe(seq_len=128), budget) == 3
    assert largest_batch(COURSE, Recipe(seq_len=128, gradient_checkpointing=True), budget) == 9


def test_checkpointing_never_fits_a_smaller_batch():
    for budget_gib in (2.3, 2.6, 3.0, 4.0):
        plain = largest_batch(COURSE, Recipe(seq_len=128), budget_gib * GiB)
        ckpt = largest_batch(COURSE, Recipe(seq_len=128, gradient_checkpointing=True), budget_gib * GiB)
        assert ckpt >= plain


def test_capped_at_max_batch():
    assert largest_batch(tiny_config(), Recipe(seq_len=8), 100 * GiB, max_batch=7) == 7
    assert largest_batch(tiny_config(), Recipe(seq_len=8), 100 * GiB, max_batch=1) == 1


def test_too_small_a_budget_says_what_batch_1_needs():
    need = predict(COURSE, Recipe(seq_len=128)).peak
    with pytest.raises(ValueError, match="even batch 1 does not fit") as err:
        largest_batch(COURSE, Recipe(seq_len=128), need - 1)
    message = str(err.value)
    assert f"{need / GiB:,.3f} GiB" in message and "gradient_checkpointing" in message
    assert largest_batch(COURSE, Recipe(seq_len=128), need) >= 1  # exactly the peak fits


@pytest.mark.parametrize("budget,max_batch", [(0, 8), (-5, 8), (GiB, 0), (GiB, 2.5)])
def test_bad_arguments(budget, max_batch):
    with pytest.raises(ValueError):
        largest_batch(COURSE, Recipe(), budget, max_batch=max_batch)
