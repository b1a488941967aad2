"""Exercise checks with feedback a learner can act on.

    check("adamw_state_bytes", adamw_state_bytes)

prints one of three things and never raises a bare traceback:
    ✓ passed: what was right
    ✗ not yet: a specific hint about what looks wrong
    … not attempted: the answer is still ``None`` (or the cell raised NotImplementedError)

Each exercise is a function registered with ``@exercise(name)``: it receives the learner's answer
and returns ``(passed, message)``. With the environment variable ``COURSE_STRICT_CHECKS=1`` (set by
the tests when they run the solution notebooks) a check that does not pass raises ``AssertionError``,
so a solution that stops passing fails the test suite.
"""

from __future__ import annotations

import html
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass

PASS, FAIL, SKIP = "passed", "not yet", "not attempted"
_SYMBOL = {PASS: "✓", FAIL: "✗", SKIP: "…"}
_COLOUR = {PASS: "#1a7f37", FAIL: "#cf222e", SKIP: "#6e7781"}


@dataclass
class CheckResult:
    name: str
    status: str
    message: str
    points: float = 0.0
    max_points: float = 1.0

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __str__(self) -> str:
        return f"{_SYMBOL[self.status]} {self.name}: {self.status}. {self.message[:1].upper()}{self.message[1:]}"

    def _repr_html_(self) -> str:
        return (f"<div style='border-left:4px solid {_COLOUR[self.status]};padding:4px 8px'>"
                f"<b>{_SYMBOL[self.status]} {html.escape(self.name)}: {self.status}.</b> "
                f"{html.escape(self.message[:1].upper() + self.message[1:])}</div>")

    __repr__ = __str__


@dataclass
class Exercise:
    name: str
    fn: Callable
    points: float
    lesson: str


EXERCISES: dict[str, Exercise] = {}


def exercise(name: str, points: float = 1.0, lesson: str = ""):
    """Register a check function ``fn(answer, **context) -> (passed, message)`` under ``name``."""
    def register(fn):
        EXERCISES[name] = Exercise(name, fn, points, lesson)
        return fn
    return register


def _blank(answer) -> bool:
    if answer is None or answer is Ellipsis:
        return True
    if isinstance(answer, (tuple, list)) and answer and all(a is None or a is Ellipsis for a in answer):
        return True
    return isinstance(answer, str) and not answer.strip()


def run_check(name: str, answer=None, **context) -> CheckResult:
    """Evaluate exercise ``name`` on ``answer`` and return the result (no printing, no raising)."""
    _load_lesson_checks()
    ex = EXERCISES.get(name)
    if ex is None:
        known = ", ".join(sorted(EXERCISES)) or "none loaded"
        return CheckResult(name, FAIL, f"there is no exercise called {name!r} (known: {known}).", 0, 0)
    if _blank(answer):
        return CheckResult(name, SKIP, "replace the `None` (or the `raise NotImplementedError()` line) "
                                       "with your answer, run the cell, then run this check again.",
                           0, ex.points)
    if isinstance(answer, (tuple, list)) and any(a is None or a is Ellipsis for a in answer):
        return CheckResult(name, SKIP, "some values are still `None`: fill in every one, then run this "
                                       "check again.", 0, ex.points)
    try:
        passed, message = ex.fn(answer, **context)
    except Exception as err:  # a malformed answer must produce feedback, not a traceback
        passed, message = False, (f"your answer could not be checked ({type(err).__name__}: {err}). "
                                  "Look at the type the exercise asks for.")
    status = PASS if passed else FAIL
    return CheckResult(name, status, message, ex.points if passed else 0.0, ex.points)


def check(name: str, answer=None, **context) -> CheckResult:
    """Check an exercise answer and show friendly feedback (the notebook-facing entry point)."""
    result = run_check(name, answer, **context)
    if os.environ.get("COURSE_STRICT_CHECKS") == "1" and not result.passed:
        raise AssertionError(str(result))
    return result


def _load_lesson_checks() -> None:
    from . import exercises  # noqa: F401  (registers every lesson's exercises)


# ------------------------------------------------------------------------------------------------
# Small tools for writing checks
# ------------------------------------------------------------------------------------------------
def as_number(answer, what: str = "a number") -> float:
    """The answer as a float, or a ValueError that says what was expected."""
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        try:
            import torch

            if isinstance(answer, torch.Tensor) and answer.numel() == 1:
                return float(answer)
        except ImportError:  # pragma: no cover
            pass
        raise ValueError(f"expected {what}, got {type(answer).__name__} {answer!r:.60}")
    value = float(answer)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"expected {what}, got {value}")
    return value


def close(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * abs(target)


def ratio_hint(value: float, target: float, hints: dict[float, str], rel: float = 0.03) -> str | None:
    """If ``value`` is about ``factor`` times ``target`` for a known mistake, return its hint."""
    if target == 0:
        return None
    r = value / target
    for factor, hint in hints.items():
        if abs(r - factor) <= rel * factor:
            return hint
    return None


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} bytes"
