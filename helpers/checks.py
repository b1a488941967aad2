"""Exercise checks with feedback a learner can act on.

    check("adamw_state_bytes", adamw_state_bytes)

prints one of three things and never raises a bare traceback:
    ✓ passed: what was right
    ✗ not yet: a specific hint about what looks wrong
    … not attempted: the answer is still ``None`` (or the cell raised NotImplementedError)

A check has two halves, so that a grade can be computed by code the answer never touches:

1. **What crosses the boundary.** The learner's answer is turned into plain data: exact built-in
   ``None, bool, int, float, str, list, dict`` (``plain``). Subclasses are read through the built-in
   type's own methods (a ``float`` subclass gives its stored value, not what its ``__float__`` says);
   numpy scalars and one-element tensors become numbers; a ``BitsAndBytesConfig``, ``LoraConfig`` or
   ``MemoryReport`` becomes a dict of its fields; anything else is refused with a sentence. A *code*
   answer (a function) is instead run by the exercise's ``probe`` on inputs the probe builds itself,
   and what it did comes back as plain data (which parameters require grad, gradients after the
   probe's own backward, ...).
2. **The verdict** (``verdict``): the exercise's judge compares that data with a *trusted context*
   that its ``context()`` function computes from the lesson's fixed inputs (the course model's
   config, the lesson's constants) — never from the learner's variables. A few exercises judge
   against the lesson's own measurements (``measured=(...)``): a notebook passes them to ``check``;
   the batch grader takes them from its own run of the solution notebook instead.

In a notebook both halves run in the learner's process. The batch grader (``helpers.tools.grade``) runs the
first half in the submission's sandboxed kernel (the probe in a separate short-lived process) and the
second in its own process.

With the environment variable ``COURSE_STRICT_CHECKS=1`` (set by the tests when they run the
solution notebooks) a check that does not pass raises ``AssertionError``, so a solution that stops
passing fails the test suite.
"""

from __future__ import annotations

import enum
import html
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

PASS, FAIL, SKIP = "passed", "not yet", "not attempted"
_SYMBOL = {PASS: "✓", FAIL: "✗", SKIP: "…"}
_COLOUR = {PASS: "#1a7f37", FAIL: "#cf222e", SKIP: "#6e7781"}
MAX_ITEMS = 100_000  # elements in one answer: far above any exercise's, far below a memory problem
MAX_DEPTH = 8


@dataclass
class CheckResult:
    name: str
    status: str
    message: str
    points: float = 0.0
    max_points: float = 1.0
    answer: object = None  # the plain data judged (None for code answers): recorded beside the output

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __str__(self) -> str:
        return f"{_SYMBOL[self.status]} {self.name}: {self.status}. {self.message[:1].upper()}{self.message[1:]}"

    def _repr_html_(self) -> str:
        return (f"<div style='border-left:4px solid {_COLOUR[self.status]};padding:4px 8px'>"
                f"<b>{_SYMBOL[self.status]} {html.escape(self.name)}: {self.status}.</b> "
                f"{html.escape(self.message[:1].upper() + self.message[1:])}</div>")

    def _repr_mimebundle_(self, include=None, exclude=None):
        # The answer judged travels in the output's metadata, so a test can look for it on the page above
        # without executing anything (tests/test_no_answer_on_page.py).
        data = {"text/plain": str(self), "text/html": self._repr_html_()}
        return data, {"course_check": {"exercise": self.name, "status": self.status, "answer": self.answer}}

    __repr__ = __str__


KINDS = {
    "predict": "predict a number before the lesson measures it",
    "calculate": "work out a number for a configuration the lesson did not run",
    "code": "write code that does the technique (judged by what it does)",
    "diagnose": "given a run that does not fit, choose what to change (each wrong option explained)",
    "explain": "choose the trade-off the numbers support, and give the number",
}


@dataclass
class Exercise:
    name: str
    fn: Callable  # the judge: fn(data, **context) -> (passed, message)
    points: float
    lesson: str
    context: Callable[[], dict] | None = None  # trusted: computed from the lesson's fixed inputs
    measured: tuple[str, ...] = ()  # context names that come from the lesson's own measurements
    probe: Callable | None = None  # code exercises: probe(fn) -> plain data about what fn did
    kind: str = "calculate"  # one of KINDS
    tolerance: float = 0.0  # relative: how far from the target a numeric answer may be and still pass
    _cached: dict | None = field(default=None, repr=False)

    def trusted_context(self) -> dict:
        if self._cached is None:
            self._cached = dict(self.context()) if self.context else {}
        return self._cached


EXERCISES: dict[str, Exercise] = {}


