"""Lesson 06's checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint,
and wrong or cheating answers never get points."""

import math

import nbformat
import numpy as np
import pytest
import torch
from casebook import COURSE, TINY, FrameReader, assert_grades, assert_no_points, check_calls, grade, liar, registered

from helpers.checks import EXERCISES, FAIL, PASS, run_check
from helpers.constants import ROOT
from helpers.estimate import Dims, Recipe, predict
from helpers.exercises.lesson06 import CROSSOVER_MODEL, SEQ_LEN, autocast_crossover, largest_safe_scale
from helpers.models import reference_config
from helpers.tools.notebooks import solution_regions

pytestmark = pytest.mark.usefixtures("lenient_checks")

NOTEBOOK = ROOT / "solutions" / "06_mixed_precision.ipynb"
NAMES = ["autocast_copy_bytes", "largest_loss_scale", "autocast_pays_from_batch"]
GRADIENT = 3.2  # a measured largest gradient: the largest safe scale is 2^14
KINDS = {"largest_loss_scale": "calculate", "autocast_copy_bytes": "predict", "autocast_pays_from_batch": "calculate"}


def big():
    return Dims.of(reference_config(CROSSOVER_MODEL))


def seq_for(dims):
    return SEQ_LEN if dims == COURSE else 16  # the tiny model needs shorter rows for a crossover above 2


def copies(dims):
    return 2 * (dims.layers * dims.block_linear_params + dims.embedding_params)


