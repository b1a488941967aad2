"""What the check tests share: the course model's shapes (without loading it), one way to grade a check, and
the red team's answers that lie about themselves: ``liar(stored, claim)`` (a ``Lying*`` subclass of stored's
type), ``RealLiar``, ``FrameReader`` and ``Escapes``."""

import ast
import numbers
import sys

from helpers.checks import (
    EXERCISES,
    FAIL,
    PASS,
    SKIP,
    AnswerError,
    CheckResult,
    _load_lesson_checks,
    answer_data,
    verdict,
)
from helpers.estimate import Dims
from helpers.models import tiny_config

# SmolLM2-135M, the course model (helpers.models): 30 blocks, hidden 576, tied 49,152-token embedding.
COURSE = Dims(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True)
TINY = Dims.of(tiny_config(vocab_size=1000))
BLANKS = (None, ..., "", (None, None))


def grade(name, answer, context=None, **measured) -> CheckResult:
    """What ``check`` does, with the trusted context replaced by ``context`` when one is given (other model
    shapes): the answer crosses the boundary as plain data, then the verdict is computed from that data."""
    try:
        data = answer_data(name, answer)
    except AnswerError as err:
        return CheckResult(name, FAIL, str(err), 0, EXERCISES[name].points)
    return verdict(name, data, measured, context)


def assert_grades(name, right, wrong, context=None, **measured):
    """``right`` passes; every blank is "not attempted"; each ``(answer, word)`` in ``wrong`` fails, hint has word."""
    result = grade(name, right, context, **measured)
    assert result.status == PASS, result.message
    for blank in BLANKS:
        assert grade(name, blank, context, **measured).status == SKIP, blank
    assert len(wrong) >= 2, "test at least two plausible wrong answers"
    for answer, word in wrong:
        result = grade(name, answer, context, **measured)
        assert result.status == FAIL, answer
        assert word.lower() in result.message.lower(), (answer, result.message)
        assert result.points == 0


def registered(lesson: str) -> set[str]:
    """The names of the exercises registered for a lesson ("07"): its tests must give each one cases."""
    _load_lesson_checks()
    return {name for name, ex in EXERCISES.items() if ex.lesson.startswith(lesson)}


def check_calls(notebook) -> dict[str, list[str]]:
    """The notebook's ``check(name, ...)`` calls: each exercise's name, with the sorted names of the keyword
    arguments (measurements) that its call passes."""
    calls = {}
    for cell in notebook.cells:
        if cell.cell_type == "code" and "check(" in cell.source:
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check":
                    calls[node.args[0].value] = sorted(k.arg for k in node.keywords)
    return calls


def fails(name, answer, context=None, **measured):
    """The answer gets no points, with feedback (no exception escapes); unlike ``assert_no_points``, any status
    but "passed" will do. Returns the result, for its message."""
    result = grade(name, answer, context, **measured)
    assert result.status != PASS and result.points == 0, (answer, result)
    assert result.message
    return result


def assert_no_points(name, answers, context=None, **measured):
    """Each of ``answers`` (a slip just outside the lesson's point, a lie, a cheat) fails and scores nothing."""
    for answer in answers:
        result = grade(name, answer, context, **measured)
        assert result.status == FAIL and result.points == 0, (name, answer, result.message)


# ------------------------------------------------------------------------------------------------
# Answers that lie: each stores one value and claims another (its ``claim``) to the methods a check
# might call. The checks read what is stored (helpers.checks.plain), so none of them may score.
# ------------------------------------------------------------------------------------------------
def liar(stored, claim):
    """An answer that holds ``stored`` and claims ``claim``: the Lying* class below for stored's type (a float
    makes a LyingFloat, an int a LyingInt; likewise str, dict, list and tuple). With ``FrameReader()`` as the
    claim it claims whatever target it finds in its callers' frames."""
    cls = {float: LyingFloat, int: LyingInt, str: LyingStr, dict: LyingDict, list: LyingList,
           tuple: LyingTuple}[type(stored)]
    value = cls(stored)
    value.claim = claim
    return value


class LyingFloat(float):
    """Says it is ``claim`` to float(), equal to anything, and no distance from anything (abs, subtraction)."""

    claim = 0.0

    def __float__(self):
        return float(self.claim)

    def __eq__(self, other):
        return True

    __hash__ = float.__hash__

    def __abs__(self):
        return 0.0

    def __sub__(self, other):
        return 0.0

    __rsub__ = __sub__


class LyingInt(int):
    """Says it is ``claim`` to int() and operator.index(), and equal to anything."""

    claim = 0

    def __index__(self):
        return int(self.claim)

    __int__ = __index__

    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


class LyingStr(str):
    """Strips, lowers, upper-cases and case-folds to ``claim``, splits into ``[claim]``; equal to and containing
    anything."""

    claim = ""

    def strip(self, *chars):
        return self.claim

    lower = upper = casefold = strip

    def split(self, *args, **kwargs):
        return [self.claim]

    def __eq__(self, other):
        return True

    __hash__ = str.__hash__

    def __contains__(self, item):
        return True


class LyingDict(dict):
    """Shows the items of ``claim`` (a dict) to get, [], items, keys and ``in``."""

    claim: dict = {}

    def get(self, key, default=None):
        return self.claim.get(key, default)

    def __getitem__(self, key):
        return self.claim[key]

    def items(self):
        return self.claim.items()

    def keys(self):
        return self.claim.keys()

    def __contains__(self, key):
        return key in self.claim


class LyingList(list):
    """Shows the items of ``claim`` to iteration, len() and []."""

    claim: list = []

    def __iter__(self):
        return iter(self.claim)

    def __len__(self):
        return len(self.claim)

    def __getitem__(self, i):
        return self.claim[i]


class LyingTuple(tuple):
    """Shows the items of ``claim`` to iteration, len() and []."""

    claim: tuple = ()

    __iter__, __len__, __getitem__ = LyingList.__iter__, LyingList.__len__, LyingList.__getitem__


class RealLiar:
    """Not a number at all, registered as numbers.Real: says it is ``claim`` to float(), int() and ==."""

    def __init__(self, claim=0.0):
        self.claim = claim

    def __float__(self):
        return float(self.claim)

    def __int__(self):
        return int(float(self))

    __index__ = __int__

    def __eq__(self, other):
        return True

    __hash__ = object.__hash__


numbers.Real.register(RealLiar)

TARGET_NAMES = ("target", "want", "expected", "right", "answer")


def target_in_the_frames(names=TARGET_NAMES, default=0.0):
    """What a cheating answer does: the first int or float called one of ``names`` in its callers' frames."""
    frame = sys._getframe(1)
    while frame is not None:
        for name in names:
            value = frame.f_locals.get(name)
            if type(value) in (int, float):
                return float(value)
        frame = frame.f_back
    return default


class FrameReader(RealLiar):
    """A RealLiar whose claim, read each time it is asked, is the target it finds in its callers' frames (a
    local called one of ``names``). As another liar's claim it makes that liar read the frames too."""

    def __init__(self, *names):
        self.names = names or TARGET_NAMES

    @property
    def claim(self):
        return target_in_the_frames(self.names)


class Escapes:
    """An object whose every method raises SystemExit."""

    def __getattr__(self, name):
        raise SystemExit(0)

    def __float__(self):
        raise SystemExit(0)

    def __eq__(self, other):
        raise SystemExit(0)

    __hash__ = object.__hash__
