"""Student notebooks are generated from solutions: regions replaced, outputs cleared, set-up cell and
"Open in Colab" badge stamped."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from helpers.constants import LESSON_PATTERN, ROOT
from helpers.tools.colab import REPO_URL, SETUP_CELL, colab_url
from helpers.tools.notebooks import (
    build,
    exercise_cells,
    solution_regions,
    stamp,
    student_version,
)

LESSONS = [path for folder in ("solutions", "notebooks") for path in sorted((ROOT / folder).glob(LESSON_PATTERN))]
# Written out here rather than taken from helpers.tools.colab, so a wrong URL in the builder fails the tests.
BADGE = re.compile(r"\[!\[Open In Colab\]\((?P<image>[^)]+)\)\]\((?P<link>[^)]+)\)")
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def expected_link(name: str) -> str:
    """Colab's URL for the student notebook notebooks/<name> on the course repository's main branch."""
    match = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+)", REPO_URL)
    assert match, f"REPO_URL is not a GitHub repository URL: {REPO_URL}"
    org, repo = match.groups()
    return f"https://colab.research.google.com/github/{org}/{repo}/blob/main/notebooks/{name}"


def badge_links(nb) -> list[tuple[int, str, str]]:
    """(cell index, image, link) of every Colab badge in the notebook's markdown cells."""
    return [(i, m["image"], m["link"]) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
            for m in BADGE.finditer(cell.source)]

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


def solution_notebook(setup_source=SETUP_CELL, badge_for=None):
    """A small solution notebook; with badge_for="NN_x.ipynb", already stamped with that lesson's badge."""
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nb.cells = [
        new_markdown_cell("# 02 Precision", id="title"),
        _ran(new_code_cell(setup_source, id="setup"), 1),
        _ran(new_code_cell(EXERCISE, id="exercise"), 2),
        new_markdown_cell(ANSWER, id="answer"),
        _ran(new_code_cell("print('plain cell')", id="plain"), 3),
    ]
    if badge_for:
        badge = f"[![Open In Colab]({BADGE_IMAGE})]({expected_link(badge_for)})"
        nb.cells.insert(1, new_markdown_cell(badge, id=f"colab-badge-{badge_for[:2]}"))
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
    student = student_version(solution_notebook(setup_source="# old set-up\nfrom helpers.tools.colab import setup"))
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
    _write_solution(solutions, "02_precision.ipynb", solution_notebook(badge_for="02_precision.ipynb"))
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
    old = "from helpers.tools.colab import setup\nsetup()"
    source = _write_solution(solutions, "03_lora.ipynb", solution_notebook(setup_source=old))

    assert str(source) in build(solutions, notebooks, check=True)
    assert nbformat.read(source, as_version=4).cells[1].source == old  # check mode writes nothing
    build(solutions, notebooks)
    solution = nbformat.read(source, as_version=4)
    assert [c.id for c in solution.cells][:4] == ["title", "colab-badge-03", "setup", "exercise"]
    assert solution.cells[2].source == SETUP_CELL
    assert solution.cells[3].outputs  # outputs untouched
    assert badge_links(solution) == [(1, BADGE_IMAGE, expected_link("03_lora.ipynb"))]
    assert build(solutions, notebooks, check=True) == []


def test_lesson_gets_a_badge_to_its_student_notebook_above_the_setup_cell():
    student = student_version(solution_notebook(), "02_precision.ipynb")
    assert [c.id for c in student.cells] == ["title", "colab-badge-02", "setup", "exercise", "answer", "plain"]
    assert badge_links(student) == [(1, BADGE_IMAGE, expected_link("02_precision.ipynb"))]
    assert colab_url("02_precision.ipynb") == expected_link("02_precision.ipynb")
    # not a lesson file name: no student notebook to open, so no badge
    assert badge_links(student_version(solution_notebook())) == []


