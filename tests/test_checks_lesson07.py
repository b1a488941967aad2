"""Lesson 07's checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint,
and wrong or cheating answers never get points."""

import ast

import nbformat
import numpy as np
import pytest
import torch
from casebook import COURSE, TINY, FrameReader, assert_grades, assert_no_points, check_calls, grade, liar, registered

from helpers.checks import EXERCISES, FAIL, PASS, run_check
from helpers.constants import ROOT
from helpers.estimate import Dims, Recipe, predict
from helpers.exercises import lesson07
from helpers.exercises.lesson07 import (
    BUDGET,
    BUDGET_RECIPE,
    EFFECTIVE_ROWS,
    LENGTHS,
    OOM_BUDGET,
    OOM_MODEL,
    OOM_OPTIONS,
    OOM_RECIPE,
    PEAK_RECIPE,
    PEAK_TOLERANCE,
    SHORT,
    oom_reports,
    split_for_budget,
)
from helpers.models import reference_config
from helpers.planner import USABLE
from helpers.tools.notebooks import solution_regions

pytestmark = pytest.mark.usefixtures("lenient_checks")

NOTEBOOK = ROOT / "solutions" / "07_gradient_accumulation.ipynb"
NAMES = ["num_items_in_batch", "accumulation_peak", "micro_batch_for_budget", "diagnose_out_of_memory"]
KINDS = {"num_items_in_batch": ("predict", 0.0), "accumulation_peak": ("predict", PEAK_TOLERANCE),
         "micro_batch_for_budget": ("calculate", 0.0), "diagnose_out_of_memory": ("diagnose", 0.0)}
OPTIONS = {letter: changes for letter, (_, changes) in OOM_OPTIONS.items()}
# What each wrong option's feedback must name: the thing it shrinks, or why that is not enough.
WHY = {"b": "logits", "c": "optimizer state", "d": "top blocks", "e": "every block", "f": "bf16"}


def oom_dims():
    return Dims.of(reference_config(OOM_MODEL))


def oom_context(dims=None, budget=OOM_BUDGET, recipe=OOM_RECIPE, options=None):
    return {"dims": dims or oom_dims(), "recipe": recipe, "budget": budget, "options": options or OPTIONS}
GROUPED = [[64, 40], [16, 6]]  # two micro-batches of two rows
FULL = Recipe(seq_len=512)
ITEMS = sum(n - 1 for n in LENGTHS)


