"""Lesson 08's checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint,
and wrong or cheating answers never get points."""

import ast

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from casebook import COURSE, TINY, FrameReader, assert_grades, assert_no_points, grade, liar, registered

from helpers.checks import EXERCISES, FAIL, PASS, run_check
from helpers.constants import ROOT
from helpers.estimate import Recipe, optimizer_state_bytes, predict, trainable_params, trainable_tensor_shapes
from helpers.exercises.lesson08 import OPTIMIZERS, bytes_per_parameter
from helpers.tools.notebooks import solution_regions

pytestmark = pytest.mark.usefixtures("lenient_checks")

NOTEBOOK = ROOT / "solutions" / "08_optimizers.ipynb"
NAMES = ["adafactor_state_bytes", "full_finetune_bytes_per_parameter", "optimizer_for_budget"]


def measured_like(dims):
    """A lesson-like table: predicted peaks (MiB), made-up perplexities and noise. The budget lies between
    Adafactor's peak and 8-bit AdamW's, so Adafactor and plain SGD fit; plain SGD at Adam's rate did not learn."""
    peaks = {o: predict(dims, Recipe(batch_size=2, seq_len=64, optimizer=o)).peak / 2**20
             for o in (*OPTIMIZERS, "sgd_plain")}
    ppl = {"adamw": 20.0, "sgd": 21.0, "sgd_plain": 28.5, "adamw8bit": 20.02, "adafactor": 20.3}
    budget = (peaks["adafactor"] + peaks["adamw8bit"]) / 2
    return {"peaks": {k: v for k, v in peaks.items() if k in ppl}, "perplexity": ppl, "budget": budget,
            "noise": 0.005}


def adafactor(dims):
    """(state bytes, the RMS scalars an answer may leave out)."""
    return optimizer_state_bytes(dims, Recipe(optimizer="adafactor")), 4 * len(trainable_tensor_shapes(dims, Recipe()))


def rounded(value):
    """``value`` to three significant digits (two if that is exact): close, but not the count."""
    for digits in (3, 2, 1):
        if float(f"{value:.{digits}g}") != value:
            return float(f"{value:.{digits}g}")
    raise AssertionError(value)


def cases(dims):
    shapes = trainable_tensor_shapes(dims, Recipe())
    n = trainable_params(dims, Recipe())
    ada, scalars = adafactor(dims)
    rows_only = 4 * sum(s[0] for s in shapes)
    no_vectors = 4 * sum(s[0] + s[1] for s in shapes if len(s) == 2)
    right = {o: bytes_per_parameter(dims, o) for o in OPTIMIZERS}
    h = dims.hidden
    return {
        # name: (right answer, context, measured, [(wrong answer, a word its hint must contain)])
        "adafactor_state_bytes": (ada, {"dims": dims}, {},
                                  [(4 * n, "factors"), (8 * n, "no first moment"), (ada + 4 * n, "beta1"),
                                   (rows_only, "column"), (no_vectors, "norm"), (8 * ada, "bits"),
                                   (ada * 3, "rows + columns"), ("big", "number"), (ada - 4 * h, "final norm"),
                                   (ada - scalars - 4 * h, "final norm"), (ada - 8 * h * dims.layers, "two norm"),
                                   (ada + 4 * (dims.vocab + h) + 4, "once"), (rounded(ada), "do not round"),
                                   (ada / 2**20, "MiB")]),
        "full_finetune_bytes_per_parameter": (
            right, {"dims": dims}, {},
            [({**right, "sgd": 8}, "plain SGD"), ({**right, "adamw": 8}, "state alone"),
             ({**right, "adamw8bit": 16}, "one byte"), ({**right, "paged_adamw8bit": 8}, "moves"),
             ({**right, "adafactor": 12}, "factors"), ({**right, "adamw": 12}, "missing"),
             ({k: v for k, v in right.items() if k != "adafactor"}, "no entry"), ([16, 12, 10, 10, 8], "dict"),
             ({**right, "adamw": 128}, "bits"), ({**right, "adamw8bit": 10}, "scale"),
             ({**right, "adafactor": 8}, "not zero"), ({**right, "lion": 12}, "not one of")]),
        "optimizer_for_budget": ("adafactor", None, measured_like(dims),
                                 [("adamw", "over the budget"), ("sgd", "over the budget"),
                                  ("adamw8bit", "over the budget"), ("sgd_plain", "no momentum"),
                                  ("sgd_plain", "times the run-to-run noise"), ("AdamW-9bit", "choose among"),
                                  (3, "string")]),
    }