def test_stamping_touches_only_the_setup_and_badge_cells():
    solution = solution_notebook(setup_source="# set-up cell: stamped by build\n")
    before = copy.deepcopy(solution)
    assert stamp(solution, "02_precision.ipynb") is True
    assert stamp(solution, "02_precision.ipynb") is False  # idempotent
    others = [c for c in solution.cells if c.id not in ("colab-badge-02", "setup")]
    assert others == [c for c in before.cells if c.id != "setup"]  # sources, outputs, metadata: all equal
    assert solution.cells[2].outputs == before.cells[1].outputs


def test_a_wrong_moved_or_copied_badge_is_replaced():
    nb = solution_notebook(badge_for="03_lora.ipynb")  # copied from another lesson
    copied = new_markdown_cell(nb.cells[1].source, id="stray")  # ...twice, and not where it belongs
    nb.cells.append(copied)
    nb.cells.insert(0, nb.cells.pop(1))
    assert len(badge_links(nb)) == 2
    stamp(nb, "02_precision.ipynb")
    assert badge_links(nb) == [(1, BADGE_IMAGE, expected_link("02_precision.ipynb"))]
    assert [c.id for c in nb.cells] == ["title", "colab-badge-02", "setup", "exercise", "answer", "plain"]


def test_badge_in_a_notebook_without_cell_ids():
    nb = solution_notebook()
    nb.nbformat_minor = 4
    for cell in nb.cells:
        cell.pop("id")
    stamp(nb, "02_precision.ipynb")
    assert "id" not in nb.cells[1] and badge_links(nb) == [(1, BADGE_IMAGE, expected_link("02_precision.ipynb"))]
    assert stamp(nb, "02_precision.ipynb") is False


def test_build_reports_a_solution_without_its_badge(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    source = _write_solution(solutions, "05_qlora.ipynb", solution_notebook(badge_for="05_qlora.ipynb"))
    build(solutions, notebooks)
    nb = nbformat.read(source, as_version=4)
    del nb.cells[1]
    nbformat.write(nb, source, version=4)
    assert str(source) in build(solutions, notebooks, check=True)


@pytest.mark.parametrize("url", ["https://gitlab.com/org/course", "git@github.com:org/course.git"])
def test_colab_url_needs_a_github_repository(url):
    with pytest.raises(ValueError, match="GitHub"):
        colab_url("00_x.ipynb", repo_url=url)
    assert colab_url("00_x.ipynb", repo_url="https://github.com/org/course.git").endswith(
        "/github/org/course/blob/main/notebooks/00_x.ipynb")


@pytest.mark.parametrize("path", LESSONS, ids=[f"{p.parent.name}/{p.stem}" for p in LESSONS])
def test_repo_notebook_opens_its_student_notebook_in_colab(path):
    nb = nbformat.read(path, as_version=4)
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    assert nb.cells[code[0]].source == SETUP_CELL, "the first code cell is not the set-up cell"
    badges = badge_links(nb)
    assert len(badges) == 1, f"{len(badges)} Colab badges; run: python -m helpers.tools.notebooks build"
    index, image, link = badges[0]
    assert image == BADGE_IMAGE and index == code[0] - 1
    # its id names the lesson, so cell ids never make two lessons' notebooks look alike (helpers.tools.grade)
    assert nb.cells[index].get("id") == f"colab-badge-{path.name[:2]}"
    assert link == expected_link(path.name), f"the badge opens {link}"
    assert (ROOT / "notebooks" / path.name).is_file()  # what the badge opens exists in the repository


def test_badges_command_prints_one_snippet_per_lesson():
    out = subprocess.run([sys.executable, "-m", "helpers.tools.notebooks", "badges"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    solutions = sorted((ROOT / "solutions").glob(LESSON_PATTERN))
    assert [line.split(": ", 1)[0] for line in out] == [p.stem for p in solutions]
    assert [BADGE.fullmatch(line.split(": ", 1)[1])["link"] for line in out] == [
        expected_link(p.name) for p in solutions]


def test_repo_notebooks_in_sync():
    if not list((ROOT / "solutions").glob(LESSON_PATTERN)):
        pytest.skip("solutions/ has no lesson notebooks yet")
    drift = build(ROOT / "solutions", ROOT / "notebooks", check=True)
    assert drift == [], f"out of date: {drift}; run: python -m helpers.tools.notebooks build"
