"""Every exercise against answers that lie about themselves, and learner code that tries to escape.

Each case must get no points and no traceback. The per-lesson test files add each exercise's plausible
wrong answers and the cheats specific to it; tests/test_grade.py attacks the batch grader itself.
"""

import pytest
from casebook import Escapes, FrameReader, grade, liar

from helpers.checks import EXERCISES, PASS, _load_lesson_checks, plain

pytestmark = pytest.mark.usefixtures("lenient_checks")
_load_lesson_checks()
VALUE_EXERCISES = sorted(n for n, ex in EXERCISES.items() if ex.probe is None and not ex.measured)
CODE_EXERCISES = sorted(n for n, ex in EXERCISES.items() if ex.probe is not None and ex.name != "fit_the_budget")


# The liars (tests/casebook.py); a FrameReader claim is the check's target, looked for in the callers' frames.
LIARS = {
    "float subclass reading the stack": liar(0.0, FrameReader()),
    "int subclass reading the stack": liar(0, FrameReader()),
    "registered numbers.Real": FrameReader(),
    "str subclass whose strip lies": liar("bananas", "activations"),
    "dict subclass whose get/[]/items lie": liar({}, {"answer": FrameReader()}),
    "list subclass that lies": liar([0, 0], [FrameReader(), FrameReader()]),
    "tuple of lying floats": (liar(0.0, FrameReader()), liar(0.0, FrameReader())),
    "an object that raises SystemExit": Escapes(),
}


def test_plain_reads_what_is_stored_not_what_methods_say():
    lying_float, lying_int = liar(3.0, FrameReader()), liar(7, FrameReader())
    assert plain(lying_float) == 3.0 and type(plain(lying_float)) is float
    assert plain(lying_int) == 7 and type(plain(lying_int)) is int
    lying_str = liar("bananas", "activations")
    assert plain(lying_str) == "bananas" and type(plain(lying_str)) is str
    assert plain(liar({"a": 2}, {"a": FrameReader()})) == {"a": 2}
    assert plain(liar([1, 2], [FrameReader(), FrameReader()])) == [1, 2]
    for answer in (FrameReader(), Escapes()):
        with pytest.raises(ValueError):
            plain(answer)


def test_reasonable_forms_become_plain_numbers():
    import numpy as np
    import torch

    assert [plain(x) for x in (np.int64(3), np.float32(0.5), torch.tensor(2.0), np.bool_(True))] == [3, 0.5, 2.0, True]
    assert type(plain(np.int64(3))) is int
    with pytest.raises(ValueError, match="one number"):
        plain(torch.zeros(3))


@pytest.mark.parametrize("name", VALUE_EXERCISES)
@pytest.mark.parametrize("kind", list(LIARS))
def test_a_lying_answer_gets_nothing(name, kind):
    result = grade(name, LIARS[kind])
    assert result.status != PASS and result.points == 0, (kind, result.message)


def _raises_system_exit(*args, **kwargs):
    raise SystemExit(0)


def _raises_keyboard_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _returns_a_liar(*args, **kwargs):
    return FrameReader()


@pytest.mark.parametrize("name", CODE_EXERCISES)
@pytest.mark.parametrize("fn", [_raises_system_exit, _raises_keyboard_interrupt, _returns_a_liar])
def test_learner_code_that_escapes_or_lies_gets_feedback(name, fn):
    result = grade(name, fn)
    assert result.status != PASS and result.points == 0
    assert result.message


def test_check_takes_no_context_from_the_notebook():
    from helpers.checks import run_check

    result = run_check("adamw_state_bytes", 8, n_params=1)
    assert result.status != PASS and "takes no n_params" in result.message
