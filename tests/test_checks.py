"""Lesson 00's exercise checks (and the check entry points): right answers pass, blanks are "not attempted",
plausible mistakes get a specific hint, and wrong or cheating answers never get points."""

import numpy as np
import pytest
from casebook import COURSE, TINY, FrameReader, RealLiar, assert_grades, assert_no_points, grade, liar, registered

from helpers.checks import EXERCISES, FAIL, PASS, SKIP, check, run_check
from helpers.constants import ROOT
from helpers.estimate import Dims, Recipe, predict
from helpers.exercises import lesson00
from helpers.memory import MemoryReport
from helpers.models import reference_config

pytestmark = pytest.mark.usefixtures("lenient_checks")

P7 = 7e9
NF4_CODES, NF4_ABSMAX, NF4_DOUBLE = P7 * 0.5, P7 * (0.5 + 4 / 64), P7 * (0.5 + 1 / 64 + 4 / (64 * 256))


B, T = lesson00.LOGITS_BATCH, lesson00.LOGITS_SEQ  # exercise 4: Llama-3-8B's logits for 8 x 1,024 tokens


def cases(d):
    p = d.params
    logits = B * T * d.vocab * 4
    ctx = {"dims": d}
    return {
        # name: (right answer, context, [wrong answers, each with a word the hint must contain])
        "weights_7b": ((P7 * 2, NF4_ABSMAX), None,
                       [((P7 * 4, NF4_CODES), "fp32"), ((P7 * 2, P7), "int8"), ((P7 * 16, P7 * 4), "bits"),
                        (14e9, "two numbers"), ((P7 * 2, P7 * (0.5 + 2 / 64)), "fp32"),
                        ((P7 * 2, NF4_CODES * 2**30 / 1e9), "GiB"), ((14 * 2**30, NF4_CODES), "GiB")]),
        "adamw_state_bytes": (8 * p, ctx,
                              [(4 * p, "one fp32 moment"), (16 * p, "weights and gradients"),
                               (p, "number of parameters"), (8 * p / 2**20, "MiB"), (8 * p / 1e9, "GB"),
                               ("8P", "number"), (8 * p * 2**20 / 1e6, "MB and MiB")]),
        "largest_category": ("activations", ctx,
                             [("optimizer", "another category"), ("weights", "another category"),
                              ("bananas", "one of"), (3, "string")]),
        "logits_bytes": (logits, ctx,
                         [(logits / 4, "elements"), (logits / 2, "2 bytes"), (B * T * d.hidden * 4, "hidden size"),
                          (T * d.vocab * 4, "batch size"), (B * (T - 1) * d.vocab * 4, "every position"),
                          (logits / 2**20, "MiB"), (logits / 2**30, "GiB"), (logits * 3, "three"),
                          (logits * 8, "bits")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("00")


@pytest.mark.parametrize("name", ["weights_7b", "adamw_state_bytes", "largest_category", "logits_bytes"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, context)


# ------------------------------------------------------------------------------------------------
# Red team: plausible slips just outside the lesson's point, and answers that lie. None may score.
# ------------------------------------------------------------------------------------------------
# Numbers that lie (tests/casebook.py), claiming to be the course model's AdamW state.
LYING_FLOAT, REAL_LIAR = liar(1.0, 8.0 * COURSE.params), RealLiar(8.0 * COURSE.params)


def test_weights_7b_red_team():
    wrong = [
        (P7 * 2, P7 * 0.5 * 2**30 / 1e9),  # nf4 codes written as GiB x 1e9: between the two honest answers
        (P7 * 2, P7 * 0.5 * 1.05),  # "a little over half a byte": not any honest count
        (P7 * 2, P7 * (0.5 + 4 / 64) * 1.01),  # 1 % off the absmax answer
        (P7 * 2, P7 * (0.5 + 2 / 64)),  # fp16 absmax
        (P7 * 2, P7 * (0.5 + 4 / 32)),  # absmax per 32 weights
        (P7 * 2, P7 * (0.5 + 4 / 128)),  # absmax per 128 weights
        (P7 * 2 * 1.01, NF4_CODES),  # bf16 1 % off
        (14 * 2**30, NF4_CODES),  # 14 "GB" as GiB
        (P7 * 2 / 1e9, NF4_CODES / 1e9),  # GB
        (P7 * 2, P7 * 4),  # nf4 as bits
        (P7 * 2, P7 * 0.5 * 8),
        ((P7 * 2, NF4_CODES, 0),),
        (P7 * 2, "3.5e9"),
        {"bf16": P7 * 2, "nf4": P7},
        {"fp16": P7 * 2, "nf4": NF4_CODES},
        liar({"bf16": 1, "nf4": 1}, {"bf16": 2 * P7, "nf4": NF4_ABSMAX}),  # plain() reads the stored items
        (LYING_FLOAT, LYING_FLOAT),
        (REAL_LIAR, REAL_LIAR),
        (FrameReader(), FrameReader()),
        (True, True),
    ]
    assert_no_points("weights_7b", wrong)


def test_adamw_state_bytes_red_team(dims):
    p, ctx = dims.params, {"dims": dims}
    forgot_norm = 8 * (p - dims.hidden)
    wrong = [forgot_norm, 8 * (p - dims.embedding_params), 8 * p * 1.005, 8 * p * 0.995, 8 * p + 8 * 1000,
             float(f"{8 * p:.4g}"),  # rounded to four significant digits
             8 * p * 2**20 / 1e6, 12 * p, 8 * (p + dims.embedding_params), LYING_FLOAT, REAL_LIAR,
             FrameReader(), "8 * n_params", [8 * p], {"bytes": 8 * p}, True, float("nan"), float("inf")]
    assert_no_points("adamw_state_bytes", wrong, ctx)


def test_adamw_state_bytes_accepts_the_step_counters_and_other_number_types(dims):
    from helpers.estimate import trainable_tensors

    p, ctx = dims.params, {"dims": dims}
    tensors = trainable_tensors(dims, Recipe())
    for right in (8 * p, 8 * p + 4 * tensors, float(8 * p), np.int64(8 * p),
                  np.float32(8 * p) if float(np.float32(8 * p)) == 8 * p else 8 * p, 2 * 4 * p):
        assert grade("adamw_state_bytes", right, ctx).status == PASS, right


def test_largest_category_red_team(dims):
    ctx = {"dims": dims}
    wrong = [liar("optimizer", "activations"), liar("weights", "activations"), "weights", "gradients",
             "optimizer state", "the largest", "activations weights", ["activations"], {"category": "activations"},
             1, True, MemoryReport(activations=10)]
    assert_no_points("largest_category", wrong, ctx)
    assert grade("largest_category", liar("activations", "activations"), ctx).status == PASS  # its characters are right


def test_largest_category_is_clear_in_the_lessons_prediction():
    """The trusted answer comes from predict() at batch 8 x 128 (the lesson asserts its measurement is within
    10 % of it): the largest category must beat the next by more than that. And it is a prediction, not a
    reading: at the lesson's measured 4 x 128 another category is the largest."""
    sizes = predict(COURSE, Recipe(batch_size=8, seq_len=128)).as_dict()
    first, second = sorted(sizes.values(), reverse=True)[:2]
    assert max(sizes, key=sizes.get) == "activations"
    assert first > 1.25 * second
    measured_before = predict(COURSE, Recipe(batch_size=4, seq_len=128)).as_dict()
    assert max(measured_before, key=measured_before.get) == "optimizer"


def test_largest_category_hints_at_what_grows_with_the_batch():
    message = grade("largest_category", "optimizer", {"dims": COURSE}).message
    assert "4 x 128" in message and "batch" in message


def test_largest_category_takes_no_report_from_the_learner():
    forged = MemoryReport(weights=500, optimizer=3000, activations=1900)
    result = run_check("largest_category", "optimizer", report=forged)
    assert result.status == FAIL and result.points == 0 and "takes no report" in result.message


def test_logits_bytes_red_team(dims):
    ctx = {"dims": dims}
    target = B * T * dims.vocab * 4
    wrong = [target + 1, target - 4, target * 1.0001, B * T * (dims.vocab + 1) * 4, B * T * dims.vocab * 2,
             B * (T // 2) * dims.vocab * 4, target / 1e6, LYING_FLOAT, REAL_LIAR, FrameReader(),
             str(target), [target], True]
    assert_no_points("logits_bytes", wrong, ctx)


LLAMA3 = Dims.of(reference_config("llama-3-8b"))


def test_logits_bytes_is_for_a_model_the_lesson_does_not_run():
    """Llama-3-8B's 128,256-token vocabulary: the lesson's formula with the course model's numbers fails."""
    assert (LLAMA3.vocab, LLAMA3.tied) == (128_256, False)
    ctx = {"dims": LLAMA3}
    assert grade("logits_bytes", B * T * 128_256 * 4, ctx).status == PASS
    assert "course model's vocabulary" in grade("logits_bytes", B * T * COURSE.vocab * 4, ctx).message
    # the lesson's own batches with either vocabulary
    assert_no_points("logits_bytes", [4 * 128 * COURSE.vocab * 4, 8 * 256 * COURSE.vocab * 4,
                                      4 * 128 * LLAMA3.vocab * 4, 8 * 128 * LLAMA3.vocab * 4], ctx)


# ------------------------------------------------------------------------------------------------
# The trusted context and the solution's own answers
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trusted_context_is_the_course_config():
    for name in ("adamw_state_bytes", "largest_category"):
        assert EXERCISES[name].trusted_context() == {"dims": COURSE}, name
    assert EXERCISES["logits_bytes"].trusted_context() == {"dims": LLAMA3}
    assert EXERCISES["weights_7b"].trusted_context() == {"params": 7e9}
    assert EXERCISES["adamw_state_bytes"].measured == ()  # nothing is taken from the learner's namespace


def test_every_exercise_states_its_kind_and_a_tolerance_its_judge_keeps():
    kinds = {name: EXERCISES[name].kind for name in registered("00")}
    assert kinds == {"weights_7b": "calculate", "adamw_state_bytes": "predict", "largest_category": "predict",
                     "logits_bytes": "calculate"}
    d = COURSE
    p = d.params
    tol = EXERCISES["adamw_state_bytes"].tolerance
    assert tol == lesson00.ADAMW_TOLERANCE > 0
    assert grade("adamw_state_bytes", 8 * p * (1 + 2 * tol), {"dims": d}).status == FAIL  # outside: never passes
    assert EXERCISES["logits_bytes"].tolerance == 0
    tol = EXERCISES["weights_7b"].tolerance
    assert grade("weights_7b", (14e9, 3.5e9 * (1 + tol / 2))).status == PASS
    assert grade("weights_7b", (14e9, 3.5e9 * (1 + 2 * tol))).status == FAIL


def test_the_solutions_answers_pass():
    d = COURSE
    n_params = d.params
    answers = {  # the expressions between BEGIN SOLUTION and END SOLUTION in the lesson's notebook
        "weights_7b": (7e9 * 2, 7e9 * (0.5 + 4 / 64)),
        "adamw_state_bytes": 2 * 4 * n_params,
        "largest_category": "activations",
        "logits_bytes": 8 * 1024 * LLAMA3.vocab * 4,
    }
    for name, answer in answers.items():
        result = grade(name, answer, {"weights_7b": None, "logits_bytes": {"dims": LLAMA3}}.get(name, {"dims": d}))
        assert result.status == PASS, (name, result.message)


def test_solution_check_calls_pass_no_learner_values():

    import nbformat

    nb = nbformat.read(ROOT / "solutions" / "00_where_the_memory_goes.ipynb", 4)
    calls = [c.source for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith("check(")]
    assert calls == ['check("weights_7b", (bf16_bytes_7b, nf4_bytes_7b))',
                     'check("adamw_state_bytes", adamw_state_bytes)', 'check("largest_category", largest)',
                     'check("logits_bytes", logits_bytes)']
    assert (lesson00.PARAMS_7B, lesson00.REPORT_BATCH, lesson00.REPORT_SEQ) == (7e9, 8, 128)
    assert (lesson00.LOGITS_MODEL, lesson00.LOGITS_BATCH, lesson00.LOGITS_SEQ) == ("llama-3-8b", 8, 1024)
    source = "\n".join(c.source for c in nb.cells)
    assert "train_batch(batch_size=8, seq_len=128)" in source and "8 * 1024 * llama3.vocab * 4" in source
    assert 'reference_config("llama-3-8b")' in source


def test_weights_7b_accepts_every_honest_nf4_count():
    for nf4 in (NF4_CODES, NF4_ABSMAX, NF4_DOUBLE, P7 * (0.5 + 1 / 64), 3.94e9, 3.5e9, 3.61e9, np.float64(NF4_CODES)):
        assert grade("weights_7b", (14e9, nf4)).status == PASS, nf4
    assert grade("weights_7b", {"bf16": 14e9, "nf4": NF4_CODES}).status == PASS
    assert grade("weights_7b", [np.int64(14_000_000_000), int(NF4_CODES)]).status == PASS


# ------------------------------------------------------------------------------------------------
# The entry points
# ------------------------------------------------------------------------------------------------
def test_strict_mode_raises_for_the_test_suite(monkeypatch):
    monkeypatch.setenv("COURSE_STRICT_CHECKS", "1")
    with pytest.raises(AssertionError, match="not yet"):
        check("weights_7b", (1, 1))
    assert check("weights_7b", (14e9, 3.5e9)).passed


def test_unknown_exercise_is_a_message_not_a_traceback():
    result = check("no_such_exercise", 3)
    assert result.status == FAIL and "no exercise called" in result.message
    assert "✗" in str(result) and "<div" in result._repr_html_()


def test_answers_in_other_forms():
    assert grade("largest_category", "Activations.", {"dims": TINY}).status == PASS
    assert grade("largest_category", "  activations  and temporaries ", {"dims": TINY}).status == PASS
    assert run_check("weights_7b", (14e9, None)).status == SKIP
    result = run_check("adamw_state_bytes", 8e9, n_params=10**9)  # the old keyword: refused, with a sentence
    assert result.status == FAIL and "takes no n_params" in result.message