def test_every_registered_exercise_has_cases():
    assert set(cases(COURSE)) == registered("08") == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_check(name, dims):
    right, context, measured, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, context, **measured)


def test_the_adafactor_check_allows_leaving_out_the_rms_scalars_and_nothing_else(dims):
    ada, scalars = adafactor(dims)
    for answer in (ada, ada - scalars, float(ada), np.int64(ada - scalars)):
        assert grade("adafactor_state_bytes", answer, {"dims": dims}).status == PASS, answer
    for answer in (ada - scalars // 2, ada + 1, ada - scalars - 1, ada + scalars):
        assert grade("adafactor_state_bytes", answer, {"dims": dims}).status == FAIL, answer


def test_two_decimals_pass_and_the_small_terms_count():
    right = {o: bytes_per_parameter(COURSE, o) for o in OPTIMIZERS}
    two_decimals = {o: round(v, 2) for o, v in right.items()}
    assert grade("full_finetune_bytes_per_parameter", two_decimals, {"dims": COURSE}).status == PASS
    trainer_names = {"adamw_torch": 16, "SGD": 12, "adamw_8bit": 10.03, "paged_adamw_8bit": 10.03, "Adafactor": 8.01}
    assert grade("full_finetune_bytes_per_parameter", trainer_names, {"dims": COURSE}).status == PASS
    whole = {"adamw": 16, "sgd": 12, "adamw8bit": 10, "paged_adamw8bit": 10, "adafactor": 8}
    result = grade("full_finetune_bytes_per_parameter", whole, {"dims": COURSE})
    assert result.status == FAIL and "scale" in result.message
    assert grade("full_finetune_bytes_per_parameter", {**right, "adafactor": 8.0}, {"dims": COURSE}).status == FAIL


def test_runs_within_the_noise_count_as_equal_and_the_answer_follows_the_measurements(dims):
    measured = measured_like(dims)
    roomy = {**measured, "budget": (measured["peaks"]["sgd"] + measured["peaks"]["adamw8bit"]) / 2}
    for answer in ("AdamW8bit", "adamw_8bit", " ADAMW8BIT "):
        assert grade("optimizer_for_budget", answer, **roomy).status == PASS, answer
    assert grade("optimizer_for_budget", "adafactor", **roomy).status == FAIL  # 1.4 % worse: 3 x the noise
    noisy = {**roomy, "noise": 0.02}  # the same table with 2 % noise: Adafactor is as good as 8-bit AdamW
    assert grade("optimizer_for_budget", "adafactor", **noisy).status == PASS
    assert grade("optimizer_for_budget", "sgd_plain", **noisy).status == FAIL
    tight = {**measured, "budget": measured["peaks"]["sgd_plain"]}
    assert grade("optimizer_for_budget", "sgd_plain", **tight).status == PASS  # only plain SGD fits
    assert grade("optimizer_for_budget", "adafactor", **tight).status == FAIL


def test_kinds_and_tolerances_are_declared():
    from helpers.exercises.lesson08 import PER_PARAMETER_TOLERANCE

    assert {n: EXERCISES[n].kind for n in NAMES} == {"adafactor_state_bytes": "predict",
                                                     "full_finetune_bytes_per_parameter": "predict",
                                                     "optimizer_for_budget": "diagnose"}
    assert EXERCISES["full_finetune_bytes_per_parameter"].tolerance == PER_PARAMETER_TOLERANCE
    assert EXERCISES["adafactor_state_bytes"].tolerance == 0


# ------------------------------------------------------------------------------------------------
# Red team: slips just outside the lesson's point, and answers that lie. None may score.
# ------------------------------------------------------------------------------------------------
def test_adafactor_state_bytes_red_team(dims):
    ada, scalars = adafactor(dims)
    wrong = [ada * 1.004, ada * 0.996,  # inside the old 0.5 %
             ada - 4 * dims.hidden, ada - scalars - 4 * dims.hidden,  # the final norm forgotten
             ada - 4 * (dims.vocab + dims.hidden),  # the embedding forgotten
             ada - scalars + 4,  # one RMS scalar
             ada / 2**20 * 1e6,  # MiB taken for MB
             liar(1.0, ada), FrameReader(), str(ada), [ada], {"bytes": ada}, True, float("nan")]
    assert_no_points("adafactor_state_bytes", wrong, {"dims": dims})


def test_full_finetune_bytes_per_parameter_red_team(dims):
    right = {o: bytes_per_parameter(dims, o) for o in OPTIMIZERS}
    fake = liar({o: 1.0 for o in OPTIMIZERS}, right)
    wrong = [{o: v * 1.01 for o, v in right.items()}, {**right, "adamw8bit": right["adamw8bit"] + 0.01},
             {**right, "adafactor": right["adafactor"] - 0.01}, {**right, "sgd": right["sgd"] + 0.01},
             {o: v * 8 for o, v in right.items()}, {**right, "adamw": liar(1.0, right["adamw"])},
             {**right, "adamw": FrameReader()}, fake, {**right, "adamw": "16"}, {**right, "AdamW": 16.0},
             {**right, "sgd": None}, list(right.values()), "adamw: 16", True]
    assert_no_points("full_finetune_bytes_per_parameter", wrong, {"dims": dims})


def test_optimizer_for_budget_red_team(dims):
    measured = measured_like(dims)
    wrong = [liar("adamw", "adafactor"), liar("sgd_plain", "adafactor"), "adafactor or sgd", "adamw_torch", "8bit",
             "sgd", ["adafactor"], {"optimizer": "adafactor"}, True, torch.tensor(1.0)]
    assert_no_points("optimizer_for_budget", wrong, **measured)
    for bad in ({}, {**measured, "peaks": None}, {**measured, "peaks": [1, 2]}, {**measured, "budget": "lots"},
                {**measured, "perplexity": {"adamw": "low"}}, {**measured, "noise": None}, {**measured, "noise": 5},
                {**measured, "noise": -0.1}):
        result = grade("optimizer_for_budget", "adafactor", **bad)
        assert result.status == FAIL and result.points == 0, (bad, result.message)


def test_check_refuses_a_context_from_the_learner():
    for name in ("adafactor_state_bytes", "full_finetune_bytes_per_parameter"):
        result = run_check(name, 1, dims=TINY)
        assert result.status == FAIL and result.points == 0 and "takes no dims" in result.message, name
    assert EXERCISES["optimizer_for_budget"].measured == ("peaks", "perplexity", "budget", "noise")
    assert EXERCISES["adafactor_state_bytes"].measured == EXERCISES["full_finetune_bytes_per_parameter"].measured == ()


# ------------------------------------------------------------------------------------------------
# The trusted context, the notebook's check calls and the solution's own answers
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trusted_context_is_the_course_config():
    for name in ("adafactor_state_bytes", "full_finetune_bytes_per_parameter"):
        assert EXERCISES[name].trusted_context() == {"dims": COURSE}, name
    assert grade("adafactor_state_bytes", adafactor(COURSE)[0]).status == PASS
    assert grade("adafactor_state_bytes", adafactor(TINY)[0]).status == FAIL


def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebooks_check_calls_pass_only_measurements_and_its_names_are_the_checks():
    calls, names = {}, None
    for cell in notebook().cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "OPTIMIZERS":
                names = ast.literal_eval(node.value)
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check":
                calls[node.args[0].value] = sorted(k.arg for k in node.keywords)
    assert calls == {name: sorted(EXERCISES[name].measured) for name in NAMES}
    assert tuple(names) == OPTIMIZERS


def test_the_solutions_answers_pass():
    """The code between BEGIN and END SOLUTION, run on the course model's shapes (exercise 3 on a lesson-like
    table of measurements)."""
    measured = measured_like(COURSE)
    cost = pd.DataFrame({"peak MiB (measured)": measured["peaks"], "perplexity after": measured["perplexity"]})
    namespace = {"dims": COURSE, "Recipe": Recipe, "optimizer_state_bytes": optimizer_state_bytes,
                 "trainable_params": trainable_params, "cost": cost, "BUDGET_MIB": measured["budget"],
                 "NOISE": measured["noise"]}
    for _, text in solution_regions(notebook()):
        exec(text, namespace)
    answers = {"adafactor_state_bytes": namespace["adafactor_bytes"],
               "full_finetune_bytes_per_parameter": namespace["bytes_per_param"],
               "optimizer_for_budget": namespace["budget_choice"]}
    for name, answer in answers.items():
        if name == "optimizer_for_budget":
            result = grade(name, answer, **measured)
        else:
            result = grade(name, answer, {"dims": COURSE})
        assert result.status == PASS, (name, result.message)