def budget_case(dims):
    """A budget that fits micro-batches of 4 (k = 8) but not 8, at a batch of 32 rows per optimizer step."""
    peak = {b: predict(dims, FULL.but(batch_size=32, gradient_accumulation_steps=32 // b)).peak for b in (8, 4)}
    return (peak[4] + peak[8]) // 2


def budget_context(dims):
    return {"dims": dims, "recipe": FULL, "batch_size": 32, "budget": budget_case(dims)}


def cases(dims):
    recipe = PEAK_RECIPE
    right = predict(dims, recipe)
    whole = predict(dims, recipe.but(gradient_accumulation_steps=1))
    no_grads = predict(dims, recipe.but(batch_size=recipe.micro_batch_size, gradient_accumulation_steps=1))
    items = {"lengths": LENGTHS, "seq_len": SHORT}
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "num_items_in_batch": (ITEMS, items,
                               [(sum(LENGTHS), "shift"), (4 * 32, "padding"), (4, "counts micro-batches"),
                                (LENGTHS[0] - 1, "first micro-batch"), (LENGTHS[-1] - 1, "last micro-batch"),
                                (4 * 31, "padding"), (sum(LENGTHS) - 1, "not once"), (str(ITEMS), "number")]),
        "accumulation_peak": (right.peak, {"dims": dims, "recipe": recipe},
                              [(whole.peak, "without accumulation"), (whole.peak / 4, "stay the same"),
                               (no_grads.peak, "gradients"),
                               (whole.weights + whole.optimizer + whole.activations / 4, "gradients"),
                               (right.peak / 2**20, "MiB"), (right.peak / 2**20 * 1e6, "MiB"),
                               (right.peak * 8, "bits"), ("big", "number")]),
        "micro_batch_for_budget": ((4, 8), budget_context(dims),
                                   [((8, 4), "over the"), ((2, 16), "larger micro-batch"), ((4, 4), "must stay"),
                                    ((32, 1), "over the"), ((4.5, 7), "whole numbers"), (4, "two numbers"),
                                    ((4, 8, 1), "two numbers"), ((0, 32), "whole numbers")]),
        "diagnose_out_of_memory": ("a", oom_context(),
                                   [(letter, word) for letter, word in WHY.items()]
                                   + [("z", "one letter"), (1, "letter"), ("ab", "one letter")]),
    }


def test_every_registered_exercise_has_cases():
    assert set(cases(COURSE)) == registered("07") == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, context)


def test_every_exercise_declares_its_kind_and_tolerance():
    for name, (kind, tolerance) in KINDS.items():
        assert (EXERCISES[name].kind, EXERCISES[name].tolerance) == (kind, tolerance), name


def test_the_token_count_is_no_other_number_of_the_lesson():
    """Every row is padded, and the count is not the lesson's sequence length, micro-batch count or rows."""
    assert max(LENGTHS) < SHORT and ITEMS not in (SHORT, lesson07.SEQ, 2 * SHORT, len(LENGTHS), sum(LENGTHS))
    assert LENGTHS[-1] - 1 != len(LENGTHS)  # "last micro-batch only" and "counts micro-batches" stay apart


def test_the_budgets_leave_headroom_for_the_cuda_context_and_allocator():
    assert BUDGET == int(lesson07.BUDGET_CARD_GB * 1e9 * USABLE) < lesson07.BUDGET_CARD_GB * 1e9
    assert OOM_BUDGET == int(lesson07.OOM_CARD_GB * 1e9 * USABLE) < lesson07.OOM_CARD_GB * 1e9
    micro, k = split_for_budget(COURSE, BUDGET_RECIPE, EFFECTIVE_ROWS, BUDGET)
    assert (micro, k) == (4, 8)
    fitted = BUDGET_RECIPE.but(batch_size=EFFECTIVE_ROWS, gradient_accumulation_steps=k)
    assert fitted.micro_batch_size == micro and predict(COURSE, fitted).peak < 0.9 * BUDGET


def test_the_diagnosis_is_decided_by_a_clear_margin():
    """The run does not fit; exactly one option fits, at most 90 % of the budget; every other option is at least
    10 % over it (far beyond the estimator's error, which the lessons measure within 3 %)."""
    d = oom_dims()
    assert predict(d, OOM_RECIPE).peak > OOM_BUDGET
    reports = oom_reports(d, OOM_RECIPE, OPTIONS)
    fits = [k for k, r in reports.items() if r.peak <= OOM_BUDGET]
    assert fits == ["a"] and reports["a"].peak <= 0.9 * OOM_BUDGET
    assert all(r.peak >= 1.1 * OOM_BUDGET for k, r in reports.items() if k != "a")
    base = predict(d, OOM_RECIPE)
    assert base.activations > 0.8 * base.peak  # the report points at the activations


def test_every_wrong_option_is_explained_with_this_runs_numbers():
    ctx = oom_context()
    reports = oom_reports(ctx["dims"], OOM_RECIPE, OPTIONS)
    for letter in WHY:
        result = grade("diagnose_out_of_memory", letter, ctx)
        assert result.status == FAIL and result.points == 0
        assert f"{reports[letter].peak / 2**30:,.2f} GiB" in result.message
        assert f"{OOM_BUDGET / 2**30:,.2f} GiB" in result.message
    right = grade("diagnose_out_of_memory", "a", ctx)
    assert f"{reports['a'].peak / 2**30:,.2f} GiB" in right.message and "training is unchanged" in right.message


def test_the_diagnosis_follows_the_context_not_a_fixed_letter():
    """Another model and budget: the verdict is computed, not stored."""
    # the course model at the same batch: accumulation fits 6 GiB, nothing else does
    ctx = oom_context(dims=COURSE, budget=6 * 2**30)
    assert grade("diagnose_out_of_memory", "a", ctx).status == PASS
    assert grade("diagnose_out_of_memory", "b", ctx).status == FAIL
    # two options, a budget between them: only checkpointing fits
    options = {"a": {"gradient_accumulation_steps": 2}, "b": {"gradient_checkpointing": True}}
    peaks = {k: r.peak for k, r in oom_reports(oom_dims(), OOM_RECIPE, options).items()}
    assert peaks["b"] < peaks["a"]
    ctx = oom_context(budget=(peaks["a"] + peaks["b"]) // 2, options=options)
    passed = grade("diagnose_out_of_memory", "b", ctx)
    assert passed.status == PASS and "recomputes" in passed.message
    assert grade("diagnose_out_of_memory", "a", ctx).status == FAIL


def test_reasonable_letters_pass():
    for answer in ("a", "A", " a ", "(a)", "a)", "a."):
        assert grade("diagnose_out_of_memory", answer, oom_context()).status == PASS, answer


def test_diagnose_red_team():
    wrong = ["b", "ab", "a b", "all", "accumulation", liar("c", "a"), liar("c", FrameReader()), FrameReader(),
             ["a"], {"answer": "a"}, True, 0, 1.0]
    assert_no_points("diagnose_out_of_memory", wrong, oom_context())


def test_token_count_with_several_rows_per_micro_batch():
    ctx = {"lengths": GROUPED, "seq_len": 64}
    want = sum(n - 1 for m in GROUPED for n in m)
    assert grade("num_items_in_batch", want, ctx).status == PASS
    first_only = grade("num_items_in_batch", 63 + 39, ctx)
    assert first_only.status == FAIL and "every micro-batch" in first_only.message
    per_micro = grade("num_items_in_batch", sum(sum(m) for m in GROUPED) - 2, ctx)
    assert per_micro.status == FAIL and "one per row" in per_micro.message
    average = grade("num_items_in_batch", want / 2, ctx)
    assert average.status == FAIL and "sum" in average.message


def test_full_fine_tuning_peak(dims):
    """The same check for full fine-tuning, where the gradients are a large share of the peak."""
    recipe = Recipe(batch_size=8, seq_len=128, gradient_accumulation_steps=4)
    ctx = {"dims": dims, "recipe": recipe}
    assert grade("accumulation_peak", predict(dims, recipe).peak, ctx).passed
    forgot = grade("accumulation_peak", predict(dims, recipe.but(batch_size=2, gradient_accumulation_steps=1)).peak,
                   ctx)
    assert forgot.status == FAIL and "gradients" in forgot.message


def test_split_for_budget_finds_the_largest_and_none_below_the_floor(dims):
    budget = budget_case(dims)
    assert split_for_budget(dims, FULL, 32, budget) == (4, 8)
    assert split_for_budget(dims, FULL, 32, 10**12) == (32, 1)
    floor = predict(dims, FULL.but(batch_size=32, gradient_accumulation_steps=32)).peak
    assert split_for_budget(dims, FULL, 32, floor - 1) is None


# ------------------------------------------------------------------------------------------------
# Red team: slips just outside the lesson's point, and answers that lie. None may score.
# ------------------------------------------------------------------------------------------------
def test_num_items_in_batch_red_team():
    ctx = {"lengths": LENGTHS, "seq_len": SHORT}
    wrong = [ITEMS + 1, ITEMS - 1, ITEMS * 1.01, ITEMS / 4, sum(LENGTHS) - 2, liar(1, ITEMS),
             liar(1.0, ITEMS), FrameReader(), str(ITEMS), [ITEMS], {"tokens": ITEMS}, True]
    assert_no_points("num_items_in_batch", wrong, ctx)


def test_accumulation_peak_red_team(dims):
    ctx = {"dims": dims, "recipe": PEAK_RECIPE}
    right = predict(dims, PEAK_RECIPE)
    lora_grads = right.gradients
    wrong = [right.peak - lora_grads,  # the adapters' gradients forgotten
             right.peak * 1.006, right.peak * 0.994,  # just outside the tolerance
             right.peak / 2**20 * 1e6,  # MiB taken for MB
             right.weights + right.optimizer + right.gradients + 4 * right.activations,  # activations x k
             predict(dims, PEAK_RECIPE.but(lora_rank=0)).peak,  # full fine-tuning
             liar(1.0, right.peak), liar(1, right.peak), FrameReader(), str(right.peak),
             [right.peak], {"peak": right.peak}, True, float("nan")]
    assert_no_points("accumulation_peak", wrong, ctx)


def test_micro_batch_for_budget_red_team(dims):
    ctx = budget_context(dims)
    fake_pair = liar((8, 4), (4, 8))
    fake_dict = liar({"micro_batch": 8, "k": 4}, {"micro_batch": 4, "k": 8})
    wrong = [(8, 4), (16, 2), (4, 4), (4.0001, 8), (1, 32), fake_pair, fake_dict,
             (liar(8, 4), liar(4, 8)), (FrameReader(), FrameReader()), "(4, 8)",
             {"micro": 4}, (4, 8.5), (True, 8)]
    assert_no_points("micro_batch_for_budget", wrong, ctx)


def test_reasonable_forms_pass(dims):
    ctx = budget_context(dims)
    for answer in ((4, 8), [4, 8], (np.int64(4), np.int32(8)), (4.0, 8.0), {"micro_batch": 4, "k": 8},
                   {"micro_batch_size": 4, "gradient_accumulation_steps": 8}, (torch.tensor(4), 8)):
        assert grade("micro_batch_for_budget", answer, ctx).status == PASS, answer
    peak = predict(dims, PEAK_RECIPE).peak
    table = [round(peak / 2**20, 1) * 2**20, round(peak / 2**20) * 2**20] if dims == COURSE else []  # MiB, read back
    for answer in (np.float64(peak), int(peak), *table):
        assert grade("accumulation_peak", answer, {"dims": dims, "recipe": PEAK_RECIPE}).status == PASS
    assert grade("num_items_in_batch", np.int64(ITEMS), {"lengths": LENGTHS, "seq_len": SHORT}).status == PASS


def test_check_refuses_a_context_from_the_learner():
    for name, kwargs in (("num_items_in_batch", {"lengths": [2], "seq_len": 2}),
                         ("accumulation_peak", {"dims": TINY}),
                         ("micro_batch_for_budget", {"budget": 10**15})):
        result = run_check(name, 1, **kwargs)
        assert result.status == FAIL and result.points == 0 and "takes no" in result.message, name
    result = run_check("diagnose_out_of_memory", "a", budget=10**15)
    assert result.status == FAIL and result.points == 0 and "takes no" in result.message
    assert all(EXERCISES[name].measured == () for name in NAMES)


# ------------------------------------------------------------------------------------------------
# The trusted context, the notebook's constants and check calls, and the solution's own answers
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trusted_context_is_the_course_config_and_the_lessons_constants():
    assert EXERCISES["num_items_in_batch"].trusted_context() == {"lengths": LENGTHS, "seq_len": SHORT}
    assert EXERCISES["accumulation_peak"].trusted_context() == {"dims": COURSE, "recipe": PEAK_RECIPE}
    assert EXERCISES["micro_batch_for_budget"].trusted_context() == {
        "dims": COURSE, "recipe": BUDGET_RECIPE, "batch_size": EFFECTIVE_ROWS, "budget": BUDGET}
    assert grade("micro_batch_for_budget", (4, 8)).status == PASS
    assert grade("accumulation_peak", predict(COURSE, PEAK_RECIPE).peak).status == PASS
    assert EXERCISES["diagnose_out_of_memory"].trusted_context() == oom_context()
    assert grade("diagnose_out_of_memory", "a").status == PASS


def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def notebook_values(names, **namespace):
    """The values the solution notebook's top-level assignments give ``names``, evaluated in order."""
    for cell in notebook().cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and all(
                    {n.id for n in ast.walk(t) if isinstance(n, ast.Name)} <= set(names) for t in node.targets):
                exec(compile(ast.Module([node], []), str(NOTEBOOK), "exec"), namespace)
    return {name: namespace[name] for name in names}


def test_the_notebooks_constants_are_the_checks():
    nb = notebook_values(["SHORT", "SEQ", "EFFECTIVE", "STEPS", "LENGTHS", "lora_recipe", "GiB", "budget_recipe",
                          "EFFECTIVE_ROWS", "BUDGET", "oom_recipe", "OOM_BUDGET"], Recipe=Recipe)
    assert (nb["SHORT"], nb["SEQ"], nb["EFFECTIVE"]) == (SHORT, lesson07.SEQ, lesson07.EFFECTIVE)
    assert tuple(nb["LENGTHS"]) == LENGTHS
    k = lesson07.K
    assert nb["lora_recipe"].but(batch_size=nb["EFFECTIVE"], gradient_accumulation_steps=k) == PEAK_RECIPE
    assert (nb["budget_recipe"], nb["EFFECTIVE_ROWS"], nb["BUDGET"]) == (BUDGET_RECIPE, EFFECTIVE_ROWS, BUDGET)
    assert (nb["oom_recipe"], nb["OOM_BUDGET"]) == (OOM_RECIPE, OOM_BUDGET)
    source = "\n".join(c.source for c in notebook().cells)
    assert f'oom_dims = Dims.of(reference_config("{OOM_MODEL}"))' in source
    for label, _ in OOM_OPTIONS.values():  # the notebook lists the options the check judges
        assert label.split(" (")[0] in source, label


def test_the_notebooks_check_calls_pass_only_measurements():
    assert check_calls(notebook()) == {name: [] for name in NAMES}


def test_the_solutions_answers_pass():
    """The code between BEGIN and END SOLUTION, run on the course model's shapes (exercise 2 on the predicted
    breakdown of the k = 1 baseline the notebook measures, within 0.01 % of it there)."""
    regions = [text for _, text in solution_regions(notebook())]
    baseline = predict(COURSE, PEAK_RECIPE.but(gradient_accumulation_steps=1))
    n_adapter = COURSE.lora_params(16) * COURSE.layers
    namespace = {"dims": COURSE, "Recipe": Recipe, "predict": predict, "LENGTHS": list(LENGTHS),
                 "budget_recipe": BUDGET_RECIPE, "BUDGET": BUDGET, "baseline": baseline, "n_adapter": n_adapter,
                 "oom_dims": oom_dims(), "oom_recipe": OOM_RECIPE, "OOM_BUDGET": OOM_BUDGET}
    for text in regions:
        exec(text, namespace)
    contexts = {"num_items_in_batch": {"lengths": LENGTHS, "seq_len": SHORT},
                "accumulation_peak": {"dims": COURSE, "recipe": PEAK_RECIPE},
                "micro_batch_for_budget": {"dims": COURSE, "recipe": BUDGET_RECIPE, "batch_size": EFFECTIVE_ROWS,
                                           "budget": BUDGET},
                "diagnose_out_of_memory": oom_context()}
    answers = {"num_items_in_batch": namespace["items"], "accumulation_peak": namespace["peak_k4"],
               "micro_batch_for_budget": namespace["split_answer"], "diagnose_out_of_memory": namespace["fix"]}
    for name, answer in answers.items():
        result = grade(name, answer, contexts[name])
        assert result.status == PASS, (name, result.message)


def test_the_predictions_come_before_their_measurements_and_are_shown_beside_them():
    cells = [c.source for c in notebook().cells]
    for name, reveal in (("num_items_in_batch", 'normalise="tokens"'), ("accumulation_peak", "reports = {1: baseline")):
        asked = next(i for i, c in enumerate(cells) if f'check("{name}"' in c)
        measured = next(i for i, c in enumerate(cells) if reveal in c)
        shown = next(i for i, c in enumerate(cells) if f'show_prediction("{name}"' in c)
        assert asked < measured < shown, name
