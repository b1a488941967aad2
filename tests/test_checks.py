"""Each exercise check: passes the right answer, says "not attempted" to a blank, hints at wrong ones."""

import pytest
from casebook import assert_grades, registered

from helpers.checks import FAIL, PASS, SKIP, check, run_check
from helpers.memory import MemoryReport

pytestmark = pytest.mark.usefixtures("lenient_checks")



def report(**sizes):
    return MemoryReport(**{"weights": 500, "gradients": 0, "optimizer": 1000, "activations": 1900, **sizes})


def cases(dims):
    p = dims.params
    logits = 8 * 256 * dims.vocab * 4
    return {
        # name: (right answer, context, [wrong answers, each with a word the hint must contain])
        "weights_7b": ((7e9 * 2, 7e9 * 0.5), {}, [((7e9 * 4, 7e9 * 0.5), "fp32"), ((7e9 * 2, 7e9), "int8"),
                                                   ((7e9 * 16, 7e9 * 4), "bits"), (14e9, "two numbers")]),
        "adamw_state_bytes": (8 * p, {"n_params": p},
                              [(4 * p, "one fp32 moment"), (16 * p, "weights and gradients"),
                               (p, "number of parameters"), (8 * p / 2**20, "MiB"), (8 * p / 1e9, "GB"),
                               ("8P", "number")]),
        "largest_category": ("activations", {"report": report()},
                             [("optimizer", "another category"), ("weights", "another category"),
                              ("bananas", "one of")]),
        "logits_bytes": (logits, {"vocab": dims.vocab, "hidden": dims.hidden},
                         [(logits / 4, "elements"), (4 * 128 * dims.vocab * 4, "4 x 128"),
                          (8 * 256 * dims.hidden * 4, "hidden size"), (256 * dims.vocab * 4, "batch size"),
                          (8 * 255 * dims.vocab * 4, "every position")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("00")


@pytest.mark.parametrize("name", ["weights_7b", "adamw_state_bytes", "largest_category", "logits_bytes"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, **context)


def test_largest_category_follows_the_report():
    optimizer_heavy = report(optimizer=3000)
    assert run_check("largest_category", "optimizer state", report=optimizer_heavy).status == PASS
    assert run_check("largest_category", "activations", report=optimizer_heavy).status == FAIL
    assert "run the measurement" in run_check("largest_category", "weights").message


def test_strict_mode_raises_for_the_test_suite(monkeypatch):
    monkeypatch.setenv("COURSE_STRICT_CHECKS", "1")
    with pytest.raises(AssertionError, match="not yet"):
        check("logits_bytes", 1)
    assert check("largest_category", "activations", report=report()).passed


def test_unknown_exercise_is_a_message_not_a_traceback():
    result = check("no_such_exercise", 3)
    assert result.status == FAIL and "no exercise called" in result.message
    assert "✗" in str(result) and "<div" in result._repr_html_()


def test_answers_in_other_forms():
    assert run_check("largest_category", "Activations.", report=report()).status == PASS
    assert run_check("weights_7b", (14e9, None)).status == SKIP
    assert "n_params" in run_check("adamw_state_bytes", 8e9).message  # context missing: say what to pass