def exercise(name: str, *, lesson: str, points: float = 1.0, context: Callable[[], dict] | None = None,
             measured: tuple[str, ...] = (), probe: Callable | None = None, kind: str | None = None,
             tolerance: float = 0.0):
    """Register a judge ``fn(data, **context) -> (passed, message)`` under ``name``.

    ``context()``: the judge's other inputs, computed by trusted code from the lesson's fixed inputs.
    ``measured``: names of context values taken from the lesson's measurements (see the module text).
    ``probe(fn)``: for code answers; runs the learner's function on inputs it builds and returns plain
    data about its effects (it must catch ``BaseException`` from the learner's code and say so in the data).
    ``kind``: one of ``KINDS`` (``"code"`` when there is a probe, else ``"calculate"``, unless given).
    ``tolerance``: the relative distance from the target at which the judge still passes a number (0: exact);
    the test that no answer is printed above its exercise uses it.
    """
    kind = kind or ("code" if probe else "calculate")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}")

    def register(fn):
        EXERCISES[name] = Exercise(name, fn, points, lesson, context, tuple(measured), probe, kind, tolerance)
        return fn
    return register


class AnswerError(ValueError):
    """An answer that cannot cross the boundary as plain data; the message says what to give instead."""


# ------------------------------------------------------------------------------------------------
# The boundary: answers as plain data
# ------------------------------------------------------------------------------------------------
def _numpy_scalar(value):
    np = sys.modules.get("numpy")
    if np is None or type(value) not in {np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                         np.uint32, np.uint64, np.float16, np.float32, np.float64}:
        return None
    return (type(value).item(value),)  # the C type's own method: exact types cannot be patched


def _tensor_scalar(value):
    torch = sys.modules.get("torch")
    if torch is None or type(value) not in (torch.Tensor, torch.nn.Parameter):
        return None
    if torch._C.TensorBase.numel(value) != 1:
        raise AnswerError(f"a tensor of shape {tuple(value.shape)} cannot be checked: give one number "
                          "(`.item()` of a one-element tensor).")
    return (torch._C.TensorBase.item(torch._C.TensorBase.detach(value)),)


def _config_fields(value):
    """(class name, fields) of the configuration objects answers may be; None for anything else."""
    for module, names in (("transformers", ("BitsAndBytesConfig",)), ("peft", ("LoraConfig",))):
        lib = sys.modules.get(module)
        for cls_name in names:
            cls = getattr(lib, cls_name, None) if lib else None
            if cls is not None and type(value) is cls:
                return cls_name, cls.to_dict(value)
    memory = sys.modules.get("helpers.memory")
    if memory is not None and type(value) is memory.MemoryReport:
        return "MemoryReport", {c: object.__getattribute__(value, c) for c in memory.CATEGORIES}
    return None


