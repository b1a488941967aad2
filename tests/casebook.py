"""What the check tests share: the course model's shapes (without loading it) and one way to grade a check."""

from helpers.checks import (EXERCISES, FAIL, PASS, SKIP, AnswerError, CheckResult, _load_lesson_checks,
                            answer_data, verdict)
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
