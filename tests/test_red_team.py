"""Every exercise against answers that lie about themselves, and learner code that tries to escape.

Each case must get no points and no traceback. The per-lesson test files add each exercise's plausible
wrong answers and the cheats specific to it; tests/test_grade.py attacks the batch grader itself.
"""

import numbers
import sys

import pytest
from casebook import grade

from helpers.checks import EXERCISES, PASS, _load_lesson_checks, plain

pytestmark = pytest.mark.usefixtures("lenient_checks")
_load_lesson_checks()
VALUE_EXERCISES = sorted(n for n, ex in EXERCISES.items() if ex.probe is None and not ex.measured)
CODE_EXERCISES = sorted(n for n, ex in EXERCISES.items() if ex.probe is not None and ex.name != "fit_the_budget")


def _target_from_the_stack(default=0.0):
    """What a cheating answer does: look for the check's target in its callers' frames."""
    frame = sys._getframe(2)
    while frame:
        for name, value in frame.f_locals.items():
            if name in ("target", "want", "expected", "right", "answer") and type(value) in (int, float):
                return float(value)
        frame = frame.f_back
    return default


class FrameReader(float):
    def __float__(self):
        return _target_from_the_stack()

    def __eq__(self, other):
        return True

    __hash__ = float.__hash__

    def __abs__(self):
        return 0.0

    def __sub__(self, other):
        return 0.0

    __rsub__ = __sub__


class IntReader(int):
    def __index__(self):
        return int(_target_from_the_stack())

    __eq__ = FrameReader.__eq__
    __hash__ = int.__hash__


class RealLiar:
    """Not a float at all, registered as a real number."""

    __float__ = FrameReader.__float__
    __eq__ = FrameReader.__eq__
    __hash__ = object.__hash__


numbers.Real.register(RealLiar)


class LyingStr(str):
    def strip(self, *chars):
        return "activations"

    lower = upper = casefold = strip

    def __eq__(self, other):
        return True

    __hash__ = str.__hash__

    def __contains__(self, item):
        return True


class LyingDict(dict):
    def get(self, key, default=None):
        return _target_from_the_stack(1)

    __getitem__ = get

    def items(self):
        return [("answer", 1)]

    def __contains__(self, key):
        return True


class LyingList(list):
    def __iter__(self):
        return iter([_target_from_the_stack(), _target_from_the_stack()])

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return _target_from_the_stack()


class Escapes:
    """An object whose every method raises SystemExit."""

    def __getattr__(self, name):
        raise SystemExit(0)

    def __float__(self):
        raise SystemExit(0)

    def __eq__(self, other):
        raise SystemExit(0)

    __hash__ = object.__hash__


LIARS = {
    "float subclass reading the stack": FrameReader(0.0),
    "int subclass reading the stack": IntReader(0),
    "registered numbers.Real": RealLiar(),
    "str subclass whose strip lies": LyingStr("bananas"),
    "dict subclass whose get/[]/items lie": LyingDict(),
    "list subclass that lies": LyingList([0, 0]),
    "tuple of lying floats": (FrameReader(0.0), FrameReader(0.0)),
    "an object that raises SystemExit": Escapes(),
}


def test_plain_reads_what_is_stored_not_what_methods_say():
    assert plain(FrameReader(3.0)) == 3.0 and type(plain(FrameReader(3.0))) is float
    assert plain(IntReader(7)) == 7 and type(plain(IntReader(7))) is int
    assert plain(LyingStr("bananas")) == "bananas" and type(plain(LyingStr("x"))) is str
    assert plain(LyingDict(a=2)) == {"a": 2}
    assert plain(LyingList([1, 2])) == [1, 2]
    for liar in (RealLiar(), Escapes()):
        with pytest.raises(ValueError):
            plain(liar)


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
    return RealLiar()


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
