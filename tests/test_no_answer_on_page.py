"""No exercise can be answered from the page: nothing printed above an exercise gives its answer (within the
check's own tolerance), and no code answer is written out above it in the student notebook.

The executed solution notebooks record, in each check's output, the answer the check judged; these tests read
them and never execute a notebook. A planted leak in a copy of each lesson must be found."""

import copy

import nbformat
import pytest
from casebook import check_calls

from helpers.checks import EXERCISES, KINDS, _load_lesson_checks
from helpers.constants import LESSON_PATTERN, ROOT
from helpers.tools.notebooks import (
    _leaves,
    _numbers,
    answers_on_the_page,
    check_records,
    exercise_cells,
    student_version,
)

SOLUTIONS = sorted((ROOT / "solutions").glob(LESSON_PATTERN))


def read(path):
    return nbformat.read(path, as_version=4)


def records(nb):
    """(cell index, exercise name, answer) for every check output of an executed notebook."""
    return [(index, r["exercise"], r["answer"]) for index, r in check_records(nb)]


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name[:2])
def test_every_check_recorded_what_it_judged(path):
    nb = read(path)
    recorded = {name for _, name, _ in records(nb)}
    called = set(check_calls(nb))
    assert called, "the lesson has no exercises"
    assert called <= recorded, (f"{sorted(called - recorded)}: no recorded answer — re-run the solution "
                                f"(python -m helpers.tools.notebooks execute {path.name[:2]})")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name[:2])
def test_no_answer_is_on_the_page_above_its_exercise(path):
    nb = read(path)
    assert answers_on_the_page(nb, student_version(nb, path.name), path.name) == []


def plant(nb, index, cell):
    """A copy of ``nb`` with ``cell`` inserted at ``index``."""
    nb = copy.deepcopy(nb)
    nb.cells.insert(index, cell)
    return nb


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name[:2])
def test_a_planted_printed_answer_is_found(path):
    _load_lesson_checks()  # EXERCISES[name] below, whichever lesson's test runs first
    nb = read(path)
    planted = 0
    for index, name, answer in records(nb):
        numbers = _leaves(answer)
        if not numbers:
            continue  # a code answer, a string or a small choice: see the next test and the module notes
        start = max(i for i in exercise_cells(nb, path.name) if i <= index)
        shown = nbformat.v4.new_code_cell("report", outputs=[nbformat.v4.new_output(
            "execute_result", {"text/plain": f"peak {numbers[0] / 2**20:.7g} MiB"}, execution_count=1)])
        leaky = plant(nb, start, shown)
        exact = EXERCISES[name].tolerance < 1e-6  # a MiB figure to 7 digits is exact only by luck
        found = answers_on_the_page(leaky, student_version(leaky, path.name), path.name)
        if not exact:
            assert any(name in leak for leak in found), (name, found)
        raw = plant(nb, start, nbformat.v4.new_markdown_cell(f"The answer is {numbers[0]!r}."))
        found = answers_on_the_page(raw, student_version(raw, path.name), path.name)
        assert any(name in leak for leak in found), (name, found)
        planted += 1
    if not planted:
        pytest.skip("no numeric answers in this lesson")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name[:2])
def test_a_planted_copy_of_a_code_answer_is_found(path):
    from helpers.tools.notebooks import _code_lines, solution_regions

    nb = read(path)
    regions = [(i, text) for i, text in solution_regions(nb, path.name)
               if nb.cells[i].cell_type == "code" and _code_lines(text)]
    assert regions, "every lesson has an exercise with code worth copying"
    for index, text in regions:
        leaky = plant(nb, index, nbformat.v4.new_code_cell("# a demo\n" + text))
        found = answers_on_the_page(leaky, student_version(leaky, path.name), path.name)
        assert any(f"cell {index + 1} " in leak for leak in found), (index, found)


def test_a_number_printed_outside_the_tolerance_is_not_a_leak(tmp_path):
    """The scan is not a blanket ban on numbers: 0.1 % off an exact answer, or another unit's rounding, is fine."""
    _load_lesson_checks()
    name = next(n for n, ex in EXERCISES.items() if ex.tolerance == 0 and ex.probe is None)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("About 1.17738 MiB, or 1,235,000 bytes."),
        nbformat.v4.new_code_cell("x = None\n### BEGIN SOLUTION\nx = 1234567\n### END SOLUTION"),
        nbformat.v4.new_code_cell(f'check("{name}", x)', outputs=[nbformat.v4.new_output(
            "execute_result", {"text/plain": "ok"}, metadata={"course_check": {
                "exercise": name, "status": "passed", "answer": 1234567}}, execution_count=1)]),
    ]
    assert answers_on_the_page(nb, student_version(nb), "planted") == []
    nb.cells[0].source += " Exactly 1,234,567."
    assert answers_on_the_page(nb, student_version(nb), "planted")


def test_every_kind_of_exercise_is_in_the_course():
    _load_lesson_checks()
    kinds = {ex.kind for ex in EXERCISES.values()}
    assert kinds == set(KINDS), f"missing: {sorted(set(KINDS) - kinds)}"


def test_a_duration_is_read_only_as_itself():
    # "in 2.43 s" once matched a 2.43 GiB answer: a time is never bytes or a fraction printed in other units.
    assert _numbers("peak 2,268.5 MiB in 2.43 s on cpu") == {(2268.5, True), (2.43, False)}
    assert _numbers("a step of 2.43 seconds, 2.43 GiB") == {(2.43, False), (2.43, True)}
