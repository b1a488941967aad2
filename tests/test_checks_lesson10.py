"""Lesson 10's checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint, and
wrong, lying or cheating answers never get points."""


import nbformat
import pytest
import torch
import torch.nn.functional as F
from casebook import (
    COURSE,
    FrameReader,
    RealLiar,
    assert_grades,
    assert_no_points,
    check_calls,
    grade,
    liar,
    registered,
)

from helpers.checks import EXERCISES, FAIL, PASS, SKIP
from helpers.constants import ROOT
from helpers.estimate import Dims, loss_bytes
from helpers.exercises.lesson10 import OPTIONS, PREDICT_ROWS, PREDICT_SEQ, PREDICT_VOCAB, scenario_peaks
from helpers.models import reference_config
from helpers.planner import GPUS

pytestmark = pytest.mark.usefixtures("lenient_checks")

NOTEBOOK = ROOT / "solutions" / "10_logits_and_the_loss.ipynb"
NAMES = {"loss_bytes_prediction", "answer_only_loss", "fix_the_long_context_run"}
CONTEXT = {"dims": COURSE}
WANT = 3 * PREDICT_ROWS * PREDICT_SEQ * PREDICT_VOCAB * 4


def test_every_exercise_is_registered_called_and_tested():
    assert registered("10") == NAMES
    assert set(check_calls(nbformat.read(NOTEBOOK, as_version=4))) == NAMES
    assert {n: EXERCISES[n].kind for n in NAMES} == {"loss_bytes_prediction": "predict", "answer_only_loss": "code",
                                                      "fix_the_long_context_run": "diagnose"}


def test_the_prediction_is_the_formula_and_each_slip_gets_its_hint():
    assert WANT == loss_bytes(Dims(**{**COURSE.__dict__, "vocab": PREDICT_VOCAB}), PREDICT_ROWS, PREDICT_SEQ)
    assert_grades("loss_bytes_prediction", WANT, [
        (WANT / 3, "three are alive"), (2 * WANT / 3, "two of the three"), (4 * WANT / 3, "freed"),
        (WANT / 4, "fp32"), (WANT / 2, "upcasts"), (WANT * COURSE.hidden / PREDICT_VOCAB, "hidden states"),
        (WANT / 2**20, "MiB"), (12345, "count the tensors")], CONTEXT)
    assert grade("loss_bytes_prediction", WANT * 1.009, CONTEXT).status == PASS
    assert_no_points("loss_bytes_prediction", [WANT * 1.02, liar(1.0, WANT), RealLiar(WANT), FrameReader(),
                                               "100,663,296", [WANT]], CONTEXT)


def good(model, batch, answer_len):
    logits = model(**batch, logits_to_keep=answer_len + 1).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["input_ids"][:, -answer_len:].flatten()).item()


def as_tensor(model, batch, answer_len):
    logits = model(**batch, logits_to_keep=torch.arange(batch["input_ids"].shape[1] - answer_len - 1,
                                                        batch["input_ids"].shape[1])).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, -answer_len:].flatten())


def misaligned(model, batch, answer_len):
    logits = model(**batch, logits_to_keep=answer_len).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, -answer_len:].flatten()).item()


def every_position(model, batch, answer_len):
    logits = model(**batch).logits[:, -answer_len - 1:-1]
    return F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, -answer_len:].flatten()).item()


def summed(model, batch, answer_len):
    logits = model(**batch, logits_to_keep=answer_len + 1).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, -answer_len:].flatten(), reduction="sum").item()


def constant(model, batch, answer_len):
    return 5.0


def lying(model, batch, answer_len):
    return liar(0.0, FrameReader())


def no_model_call(model, batch, answer_len):  # a number that never went through the output layer
    return float(torch.log(torch.tensor(float(model.config.vocab_size))))


@pytest.mark.parametrize("fn", [good, as_tensor])
def test_the_answer_loss_passes_when_it_is_right_and_lean(fn):
    result = grade("answer_only_loss", fn)
    assert result.status == PASS and result.points == 2, result.message


@pytest.mark.parametrize("fn, words", [
    (misaligned, "one position earlier"), (every_position, "logits_to_keep"), (summed, "summed loss"),
    (constant, "never ran"), (lying, "never ran"), (no_model_call, "never ran"),
    (lambda m, b, a: 1 / 0, "ZeroDivisionError"), (lambda m, b, a: "2.3", "returned str"),
])
def test_a_wrong_answer_loss_gets_its_sentence_and_no_points(fn, words):
    result = grade("answer_only_loss", fn)
    assert result.status == FAIL and result.points == 0 and words in result.message, result.message


def test_blanks_are_not_attempted():
    for name, context in (("loss_bytes_prediction", CONTEXT), ("answer_only_loss", None),
                          ("fix_the_long_context_run", None)):
        assert grade(name, None, context).status == SKIP


def test_only_the_chunked_loss_fixes_the_long_context_run():
    d = Dims.of(reference_config("qwen2.5-7b"))
    peaks, budget = scenario_peaks(d), GPUS["L4"].budget
    assert peaks["before"] > budget and [k for k in OPTIONS if peaks[k] <= budget] == ["a"]
    assert_grades("fix_the_long_context_run", "a", [("b", "moments"), ("c", "still whole"), ("d", "activations")])
    assert grade("fix_the_long_context_run", " (A) ").status == PASS
    assert_no_points("fix_the_long_context_run", ["e", "ab", liar("b", "a"), FrameReader(), 1])