def plain(value, _depth: int = 0, _budget: list | None = None):
    """``value`` as exact built-in data (see the module text); raises ``AnswerError`` with a hint."""
    budget = _budget if _budget is not None else [MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0 or _depth > MAX_DEPTH:
        raise AnswerError("the answer is far larger or deeper than any exercise asks for.")
    kind = type(value)
    if value is None or value is Ellipsis:
        return None
    if kind in (bool, int, float, str):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value, _depth + 1, budget)
    if isinstance(value, str):  # a subclass: its characters, not what its methods say
        return str.__str__(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    found = _numpy_scalar(value) or _tensor_scalar(value)
    if found:
        return found[0]
    if isinstance(value, dict):
        out = {}
        for key, item in dict.items(value):
            key = plain(key, _depth + 1, budget)
            if type(key) is not str:
                raise AnswerError(f"dictionary keys must be strings (got {type(key).__name__} {key!r:.40}).")
            out[key] = plain(item, _depth + 1, budget)
        return out
    if isinstance(value, (list, tuple)):
        items = list.__iter__(value) if isinstance(value, list) else tuple.__iter__(value)
        return [plain(item, _depth + 1, budget) for item in items]
    if isinstance(value, (set, frozenset)):
        items = [plain(item, _depth + 1, budget) for item in (set.__iter__(value) if isinstance(value, set)
                                                               else frozenset.__iter__(value))]
        return sorted(items, key=repr)
    config = _config_fields(value)
    if config:
        name, fields = config
        return {"__class__": name, **plain(fields, _depth + 1, budget)}
    torch = sys.modules.get("torch")
    if torch is not None and type(value) is torch.dtype:
        return str(value).removeprefix("torch.")
    if callable(value):
        raise AnswerError("this exercise asks for a value, not a function: call it, or give its result.")
    raise AnswerError(f"a {kind.__name__} cannot be checked: give a number, a string, or a list or dict of them, "
                      "as the exercise asks.")


def is_blank(data) -> bool:
    if data is None:
        return True
    if isinstance(data, list) and data and all(a is None for a in data):
        return True
    return isinstance(data, str) and not data.strip()


def answer_data(name: str, answer):
    """What crosses the boundary for exercise ``name``: ``plain(answer)``, or the probe's data for a function."""
    ex = _exercise(name)
    if ex.probe is None:
        return plain(answer)
    if answer is None or answer is Ellipsis or (isinstance(answer, str) and not str.strip(answer)) or (
            isinstance(answer, tuple) and all(a is None for a in tuple.__iter__(answer))):
        return None  # still blank: "not attempted"
    if not callable(answer):
        raise AnswerError(f"give the function itself (its name, without parentheses), not its result "
                          f"(a {type(answer).__name__}).")
    return plain(ex.probe(answer))


def _exercise(name: str) -> Exercise:
    _load_lesson_checks()
    ex = EXERCISES.get(name)
    if ex is None:
        known = ", ".join(sorted(EXERCISES)) or "none loaded"
        raise KeyError(f"there is no exercise called {name!r} (known: {known}).")
    return ex


# ------------------------------------------------------------------------------------------------
# The verdict: trusted code, plain data in
# ------------------------------------------------------------------------------------------------
def verdict(name: str, data, measured: dict | None = None, context: dict | None = None) -> CheckResult:
    """Judge plain ``data`` for exercise ``name``. ``measured``: the lesson's measurements the exercise
    names; ``context``: replaces the trusted context (tests use it to judge other model shapes)."""
    try:
        ex = _exercise(name)
    except KeyError as err:
        return CheckResult(name, FAIL, err.args[0], 0, 0)
    if is_blank(data):
        return CheckResult(name, SKIP, "replace the `None` (or the `raise NotImplementedError()` line) "
                                       "with your answer, run the cell, then run this check again.", 0, ex.points)
    if isinstance(data, list) and any(a is None for a in data):
        return CheckResult(name, SKIP, "some values are still `None`: fill in every one, then run this "
                                       "check again.", 0, ex.points)
    measured = measured or {}
    missing = [m for m in ex.measured if measured.get(m) is None]
    if missing:
        return CheckResult(name, FAIL, f"run the cells above first: the check needs the lesson's measured "
                                       f"{', '.join(missing)} (pass {', '.join(f'{m}={m}' for m in missing)}).",
                           0, ex.points)
    try:
        ctx = {**(ex.trusted_context() if context is None else context),
               **{m: measured[m] for m in ex.measured}}
        passed, message = ex.fn(data, **ctx)
    except AnswerError as err:
        passed, message = False, str(err)
    except Exception as err:  # a malformed answer must produce feedback, not a traceback
        passed, message = False, (f"your answer could not be checked ({type(err).__name__}: {err}). "
                                  "Look at the type the exercise asks for.")
    passed = passed is True
    return CheckResult(name, PASS if passed else FAIL, str(message), ex.points if passed else 0.0, ex.points,
                       None if ex.probe else data)


def run_check(name: str, answer=None, **measured) -> CheckResult:
    """Evaluate exercise ``name`` on ``answer`` in this process (no printing, no raising).

    Keyword arguments are the lesson's measurements the exercise names (``measured``); nothing else."""
    try:
        ex = _exercise(name)
    except KeyError as err:
        return CheckResult(name, FAIL, err.args[0], 0, 0)
    unknown = sorted(set(measured) - set(ex.measured))
    if unknown:
        return CheckResult(name, FAIL, f"check({name!r}, answer) takes no {', '.join(unknown)}: the check computes "
                                       "what it needs itself.", 0, ex.points)
    try:
        data = answer_data(name, answer)
        values = {k: plain(v) for k, v in measured.items()}
    except AnswerError as err:
        return CheckResult(name, FAIL, str(err), 0, ex.points)
    except BaseException as err:  # the learner's code (a probe's own catch failed, or __reduce__ etc.)
        return CheckResult(name, FAIL, f"your answer could not be read ({type(err).__name__}: {str(err)[:200]}).",
                           0, ex.points)
    return verdict(name, data, values)


def check(name: str, answer=None, **measured) -> CheckResult:
    """Check an exercise answer and show friendly feedback (the notebook-facing entry point)."""
    result = run_check(name, answer, **measured)
    if os.environ.get("COURSE_STRICT_CHECKS") == "1" and not result.passed:
        raise AssertionError(str(result))
    return result


def _load_lesson_checks() -> None:
    from . import exercises  # noqa: F401  (registers every lesson's exercises)


# ------------------------------------------------------------------------------------------------
# Small tools for writing judges and probes
# ------------------------------------------------------------------------------------------------
def as_number(answer, what: str = "a number") -> float:
    """Plain data as a float, or an AnswerError that says what was expected."""
    if type(answer) not in (int, float):
        shown = f"{answer!r:.60}" if type(answer) in (str, list, dict, bool) else ""
        raise AnswerError(f"expected {what}, got {type(answer).__name__} {shown}".rstrip() + ".")
    value = float(answer)
    if math.isnan(value) or math.isinf(value):
        raise AnswerError(f"expected {what}, got {value}.")
    return value


def as_config(data, cls):
    """Rebuild a configuration object (``LoraConfig``, ``BitsAndBytesConfig``) from its plain fields."""
    import inspect

    name = cls.__name__
    if not isinstance(data, dict) or data.get("__class__") != name:
        got = data.get("__class__", "dict") if isinstance(data, dict) else type(data).__name__
        raise AnswerError(f"build a `{name}(...)` (you gave a {got}).")
    fields = {k: v for k, v in data.items() if k != "__class__"}
    # The constructor's own parameters (BitsAndBytesConfig is a dataclass with one field, so not its fields).
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    return cls(**{k: v for k, v in fields.items() if k in known})


def two_values(data, keys: tuple[str, str], expected: str) -> tuple:
    """The two values of a pair, or of a dict that has both ``keys`` (any case, spaces around them ignored), as
    given. Anything else is an AnswerError that says ``expected``."""
    if isinstance(data, dict):
        named = {k.strip().lower(): v for k, v in data.items()}
        if set(keys) <= set(named):
            data = [named[keys[0]], named[keys[1]]]
    if not isinstance(data, list) or len(data) != 2:
        raise AnswerError(expected)
    return data[0], data[1]


def as_pair(data, keys: tuple[str, str], expected: str, what: tuple[str, str]) -> tuple[float, float]:
    """Two numbers from a pair, or from a dict that has both ``keys`` (``two_values``); ``what`` names each number
    for ``as_number``."""
    first, second = two_values(data, keys, expected)
    return as_number(first, what[0]), as_number(second, what[1])


def trusted_dims(dims):
    """The context's model shapes, checked: only trusted code supplies a context, so anything but a
    ``helpers.estimate.Dims`` is a bug in the course, said plainly (a TypeError, not feedback)."""
    from .estimate import Dims

    if not isinstance(dims, Dims):
        raise TypeError("the context's dims must be a helpers.estimate.Dims")
    return dims


def learner_call(fn, *args, **kwargs) -> tuple[bool, object]:
    """Call the learner's ``fn``: (True, result) or (False, "ExceptionName: message") — never raises."""
    try:
        return True, fn(*args, **kwargs)
    except BaseException as err:  # SystemExit, KeyboardInterrupt and the rest: report, do not escape
        return False, f"{type(err).__name__}: {str(err)[:200]}"


def choice(answer, options) -> str:
    """The letter of ``options`` a multiple-choice answer names ("b", " (B) ", "b."), or an AnswerError."""
    letters = ", ".join(f"'{k}'" for k in options)
    if not isinstance(answer, str):
        raise AnswerError(f"give one letter as a string: one of {letters}.")
    letter = answer.strip().lower().strip("()[].: ")
    if letter not in options:
        raise AnswerError(f"you said {answer[:40]!r}: give one letter, one of {letters}.")
    return letter


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


# ------------------------------------------------------------------------------------------------
# A prediction beside the measurement it predicted
# ------------------------------------------------------------------------------------------------
@dataclass
class PredictionBeside:
    exercise: str
    rows: list  # (label, predicted or None, measured)
    unit: str
    note: str = ""

    def lines(self) -> list[str]:
        if all(p is None for _, p, _ in self.rows):
            return [f"No prediction yet: fill in `{self.exercise}` above and run it, then run this cell again."]
        out = []
        for label, p, m in self.rows:
            shown = f"{label}: " if label else ""
            if p is None:
                out.append(f"{shown}no prediction · measured {m:,.2f} {self.unit}".rstrip())
                continue
            off = f" ({round((p - m) / m, 3) + 0.0:+.1%})" if m else ""  # + 0.0: no "-0.0 %"
            out.append(f"{shown}you predicted {p:,.2f} {self.unit} · measured {m:,.2f} {self.unit}{off}")
        return out + ([self.note] if self.note else [])

    def __str__(self) -> str:
        return "\n".join(self.lines())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return "<br>".join(html.escape(line) for line in self.lines())


def show_prediction(exercise: str, prediction, measured, *, unit: str = "", note: str = "") -> PredictionBeside:
    """The learner's prediction for ``exercise`` beside what the lesson measured (same unit, same keys).

    ``prediction`` and ``measured`` are numbers, or dicts of numbers with the same keys. A blank prediction
    (``None``) gives "no prediction yet", so a student notebook still runs to the end."""
    try:
        said = plain(prediction)
    except AnswerError:
        said = None
    if isinstance(measured, dict):
        said = said if isinstance(said, dict) else {}
        rows = [(k, _number_or_none(said.get(k)), float(v)) for k, v in measured.items()]
    else:
        rows = [("", _number_or_none(said), float(measured))]
    return PredictionBeside(exercise, rows, unit, note)


def _number_or_none(value):
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None
