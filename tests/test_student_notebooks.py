"""Every student notebook runs to the end: the only errors are its unanswered exercises.

A student notebook is its solution with each solution region replaced by a stub, and nbval already runs
every solution. So what remains to prove is that no cell after an exercise depends on what the region
did, which is checked statically for every lesson (the names it binds: ruff F821 on the student
notebook; anything else it does: ``helpers.tools.notebooks.solution_side_effects``), plus one student
notebook executed for real (lesson 00's, as the blank submission of tests/test_grade.py). Executing
every student notebook doubles the suite's run time; set COURSE_RUN_STUDENT_NOTEBOOKS=all to do it anyway
(before a release, say).
"""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from helpers.constants import LESSON_PATTERN, ROOT
from helpers.tools.notebooks import CODE_STUB, solution_side_effects, student_version
from helpers.tools.runner import run_notebook

STUDENT = sorted((ROOT / "notebooks").glob(LESSON_PATTERN))
SOLUTIONS = sorted((ROOT / "solutions").glob(LESSON_PATTERN))
# Lesson 00's student notebook is executed end to end by tests/test_grade.py (the blank submission: every cell
# runs, no error but the exercises' NotImplementedError, every check "not attempted"), so not a second time here.
EXECUTED_BY_DEFAULT: set[str] = set()


def undefined_names(folder: Path) -> list[str]:
    """ruff's F821 (undefined name, or a name used before any cell binds it) over the notebooks in folder."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821",
                             "--output-format", "concise", "--no-cache", str(folder)],
                            cwd=ROOT, capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "F821" in line]


def test_no_student_cell_uses_a_name_only_a_solution_binds():
    assert undefined_names(ROOT / "notebooks") == []


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solution_regions_only_bind_names(path):
    assert solution_side_effects(nbformat.read(path, as_version=4), path.name) == []


def _lesson(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def test_the_static_checks_catch_a_lesson_that_leans_on_its_solution(tmp_path):
    leaky = _lesson("model = object()\nanswer = None\n### BEGIN SOLUTION\nanswer = 3\nhelper = 4\n### END SOLUTION",
                    "print(answer, helper)")
    nbformat.write(student_version(leaky), tmp_path / "01_leaky.ipynb")
    assert [line.split(": ", 1)[1] for line in undefined_names(tmp_path)] == ["F821 Undefined name `helper`"]

    effects = _lesson("import torch\nmodel, d, n = None, {}, 0\nf = None\n### BEGIN SOLUTION\n"
                      "model.requires_grad_(False)\nd['k'] = 1\nn += 1\ntorch.manual_seed(0)\ndel d\n"
                      "total = 0\nfor i in range(3):\n    total += i\n    model.x = i\n"
                      "def f(m):\n    m.requires_grad_(False)\n    m.y = 1\nprint(total)\n### END SOLUTION")
    problems = solution_side_effects(effects, "fx")
    assert [p.split(": ", 1)[1] for p in problems] == [
        "calls model.requires_grad_() for its effect", "changes an object in place (d['k'])",
        "updates n, which exists outside the solution, in place", "calls torch.manual_seed() for its effect",
        "deletes d", "changes an object in place (model.x)"]
    assert solution_side_effects(_lesson("x = None\n### BEGIN SOLUTION\nx = [1]\n### END SOLUTION")) == []


@pytest.mark.slow
@pytest.mark.parametrize("path", STUDENT, ids=[p.stem for p in STUDENT])
def test_student_notebook_runs_apart_from_its_exercises(path):
    if path.stem not in EXECUTED_BY_DEFAULT and os.environ.get("COURSE_RUN_STUDENT_NOTEBOOKS") != "all":
        pytest.skip("checked statically above; COURSE_RUN_STUDENT_NOTEBOOKS=all executes it too")
    nb = nbformat.read(path, as_version=4)
    # strict_checks=False: the kernel runs without COURSE_STRICT_CHECKS, so an unanswered check says so
    result = run_notebook(nb, cwd=path.parent, cell_timeout=600, strict_checks=False, stop_on_error=False)
    assert result.stopped is None, result.error
    exercises = {i for i, c in enumerate(nb.cells) if c.cell_type == "code" and CODE_STUB[1] in c.source}
    assert exercises, "a lesson without exercises"
    checks_seen = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if i in exercises:
            assert [e.ename for e in errors] == ["NotImplementedError"], (i, cell.source)
        else:
            assert not errors, (i, cell.source, errors and "\n".join(errors[0].traceback)[-2000:])
        text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)
        if cell.source.lstrip().startswith("check("):
            checks_seen += 1
            assert "not attempted" in text, (i, text)
    assert checks_seen >= 3
