"""Student notebooks are generated from solutions: regions replaced, outputs cleared, set-up cell stamped."""

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from helpers.colab import SETUP_CELL
from helpers.notebooks import (
    build,
    exercise_cells,
    solution_regions,
    student_version,
)

ROOT = Path(__file__).resolve().parents[1]

EXERCISE = """\
import torch

def bytes_per_param(dtype):
    size = torch.tensor([], dtype=dtype).element_size()
    ### BEGIN SOLUTION
    answer = size
    ### END SOLUTION
    return answer

### BEGIN SOLUTION
total = bytes_per_param(torch.float32) * 135_000_000
### END SOLUTION
print(total)"""

ANSWER = """\
Why does fp16 halve the weights?

<!-- BEGIN SOLUTION -->
Two bytes per parameter instead of four.
<!-- END SOLUTION -->"""


def _ran(cell, count):
    """A code cell as it looks after execution: an output, a count and timing metadata."""
    cell.outputs = [new_output("stream", name="stdout", text="540000000\n")]
    cell.execution_count = count
    cell.metadata.update({"execution": {"iopub.status.idle": "2030-01-01T00:00:00Z"}, "collapsed": False,
                          "tags": ["keep-me"]})
    return cell


def solution_notebook(setup_source=SETUP_CELL):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nb.cells = [
        new_markdown_cell("# 02 Precision", id="title"),
        _ran(new_code_cell(setup_source, id="setup"), 1),
        _ran(new_code_cell(EXERCISE, id="exercise"), 2),
        new_markdown_cell(ANSWER, id="answer"),
        _ran(new_code_cell("print('plain cell')", id="plain"), 3),
    ]
    return nb


def test_code_regions_are_replaced_at_their_indentation():
    student = student_version(solution_notebook())
    assert student.cells[2].source == """\
import torch

def bytes_per_param(dtype):
    size = torch.tensor([], dtype=dtype).element_size()
    # YOUR CODE HERE
    raise NotImplementedError()
    return answer

# YOUR CODE HERE
raise NotImplementedError()
print(total)"""


def test_markdown_regions_are_replaced():
    student = student_version(solution_notebook())
    assert student.cells[3].source == "Why does fp16 halve the weights?\n\n*Your answer here.*"


def test_outputs_counts_and_timing_cleared_the_rest_kept():
    solution = solution_notebook()
    student = student_version(solution)
    for cell in student.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        assert "execution" not in cell.metadata and "collapsed" not in cell.metadata
    assert student.cells[4].source == "print('plain cell')"
    assert student.cells[4].metadata["tags"] == ["keep-me"]
    assert [c.id for c in student.cells] == [c.id for c in solution.cells]
    assert student.metadata["kernelspec"]["name"] == "python3"
    # pure: the solution keeps its outputs
    assert solution.cells[2].outputs and solution.cells[2].execution_count == 2


def test_first_code_cell_is_stamped_with_setup_cell():
    student = student_version(solution_notebook(setup_source="# old set-up\nfrom helpers.colab import setup"))
    assert student.cells[1].source == SETUP_CELL
    assert student.cells[2].source.startswith("import torch")


def test_placeholder_first_cell_is_replaced():
    student = student_version(solution_notebook(setup_source="# set-up cell: stamped by build\n"))
    assert [c.id for c in student.cells][:3] == ["title", "setup", "exercise"]
    assert student.cells[1].source == SETUP_CELL


def test_setup_cell_is_inserted_rather_than_overwriting_lesson_code():
    nb = solution_notebook()
    del nb.cells[1]
    student = student_version(nb)
    assert [c.id for c in student.cells][:3] == ["title", "course-setup", "exercise"]
    assert student.cells[1].source == SETUP_CELL


def test_solution_regions_and_exercise_cells():
    nb = solution_notebook()
    assert solution_regions(nb) == [(2, "    answer = size"),
                                    (2, "total = bytes_per_param(torch.float32) * 135_000_000"),
                                    (3, "Two bytes per parameter instead of four.")]
    assert exercise_cells(nb) == [2]
    assert exercise_cells(student_version(nb)) == []


@pytest.mark.parametrize("source, problem", [
    ("### BEGIN SOLUTION\nx = 1", "no matching"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "nested"),
    ("x = 1\n### END SOLUTION", "has no '### BEGIN SOLUTION'"),
])
def test_unbalanced_markers_name_notebook_and_cell(source, problem):
    nb = solution_notebook()
    nb.cells[4].source = source
    with pytest.raises(ValueError, match=problem) as error:
        student_version(nb, name="02_precision.ipynb")
    assert "02_precision.ipynb" in str(error.value) and "cell 4" in str(error.value)
    assert "plain" in str(error.value)  # the cell id


def test_unbalanced_markdown_marker_raises():
    nb = solution_notebook()
    nb.cells[3].source = "<!-- BEGIN SOLUTION -->\nanswer"
    with pytest.raises(ValueError, match="cell 3"):
        student_version(nb)


def test_output_is_deterministic():
    first = nbformat.writes(student_version(solution_notebook()), version=4)
    second = nbformat.writes(student_version(solution_notebook()), version=4)
    assert first == second


def _write_solution(folder: Path, name: str, nb) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / name, version=4)
    return folder / name


def test_build_and_check_report_drift(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    _write_solution(solutions, "02_precision.ipynb", solution_notebook())
    student = notebooks / "02_precision.ipynb"

    assert build(solutions, notebooks, check=True) == [str(student)]
    assert not student.exists()  # check writes nothing
    assert build(solutions, notebooks) == [str(student)]
    assert build(solutions, notebooks, check=True) == []
    assert build(solutions, notebooks) == []  # idempotent: byte-identical output
    assert "raise NotImplementedError()" in student.read_text()

    student.write_text(student.read_text().replace("plain cell", "edited by hand"))
    assert build(solutions, notebooks, check=True) == [str(student)]
    build(solutions, notebooks)
    assert "edited by hand" not in student.read_text()

    stale = notebooks / "07_removed.ipynb"
    stale.write_text(student.read_text())
    assert build(solutions, notebooks, check=True) == [str(stale)]
    build(solutions, notebooks)
    assert not stale.exists() and build(solutions, notebooks, check=True) == []


def test_build_writes_setup_cell_back_into_the_solution(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    old = "from helpers.colab import setup\nsetup()"
    source = _write_solution(solutions, "03_lora.ipynb", solution_notebook(setup_source=old))

    assert str(source) in build(solutions, notebooks, check=True)
    assert nbformat.read(source, as_version=4).cells[1].source == old  # check mode writes nothing
    build(solutions, notebooks)
    solution = nbformat.read(source, as_version=4)
    assert solution.cells[1].source == SETUP_CELL
    assert solution.cells[2].outputs  # outputs untouched
    assert build(solutions, notebooks, check=True) == []


def test_repo_notebooks_in_sync():
    if not list((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        pytest.skip("solutions/ has no lesson notebooks yet")
    drift = build(ROOT / "solutions", ROOT / "notebooks", check=True)
    assert drift == [], f"out of date: {drift}; run: python -m helpers.notebooks build"
