"""What the check tests share: the course model's shapes (without loading it) and one way to grade a check."""

from helpers.checks import EXERCISES, FAIL, PASS, SKIP, _load_lesson_checks, run_check
from helpers.estimate import Dims
from helpers.models import tiny_config

# SmolLM2-135M, the course model (helpers.models): 30 blocks, hidden 576, tied 49,152-token embedding.
COURSE = Dims(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True)
TINY = Dims.of(tiny_config(vocab_size=1000))
BLANKS = (None, ..., "", (None, None))


def assert_grades(name, right, wrong, **context):
    """``right`` passes; every blank is "not attempted"; each ``(answer, word)`` in ``wrong`` fails, hint has word."""
    result = run_check(name, right, **context)
    assert result.status == PASS, result.message
    for blank in BLANKS:
        assert run_check(name, blank, **context).status == SKIP, blank
    assert len(wrong) >= 2, "test at least two plausible wrong answers"
    for answer, word in wrong:
        result = run_check(name, answer, **context)
        assert result.status == FAIL, answer
        assert word.lower() in result.message.lower(), (answer, result.message)
        assert result.points == 0


def registered(lesson: str) -> set[str]:
    """The names of the exercises registered for a lesson ("07"): its tests must give each one cases."""
    _load_lesson_checks()
    return {name for name, ex in EXERCISES.items() if ex.lesson.startswith(lesson)}