def cases(dims):
    blocks = dims.layers * dims.block_linear_params
    right = copies(dims)
    seq = seq_for(dims)
    crossover = autocast_crossover(dims, seq)
    assert crossover and crossover > 2, "pick a sequence length where small batches do not pay yet"
    return {
        # name: (right answer, context, measured, [(wrong answer, a word its hint must contain)])
        "autocast_copy_bytes": (right, {"dims": dims}, {},
                                [(2 * blocks, "lm_head"), (2 * dims.params, "norm"), (2 * right, "fp32"),
                                 (2 * (blocks + 2 * dims.embedding_params), "embedding lookup"),
                                 (right / 2, "half"), (right * 8 + 1, "bits"), (right / 2**20, "MiB"),
                                 (right / 1e6, "MB"), (right - 2 * dims.block_linear_params, "one block short"),
                                 (2 * dims.block_linear_params, "one block's copies"),
                                 (right + 1, "count"), ("lots", "number")]),
        "largest_loss_scale": (14, None, {"largest_gradient": GRADIENT},
                               [(16, "inf"), (2.0 ** 14, "exponent"), (math.log2(65504 / GRADIENT), "whole number"),
                                (13, "not the largest"), (-1, "not the largest"), ([14], "number"),
                                (15, "inf"), (2.0 ** 13, "exponent"), (10**6, "small whole"), (1e300, "small whole")]),
        "autocast_pays_from_batch": (crossover, {"dims": dims, "seq_len": seq}, {},
                                     [(1, "not lower yet"), (crossover - 1, "not lower yet"),
                                      (crossover + 3, "smallest"), (2.5, "whole number"), ("many", "batch size"),
                                      (0, "whole number"), (10**9, "smallest")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("06") == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_check(name, dims):
    right, context, measured, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, context, **measured)


def test_largest_loss_scale_is_the_power_of_two_below_the_overflow():
    """The exponent is asked (the check's docstring says why): the scale it stands for is the largest safe one."""
    for g in (3.2, 0.01, 1.0, 65504.0, 1e-3):
        s = largest_safe_scale(g)
        assert g * s <= 65504 < g * 2 * s
    assert largest_safe_scale(1.0) == 32768.0


def test_the_loss_scale_follows_the_lessons_measurement():
    for g, right in ((0.5, 16), (100.0, 9), (15.4, 12)):
        assert grade("largest_loss_scale", right, largest_gradient=g).status == PASS
        assert grade("largest_loss_scale", 14, largest_gradient=g).status == FAIL
        assert grade("largest_loss_scale", 2 ** right, largest_gradient=g).status == FAIL  # the scale, not n


# ------------------------------------------------------------------------------------------------
# Red team: slips just outside the lesson's point, and answers that lie. None may score.
# ------------------------------------------------------------------------------------------------
def test_autocast_copy_bytes_red_team(dims):
    right, ctx = copies(dims), {"dims": dims}
    wrong = [right + 2, right - 2 * dims.hidden,  # a norm counted as cast or one small matrix left out
             right * 1.001, round(right, -5),  # rounded: the count is exact
             right / 2**20 * 1e6,  # MiB written as MB
             2 * (dims.layers * dims.block_linear_params + dims.embedding_params + dims.hidden),
             liar(1.0, right), liar(1, right), FrameReader(), str(right), [right],
             {"bytes": right}, True, float("nan"), float("inf"), torch.ones(2)]
    assert_no_points("autocast_copy_bytes", wrong, ctx)


def test_largest_loss_scale_red_team():
    wrong = [15, 14.0001, 13.9999, 14.3, 2.0 ** 14, 20470.0,  # 65504 / 3.2, not a power of two
             liar(1.0, 14), liar(1, 14), FrameReader(), "14", True, [14], {"n": 14}]
    assert_no_points("largest_loss_scale", wrong, largest_gradient=GRADIENT)
    # the measurement is the lesson's: without it, or with a bogus one, nothing passes
    for measured in ({}, {"largest_gradient": "big"}, {"largest_gradient": -1.0}, {"largest_gradient": 0.0}):
        result = grade("largest_loss_scale", 14, **measured)
        assert result.status == FAIL and result.points == 0, (measured, result.message)


def test_autocast_pays_from_batch_red_team(dims):
    seq = seq_for(dims)
    crossover = autocast_crossover(dims, seq)
    ctx = {"dims": dims, "seq_len": seq}
    wrong = [crossover + 1, crossover - 0.5, crossover * 2, -crossover, liar(1, crossover),
             liar(1.0, crossover), FrameReader(), str(crossover), [crossover], True]
    assert_no_points("autocast_pays_from_batch", wrong, ctx)


def test_reasonable_number_types_pass(dims):
    ctx = {"dims": dims}
    for answer in (np.int64(copies(dims)), float(copies(dims)), torch.tensor(copies(dims), dtype=torch.float64)):
        assert grade("autocast_copy_bytes", answer, ctx).status == PASS, type(answer)
    for answer in (np.float32(14), torch.tensor(14.0), 14, np.int64(14)):
        assert grade("largest_loss_scale", answer, largest_gradient=GRADIENT).status == PASS, type(answer)
    crossover = autocast_crossover(dims, seq_for(dims))
    ctx = {"dims": dims, "seq_len": seq_for(dims)}
    for answer in (np.int32(crossover), float(crossover)):
        assert grade("autocast_pays_from_batch", answer, ctx).status == PASS, type(answer)


def test_check_refuses_a_context_from_the_learner():
    forged = run_check("autocast_copy_bytes", copies(TINY), dims=TINY)
    assert forged.status == FAIL and forged.points == 0 and "takes no dims" in forged.message
    forged = run_check("autocast_pays_from_batch", 1, seq_len=1)
    assert forged.status == FAIL and forged.points == 0 and "takes no seq_len" in forged.message


def test_every_exercise_declares_its_kind_and_an_exact_tolerance():
    for name, kind in KINDS.items():
        assert EXERCISES[name].kind == kind and EXERCISES[name].tolerance == 0.0, name


def test_the_crossover_is_asked_for_a_model_the_lesson_does_not_sweep():
    """Exercise 3 is SmolLM2-1.7B's crossover; the course model's (the sweep the notebook prints) is a
    different number, and giving it gets a hint that names it."""
    want, course = autocast_crossover(big(), SEQ_LEN), autocast_crossover(COURSE, SEQ_LEN)
    assert want != course and want > 2
    ctx = {"dims": big(), "seq_len": SEQ_LEN, "course": COURSE}
    assert grade("autocast_pays_from_batch", want, ctx).status == PASS
    wrong = grade("autocast_pays_from_batch", course, ctx)
    assert wrong.status == FAIL and "course model" in wrong.message
    for other in (want - 1, want + 1):
        assert grade("autocast_pays_from_batch", other, ctx).status == FAIL


def test_only_the_gradient_is_a_measurement():
    assert EXERCISES["largest_loss_scale"].measured == ("largest_gradient",)
    assert EXERCISES["autocast_copy_bytes"].measured == EXERCISES["autocast_pays_from_batch"].measured == ()


# ------------------------------------------------------------------------------------------------
# The trusted context, the notebook's check calls and the solution's own answers
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trusted_context_is_the_course_config():
    assert EXERCISES["autocast_copy_bytes"].trusted_context() == {"dims": COURSE}
    assert EXERCISES["autocast_pays_from_batch"].trusted_context() == {"dims": big(), "seq_len": SEQ_LEN,
                                                                       "course": COURSE}
    assert grade("autocast_copy_bytes", copies(COURSE)).status == PASS
    assert grade("autocast_copy_bytes", copies(TINY)).status == FAIL
    assert grade("autocast_pays_from_batch", autocast_crossover(big(), SEQ_LEN)).status == PASS
    assert grade("autocast_pays_from_batch", autocast_crossover(COURSE, SEQ_LEN)).status == FAIL


def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebooks_check_calls_pass_only_measurements():
    assert check_calls(notebook()) == {name: sorted(EXERCISES[name].measured) for name in NAMES}


def test_the_solutions_answers_pass_and_use_the_lessons_sequence_length():
    """The code between BEGIN and END SOLUTION, run on the course model's shapes."""
    regions = [text for _, text in solution_regions(notebook())]
    namespace = {"dims": COURSE, "big": big(), "Recipe": Recipe, "predict": predict, "math": math,
                 "fp16": torch.finfo(torch.float16), "largest_gradient": GRADIENT}
    for text in regions:
        exec(text, namespace)
    assert f"seq_len={SEQ_LEN}" in regions[2] and "predict(big," in regions[2]
    source = "\n".join(c.source for c in notebook().cells if c.cell_type == "code")
    assert f'big = Dims.of(reference_config("{CROSSOVER_MODEL}"))' in source
    context = {"autocast_copy_bytes": {"dims": COURSE}, "largest_loss_scale": None,
               "autocast_pays_from_batch": {"dims": big(), "seq_len": SEQ_LEN}}
    answers = {"autocast_copy_bytes": namespace["copy_bytes"], "largest_loss_scale": namespace["loss_scale_exponent"],
               "autocast_pays_from_batch": namespace["crossover_batch"]}
    for name, answer in answers.items():
        measured = {"largest_gradient": GRADIENT} if name == "largest_loss_scale" else {}
        result = grade(name, answer, context[name], **measured)
        assert result.status == PASS, (name, result.message)


def test_the_copy_prediction_comes_before_its_measurement_and_is_shown_beside_it():
    cells = [c.source for c in notebook().cells]
    asked = next(i for i, c in enumerate(cells) if 'check("autocast_copy_bytes"' in c)
    measured = next(i for i, c in enumerate(cells) if "saved_for_backward(" in c)
    shown = next(i for i, c in enumerate(cells) if 'show_prediction("autocast_copy_bytes"' in c)
    assert asked < measured < shown
    assert not any("block_linear_params" in c for c in cells[:asked] if "print(" in c)  # no per-block copy bytes above
