"""The instructor's batch grader (helpers/tools/grade.py), end to end through its command line.

The grader runs on a small synthetic course tree (``course``: a copy of helpers/, a short lesson 00 whose exercise
and check cells are the real lesson's, and lessons 01 and 02's solutions, which are read, never run), the way the
red-team tests point it at a tree with ``root=``. Four grader runs do the work, started together (``started``): one
over lesson 00 submissions (the short solution, the real blank student notebook, a notebook that cheats, files that
are not lesson 00 notebooks at all), one over tiny notebooks with short limits (an infinite loop, a memory hog), one
of red-team attacks in the sandbox, one of the same attack without a sandbox on a copy of the course. The real
lesson 00 student notebook, run once as the blank submission, is the only real lesson executed here (about a minute
on two cores); the exercises' checks have their own tests (tests/test_checks_lessonNN.py).
"""

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from helpers.constants import LESSON_PATTERN, ROOT
from helpers.tools import grade
from helpers.tools.notebooks import CODE_STUB, student_version

SOLUTION_00 = ROOT / "solutions" / "00_where_the_memory_goes.ipynb"
STUDENT_00 = ROOT / "notebooks" / "00_where_the_memory_goes.ipynb"
STUDENT_01 = ROOT / "notebooks" / "01_loading_in_8bit_and_4bit.ipynb"
EXERCISES_00 = ["weights_7b", "adamw_state_bytes", "largest_category", "logits_bytes"]
COLUMNS_00 = [f"{e} (max 1)" for e in EXERCISES_00]  # the CSV names each exercise with its maximum

# Runs in the graded kernel: every way a notebook can make the checks say "passed" from the inside.
CHEAT = """\
import helpers.checks as hc
import helpers.exercises
from helpers.checks import CheckResult

def check(name, answer=None, **context):
    return CheckResult(name, "passed", "looks right to me", 1.0, 1.0)

hc.check = hc.run_check = check
for ex in hc.EXERCISES.values():
    ex.fn = lambda answer, **context: (True, "passed")
hc._load_lesson_checks = lambda: None
"""


def _env():
    return {**os.environ, "COURSE_STRICT_CHECKS": "1"}  # the graded kernels must not inherit it


class Grader:
    """``python -m helpers.tools.grade ARGS`` started in the background, run from the course tree ``root`` (the one it
    grades against). The test's grader runs overlap: much of their time is kernels starting and limits running out."""

    def __init__(self, *args, root: Path, log: Path, **env):
        log.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = open(log / "stdout", "w+"), open(log / "stderr", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "helpers.tools.grade", *map(str, args)], cwd=root,
                                     env={**_env(), "PYTHONPATH": str(root), **env}, stdout=self.stdout,
                                     stderr=self.stderr, text=True)

    def wait(self, timeout=1200) -> subprocess.CompletedProcess:
        returncode = self.proc.wait(timeout=timeout)
        self.stdout.seek(0)
        self.stderr.seek(0)
        return subprocess.CompletedProcess(self.proc.args, returncode, self.stdout.read(), self.stderr.read())


def read_rows(path: Path) -> dict[str, dict]:
    """The CSV's rows by file name, exercise columns by exercise name ("weights_7b (max 1)" -> "weights_7b")."""
    with open(path, newline="", encoding="utf-8") as f:
        return {Path(r["submission"]).name: {re.sub(r" \(max [\d.]+\)$", "", k): v for k, v in r.items()}
                for r in csv.DictReader(f)}


def fingerprint(paths):
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def notebook(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


# The short lesson 00 of the synthetic course: the real lesson's set-up cell, exercise cells and check cells (same
# ids and sources, so the real student notebook is told as this lesson), with the names they need made cheaply.
SHORT_00_SETUP = ("from helpers.checks import check\nfrom helpers.capstone import course_dims\n"
                  "from helpers.estimate import Dims\nfrom helpers.models import reference_config\n"
                  "n_params = course_dims().params")


def short_lesson_00():
    real = nbformat.read(SOLUTION_00, as_version=4)
    keep = [c for c in real.cells if c.cell_type == "code" and (
        "course set-up" in c.source or "### BEGIN SOLUTION" in c.source or c.source.startswith("check(")
        or c.source.startswith("llama3 = "))]
    setup = nbformat.v4.new_code_cell(SHORT_00_SETUP)
    setup["id"] = "short-lesson-setup"
    nb = nbformat.v4.new_notebook(metadata=real.metadata)
    nb.cells = [keep[0], setup, *keep[1:]]
    assert sum(c.source.startswith("check(") for c in nb.cells) == 4
    return nb


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A course tree the grader can run from: helpers/ and friends copied, solutions/ short or never run."""
    root = tmp_path_factory.mktemp("course")
    for name in ("helpers", "requirements.txt", "pyproject.toml", "binder"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            (root / name).write_bytes(source.read_bytes())
    (root / "solutions").mkdir()
    nbformat.write(short_lesson_00(), root / "solutions" / SOLUTION_00.name)
    for real in sorted((ROOT / "solutions").glob("0[12]_*.ipynb")):  # answer keys and fingerprints only
        (root / "solutions" / real.name).write_bytes(real.read_bytes())
    return root


def cheating_student_notebook(solution):
    """The student notebook with wrong answers, the cheat above, one check cell deleted, one edited."""
    nb = student_version(solution)
    imports = next(i for i, c in enumerate(nb.cells) if "from helpers.checks import check" in c.source)
    wrong = {"bf16_bytes_7b": "bf16_bytes_7b, nf4_bytes_7b = 7e9, 7e9", "adamw_state_bytes": "adamw_state_bytes = 1",
             "largest": "largest = 'weights'", "logits_bytes": "logits_bytes = 12"}
    for cell in nb.cells:
        if cell.cell_type == "code" and CODE_STUB[1] in cell.source:
            answer = next(v for k, v in wrong.items() if cell.source.startswith(k))
            cell.source = cell.source.replace(CODE_STUB[1], answer)
    checks = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("check(")]
    assert len(checks) == 4
    checks[1].source = 'check("adamw_state_bytes", 8 * n_params, n_params=n_params)'  # edited to the right answer
    nb.cells.remove(checks[2])  # deleted
    nb.cells.insert(imports + 1, nbformat.v4.new_code_cell(CHEAT))
    nb.cells.append(nbformat.v4.new_code_cell(CHEAT + "\nfor name in hc.EXERCISES:\n    check(name, 0)"))
    return nb


def lesson00_submissions(folder: Path, course: Path) -> list[Path]:
    solution = course / "solutions" / SOLUTION_00.name
    (folder / "solution.ipynb").write_bytes(solution.read_bytes())
    # This course's lesson 00 is the short one: its handout, submitted as it was handed out.
    nbformat.write(student_version(nbformat.read(solution, as_version=4), solution.name), folder / "blank.ipynb")
    # The real lesson's student notebook is not this course's handout (it has the whole lesson's code), so it runs:
    # the one student notebook the suite executes (tests/test_student_notebooks.py counts on it).
    (folder / "real_student.ipynb").write_bytes(STUDENT_00.read_bytes())
    nbformat.write(cheating_student_notebook(nbformat.read(solution, as_version=4)), folder / "cheat.ipynb")
    (folder / "other_lesson.ipynb").write_bytes(STUDENT_01.read_bytes())
    data = SOLUTION_00.read_bytes()
    (folder / "truncated.ipynb").write_bytes(data[:len(data) // 2])
    (folder / "random.ipynb").write_bytes(os.urandom(4096))
    (folder / "answers.py").write_text("adamw_state_bytes = 8 * 134_515_008\n")
    (folder / "list.ipynb").write_text("[1, 2, 3]\n")
    nbformat.write(notebook(CHEAT + "\nimport helpers.estimate\nhelpers.estimate.predict = lambda *a, **k: None",
                            "bf16_bytes_7b, nf4_bytes_7b = 1, 2", "n_params = 1000\nadamw_state_bytes = 1"),
                   folder / "patches_the_course.ipynb")
    return sorted(folder.iterdir())


def limits_submissions(folder: Path) -> None:
    """Tiny lesson-00 notebooks (told by their file names), for a 3 s cell limit and 1 GiB of memory."""
    from helpers.capstone import course_dims  # the checks' own target: the course model's parameters

    right = f"bf16_bytes_7b, nf4_bytes_7b = 14e9, 3.9375e9\nadamw_state_bytes = {8 * course_dims().params}"
    hog = "hog = bytearray(3 * 2**30)\nhog[::4096] = b'x' * len(hog[::4096])"  # touched: really 3 GiB
    nbformat.write(notebook(hog, "x = 1", "while True:\n    pass", right), folder / "00_limits.ipynb")
    # It ignores the interrupt, then sleeps: the grader's grace period runs out without a busy core.
    nbformat.write(notebook("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n"
                            "    time.sleep(0.1)", right), folder / "00_stubborn_loop.ipynb")


@pytest.fixture(scope="module")
def started(tmp_path_factory, course):
    """Every grader run of this file, started at once; each fixture below waits for its own."""
    runs = {}
    folder = tmp_path_factory.mktemp("submissions")
    files = lesson00_submissions(folder, course)
    before = fingerprint(files)
    out = tmp_path_factory.mktemp("out") / "grades.csv"
    runs["lesson00"] = dict(files=files, before=before, out=out, grader=Grader(
        *files, folder / "missing.ipynb", "--lesson", "00", "--out", out, root=course, log=out.parent / "log"))

    folder = tmp_path_factory.mktemp("limits")
    limits_submissions(folder)
    runs["limits"] = dict(out=folder / "grades.csv", grader=Grader(
        folder, "--cell-timeout", "3", "--memory-limit", "1G", "--out", folder / "grades.csv", root=course,
        log=folder / "log"))

    if grade.bubblewrap() is not None:
        folder = tmp_path_factory.mktemp("red_team")
        nbformat.write(notebook(ATTACK, *LIES_00), folder / "00_lies.ipynb")
        nbformat.write(notebook(ATTACK, *CHEATS_02), folder / "02_cheats.ipynb")
        nbformat.write(notebook(*RIGHT_02), folder / "02_right.ipynb")
        runs["red_team"] = dict(before=grade.course_digest(course), grader=red_team_grader(
            folder, folder / "00_lies.ipynb", folder / "02_cheats.ipynb", folder / "02_right.ipynb",
            "--sandbox", "bwrap", root=course))

    # --sandbox none, on its own copy of the course: the attack may write into that copy.
    tampered = shutil.copytree(course, tmp_path_factory.mktemp("tamper") / "course",
                               ignore=shutil.ignore_patterns("__pycache__"))
    folder = tampered.parent / "submissions"
    folder.mkdir()
    nbformat.write(notebook(ATTACK, *LIES_00), folder / "00_lies.ipynb")
    nbformat.write(notebook(*LIES_00[:1]), folder / "00_later.ipynb")
    runs["tamper"] = dict(grader=red_team_grader(folder, folder / "00_lies.ipynb", folder / "00_later.ipynb",
                                                 "--sandbox", "none", root=tampered))
    yield runs
    for run in runs.values():  # a test that failed early leaves no grader behind
        if run["grader"].proc.poll() is None:
            run["grader"].proc.kill()


@pytest.fixture(scope="module")
def lesson00(started):
    """One grader run over every lesson-00 submission: the rows by file name, the CLI result, the files."""
    run = started["lesson00"]
    result = run["grader"].wait()
    return {"rows": read_rows(run["out"]) if run["out"].exists() else {}, "result": result, "files": run["files"],
            "before": run["before"], "out": run["out"]}


@pytest.mark.slow
def test_the_grader_runs_through_every_submission(lesson00):
    result = lesson00["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert set(lesson00["rows"]) == {p.name for p in lesson00["files"]} | {"missing.ipynb"}
    with open(lesson00["out"], newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["submission", "lesson", *COLUMNS_00, "total", "max", "status", "peak_memory_mib", "reason"]
    assert "solution.ipynb" in result.stdout and "4/4" in result.stdout  # the summary table
    # The console names the lesson and the exercises as the CSV does.
    label = lesson00["rows"]["solution.ipynb"]["lesson"]
    assert label == "00 Where the memory goes" and f"exercises of {label}: {', '.join(COLUMNS_00)}" in result.stdout
    assert all(row["lesson"] == label for row in lesson00["rows"].values())
    # Progress went to stderr, not a terminal here: plain lines, no carriage returns, not in the CSV.
    assert "\r" not in result.stderr and "of 11, solution.ipynb" in result.stderr
    assert "of 11" not in lesson00["out"].read_text(encoding="utf-8") + result.stdout


def test_submissions_are_never_written_to(lesson00):
    assert fingerprint(lesson00["files"]) == lesson00["before"]
    folder = lesson00["files"][0].parent
    assert sorted(folder.iterdir()) == lesson00["files"]  # nothing added next to them either


def test_the_solution_gets_full_marks(lesson00):
    row = lesson00["rows"]["solution.ipynb"]
    assert row["status"] == "graded", row
    assert [row[e] for e in EXERCISES_00] == ["1"] * 4, row["reason"]
    assert (row["total"], row["max"], row["lesson"][:3]) == ("4", "4", "00 ")
    assert row["reason"] == ""
    assert 0 < float(row["peak_memory_mib"]) < 500  # the short lesson loads no model


def test_an_unchanged_handout_is_blank_with_zero_of_the_maximum(lesson00):
    row = lesson00["rows"]["blank.ipynb"]  # the student notebook as handed out
    assert row["status"] == "graded"
    assert [row[e] for e in EXERCISES_00] == ["0"] * 4
    assert (row["total"], row["max"]) == ("0", "4")
    assert row["reason"] == f"{grade.BLANK}: not run"  # one reason, not a learner's hint per exercise
    assert row["peak_memory_mib"] == ""  # nothing was run


def test_a_student_notebook_that_is_not_the_handout_runs_and_gets_zero(lesson00):
    row = lesson00["rows"]["real_student.ipynb"]
    assert row["status"] == "graded"
    assert [row[e] for e in EXERCISES_00] == ["0"] * 4
    assert (row["total"], row["max"]) == ("0", "4")
    assert float(row["peak_memory_mib"]) > 500  # the real lesson: the course model alone is 513 MiB in fp32
    for name in EXERCISES_00:
        assert f"{name}: not attempted" in row["reason"], row["reason"]
    # The CLI was started with COURSE_STRICT_CHECKS=1: had the kernel inherited it, the notebook's own check
    # cells would have raised AssertionError for the blank answers.
    assert "errors in cell" not in row["reason"], row["reason"]


def test_an_unchanged_handout_is_told_without_running_it(tmp_path, monkeypatch):
    path = tmp_path / "copy.ipynb"  # any name: the lesson is told from its cells
    path.write_bytes(STUDENT_00.read_bytes())
    monkeypatch.setattr(grade, "grade_notebook", lambda *a: pytest.fail("an unchanged handout was run"))
    row = grade.grade(path, None, grade.Limits())
    assert (row.lesson, row.total, row.max_points, row.status) == ("00", 0, 4, "graded")
    assert row.reasons == [f"{grade.BLANK}: not run"]
    edited = nbformat.read(path, as_version=4)  # one answer written: no longer the handout
    cell = next(c for c in edited.cells if c.cell_type == "code" and CODE_STUB[1] in c.source)
    cell.source = cell.source.replace(CODE_STUB[1], "bf16_bytes_7b, nf4_bytes_7b = 14e9, 3.9375e9")
    assert not grade.unchanged_handout(edited, "00")
    assert grade.unchanged_handout(nbformat.read(STUDENT_00, as_version=4), "00")
    saved = nbformat.read(STUDENT_00, as_version=4)  # run and saved untouched: outputs, ids, editor whitespace
    for i, c in enumerate(saved.cells):
        c["id"], c.source = f"saved-{i}", c.source + "\n\n"
        if c.cell_type == "code":
            c.outputs, c.execution_count = [nbformat.v4.new_output("stream", name="stdout", text="out\n")], i
    assert grade.unchanged_handout(saved, "00")
    saved.cells.append(nbformat.v4.new_code_cell("weights_7b = 14e9"))  # an answer in a cell of its own
    assert not grade.unchanged_handout(saved, "00")
    assert not grade.unchanged_handout(nbformat.read(SOLUTION_00, as_version=4), "00")


@pytest.mark.parametrize("name, data, reason", [
    ("notes.txt", b"my answers: 14 GB\n", "not a notebook: the file is not JSON"),
    ("broken.ipynb", b'{"cells": [', "a damaged notebook"),
    ("mystery.ipynb", nbformat.writes(notebook("x = 1")).encode(), ""),
])
def test_what_has_no_lesson_gets_no_maximum(tmp_path, capsys, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    row = grade.grade(path, None, grade.Limits())
    assert row.status == "not graded" and row.max_points is None and row.total is None
    assert row.reasons and row.reasons[0].startswith(reason), row.reasons
    grade.write_csv([row], tmp_path / "g.csv")
    got = next(csv.DictReader(open(tmp_path / "g.csv", encoding="utf-8")))
    assert (got["lesson"], got["total"], got["max"]) == ("", "", ""), got  # not 0 of 0: that reads as full marks
    assert got["reason"] == " | ".join(row.reasons)
    line = grade.summary([row]).splitlines()[1]
    assert " — " in line and "0/0" not in line


def test_redefining_or_editing_the_checks_gains_nothing(lesson00):
    row = lesson00["rows"]["cheat.ipynb"]
    assert row["status"] == "graded"
    assert (row["total"], row["max"]) == ("0", "4"), row["reason"]
    for name in EXERCISES_00:  # graded on the real answers, with the real checks' feedback
        assert f"{name}: not yet" in row["reason"], row["reason"]
    assert "weights_7b: not yet: bf16: you said 7.00 GB" in row["reason"]


@pytest.mark.parametrize("name, reason", [
    ("other_lesson.ipynb", "another lesson's notebook: --lesson says lesson 00, but its cells are lesson 01's"),
    ("truncated.ipynb", "a damaged notebook: its JSON ends early (truncated file?)"),
    ("random.ipynb", "not a notebook: the file is not text"),
    ("answers.py", "not a notebook: the file is not JSON"),
    ("list.ipynb", "not a notebook: valid JSON, but it has no cells"),
    ("missing.ipynb", "cannot read the file"),
])
def test_what_is_not_a_lesson_00_notebook_gets_a_row_with_the_reason(lesson00, name, reason):
    row = lesson00["rows"][name]
    assert row["status"] == "not graded"
    assert row["reason"].startswith(reason), row["reason"]
    assert (row["total"], row["max"]) == ("0", "4")  # --lesson 00: scored as lesson 00, with nothing
    assert [row[e] for e in EXERCISES_00] == ["0"] * 4


def test_patching_the_course_modules_gains_nothing(lesson00):
    row = lesson00["rows"]["patches_the_course.ipynb"]
    assert row["total"] == "0", row["reason"]
    # The verdicts are computed by the grader, with the checks it loaded before any submission ran.
    assert "weights_7b: not yet" in row["reason"] and "adamw_state_bytes: not yet" in row["reason"]


@pytest.fixture(scope="module")
def limits(started):
    """The tiny lesson-00 notebooks graded with a 3 s cell limit and 1 GiB of memory."""
    run = started["limits"]
    result = run["grader"].wait(timeout=300)
    return {"rows": read_rows(run["out"]) if run["out"].exists() else {}, "result": result}


@pytest.mark.slow
def test_a_memory_hog_and_an_infinite_loop_are_cut_and_later_cells_still_count(limits):
    assert limits["result"].returncode == 0, limits["result"].stderr[-3000:]
    row = limits["rows"]["00_limits.ipynb"]  # told from its file name: no lesson 00 cell in it
    assert row["lesson"] == grade.lesson_label("00") and row["status"] == "graded"
    assert "cell 0 ran out of memory (limit 1 GiB): MemoryError" in row["reason"], row["reason"]
    assert "cell 2 exceeded the time limit (3 s) and was interrupted" in row["reason"], row["reason"]
    assert (row["weights_7b"], row["adamw_state_bytes"], row["total"], row["max"]) == ("1", "1", "2", "4")
    assert "largest_category: missing: name 'largest' is not defined" in row["reason"]
    assert float(row["peak_memory_mib"]) < 1024


@pytest.mark.slow
def test_a_loop_that_ignores_the_interrupt_stops_the_kernel(limits):
    row = limits["rows"]["00_stubborn_loop.ipynb"]
    assert "cell 0 exceeded the time limit (3 s) and did not stop when interrupted" in row["reason"], row["reason"]
    assert row["total"] == "0" and "exercises not graded: the kernel is gone" in row["reason"]


# ------------------------------------------------------------------------------------------------
# The pieces, without a kernel
# ------------------------------------------------------------------------------------------------
SOLUTIONS = sorted((ROOT / "solutions").glob(LESSON_PATTERN))


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_the_answer_key_is_every_check_call_of_the_solution(path):
    import re

    nb = nbformat.read(path, as_version=4)
    written = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            written += [n for n in re.findall(r"""\bcheck\(\s*["'](\w+)["']""", cell.source) if n not in written]
    key = grade.answer_key(path.name[:2])
    assert [c.name for c in key] == written and written
    from helpers.checks import EXERCISES

    for call in key:  # the grader reads only the answer, and the lesson's own measurements the check names
        assert set(call.measured) <= set(EXERCISES[call.name].measured)
        assert call.code == (EXERCISES[call.name].probe is not None)


def test_the_answer_key_keeps_the_solutions_arguments():
    nb = notebook("x = 1", 'check("a", (x, y), n=n, **extra)\n%matplotlib inline\ncheck("b", z)', "print('check(')")
    assert [(c.name, c.answer, c.measured) for c in grade.check_calls(nb)] == [
        ("a", "(x, y)", {"n": "n"}), ("b", "z", {})]


STUDENTS = sorted((ROOT / "notebooks").glob(LESSON_PATTERN))


@pytest.mark.parametrize("path", STUDENTS, ids=[p.stem for p in STUDENTS])
def test_a_lesson_is_told_from_its_cells_whatever_the_file_is_called(path):
    nb = nbformat.read(path, as_version=4)
    assert grade.identify_lesson(Path("alice.ipynb"), nb) == (path.name[:2], None)
    other = "01" if path.name[:2] == "00" else "00"
    lesson, reason = grade.identify_lesson(Path(f"{other}_mine.ipynb"), nb)
    assert lesson is None and reason.startswith(f"another lesson's notebook: its file name says lesson {other}")


def test_a_notebook_unlike_any_lesson_needs_a_name_or_lesson():
    nb = notebook("x = 1")
    assert grade.identify_lesson(Path("00_scratch.ipynb"), nb) == ("00", None)
    assert grade.identify_lesson(Path("scratch.ipynb"), nb, forced="03") == ("03", None)
    lesson, reason = grade.identify_lesson(Path("scratch.ipynb"), nb)
    assert lesson is None and reason.startswith("cannot tell which lesson this is")
    assert grade.lesson_from_name(Path("bob-00_where_the_memory_goes (1).ipynb")) == "00"
    assert grade.lesson_from_name(Path("99_x.ipynb")) is None


def test_memory_sizes():
    assert grade.parse_bytes("8G") == 8 * 2**30
    assert grade.parse_bytes("512MiB") == 512 * 2**20
    assert grade.parse_bytes("1.5g") == 3 * 2**29
    assert grade.parse_bytes("none") is None
    with pytest.raises(ValueError):
        grade.parse_bytes("lots")


def test_rows_of_several_lessons_share_one_header(tmp_path):
    rows = [grade.Row("a.ipynb", "01", {"p": 1.0, "q": 0.0}, {"p": 1.0, "q": 1.0}, "graded", None,
                      ["q: not yet: hint"]),
            grade.Row("b.ipynb", "00", {"r": 0.5}, {"r": 2.0}, "graded", 900.0, []),
            grade.Row("c.ipynb", reasons=["not a notebook"])]
    header = grade.write_csv(rows, tmp_path / "g.csv")
    assert header == ["submission", "lesson", "r (max 2)", "p (max 1)", "q (max 1)", "total", "max", "status",
                      "peak_memory_mib", "reason"]
    l00, l01 = grade.lesson_label("00"), grade.lesson_label("01")
    assert l00.startswith("00 ") and len(l00) > 3 and l01.startswith("01 ")
    got = list(csv.reader(open(tmp_path / "g.csv", encoding="utf-8")))[1:]
    assert got == [["a.ipynb", l01, "", "1", "0", "1", "2", "graded", "", "q: not yet: hint"],
                   ["b.ipynb", l00, "0.5", "", "", "0.5", "2", "graded", "900", ""],
                   ["c.ipynb", "", "", "", "", "", "", "not graded", "", "not a notebook"]]
    table = grade.summary(rows)  # the console names lessons and exercises with the same formatter
    assert f"exercises of {l00}: r (max 2)" in table and f"exercises of {l01}: p (max 1), q (max 1)" in table
    assert all(label in line for label, line in zip([l01, l00], table.splitlines()[1:3], strict=True))


def test_a_long_reason_is_cut_at_a_word_boundary_on_the_console_and_whole_in_the_csv(tmp_path):
    reason = ("weights_7b: not yet: bf16: you said 7.00 GB but two bytes per parameter for seven billion "
              "parameters is fourteen gigabytes; count again")
    row = grade.Row("a.ipynb", "00", {"weights_7b": 0.0}, {"weights_7b": 1.0}, "graded", None, [reason])
    line = grade.summary([row], reason_width=60).splitlines()[1]
    shown = line[line.index("weights_7b: not yet"):]
    assert shown.endswith("…") and len(shown) <= 60
    assert reason.startswith(shown[:-1]) and reason[len(shown) - 1] == " "  # the cut falls between two words
    grade.write_csv([row], tmp_path / "g.csv")
    assert next(csv.DictReader(open(tmp_path / "g.csv", encoding="utf-8")))["reason"] == reason
    assert grade.shorten("a" * 10 + " " + "b" * 30, 20) == "a" * 10 + "…"
    assert grade.shorten("see /very/long/path/to/a/file.ipynb", 20).endswith("/…")


def test_progress_to_a_log_file_is_plain_lines(tmp_path):
    import io

    nb = notebook("x = 1", "y = 2")
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("## Baseline\ntext"))
    log = io.StringIO()
    progress = grade.Progress(log, terminal=False, log_every=0)
    progress.begin(2, 3, tmp_path / "alice.ipynb")
    progress.cell(nb, 2, 2, 2)
    progress.end("3/4 (graded)")
    progress.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert "2 of 3, alice.ipynb" in text and "cell 2 in “Baseline” (2 of 2 code cells)" in text
    assert "2 of 3, alice.ipynb: 3/4 (graded) in 0:0" in text
    screen = io.StringIO()  # on a terminal: one line redrawn in place
    progress = grade.Progress(screen, terminal=True)
    progress.begin(1, 1, tmp_path / "bob.ipynb")
    progress.close()
    assert screen.getvalue().startswith("\r\x1b[K1 of 1, bob.ipynb")


@pytest.mark.parametrize("args, message", [
    (["--lesson", "99"], "no lesson '99'"),
    (["--memory-limit", "lots"], "not a size"),
    (["--out", "{sub}"], "is one of the submissions"),
])
def test_usage_errors_exit_2_without_a_traceback(tmp_path, monkeypatch, capsys, args, message):
    sub = tmp_path / "00_x.ipynb"
    nbformat.write(notebook("x = 1"), sub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:  # what argparse does for a usage error, before anything runs
        grade.main([str(sub), *[a.format(sub=sub) for a in args]])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "grades.csv").exists()


# ------------------------------------------------------------------------------------------------
# Red team: submissions written to attack the grader, not to learn
# ------------------------------------------------------------------------------------------------
# The attacker is told where the live course and the CSV are (RED_TEAM_ROOT, RED_TEAM_OUT): the strongest
# position a submission can be in. Everything here runs in the graded kernel, after the lesson's set-up.
ATTACK = """\
import builtins, importlib, numbers, os, subprocess, sys
from pathlib import Path

class FrameReader(float):  # a number that looks for the check's target up the stack
    def __float__(self):
        frame = sys._getframe(1)
        while frame:
            for name in ("target", "want", "bf16_target", "expected"):
                if isinstance(frame.f_locals.get(name), (int, float)):
                    return float(frame.f_locals[name])
            frame = frame.f_back
        return 0.0
    __eq__ = lambda self, other: True
    __abs__ = lambda self: 0.0

class RealLiar:  # not a float at all, but registered as a real number
    __float__ = FrameReader.__float__
    __eq__ = lambda self, other: True
numbers.Real.register(RealLiar)

class LyingStr(str):
    strip = lower = lambda self, *a: "activations"
    __eq__ = lambda self, other: True
    __hash__ = str.__hash__

class LyingDict(dict):
    get = __getitem__ = lambda self, key, *default: 1
    items = lambda self: [("answer", 1)]

builtins.abs = lambda x: 0
importlib.import_module = lambda name, package=None: sys.modules.get(name)
try:
    import helpers.memory
    helpers.memory.MemoryReport.largest = lambda self: "activations"
except Exception:
    pass

import ast
class EverythingPasses(ast.NodeTransformer):
    def visit_Constant(self, node):
        return node
get_ipython().ast_transformers.append(EverythingPasses())

# Tamper with the course: the live tree (found from the interpreter's path, or told) and this copy.
live = Path(os.environ.get("RED_TEAM_ROOT") or Path(sys.executable).resolve().parents[2])
for root in (live, Path.cwd().parent):
    for target in (root / "helpers" / "checks.py", root / "helpers" / "exercises" / "lesson00.py"):
        try:
            with open(target, "a") as f:
                f.write("\\n# tampered\\n")
        except OSError as err:
            print("cannot tamper:", err)

# Forge the results, now and after the grader is gone (a detached process that outlives the kernel).
out = os.environ.get("RED_TEAM_OUT", "")
for pid in os.listdir("/proc"):  # or read the grader's command line
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    if b"helpers.tools.grade" in b" ".join(argv) and b"--out" in argv:
        out = argv[argv.index(b"--out") + 1].decode()
SURVIVOR = ("import os, sys, time\\nos.setsid()\\nos.fork() and os._exit(0)\\nfor _ in range(1200):\\n"
            "    time.sleep(0.1)\\n    if os.path.exists(sys.argv[1]) and 'submission,' in open(sys.argv[1]).read():\\n"
            "        break\\nopen(sys.argv[1], 'w').write('forged')")  # as soon as the grader's CSV is written
subprocess.Popen([sys.executable, "-c", SURVIVOR, out], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    with open(out, "a") as f:
        f.write("00_lies.ipynb,00_where_the_memory_goes,1,1,1,1,4,4,graded,,\\n")
except OSError as err:
    print("cannot forge:", err)
"""

LIES_00 = ["bf16_bytes_7b, nf4_bytes_7b = FrameReader(1.0), FrameReader(1.0)",
           "adamw_state_bytes = RealLiar()",
           "largest = LyingStr('bananas')",
           "logits_bytes = FrameReader(12.0)\nn_params = 1\ndims = None"]

CHEATS_02 = [
    # deletes the lower blocks instead of freezing them: what trains is "the last k blocks" of what is left
    "def freeze_all_but_last(model, k):\n    layers = model.model.layers\n    del layers[:len(layers) - k]\n"
    "    model.requires_grad_(True)\n    model.model.embed_tokens.requires_grad_(False)",
    "def count_trainable(model):\n    raise SystemExit(0)",
    "K = 1\nstate_bytes_K = FrameReader(8.0)",
]
RIGHT_02 = [
    "def freeze_all_but_last(model, k):\n    model.requires_grad_(False)\n    layers = model.model.layers\n"
    "    for block in layers[len(layers) - k:]:\n        block.requires_grad_(True)\n"
    "    model.model.norm.requires_grad_(True)",
    "def count_trainable(model):\n    return sum(p.numel() for p in model.parameters() if p.requires_grad)",
]


def red_team_grader(folder: Path, *args, root: Path) -> Grader:
    out = folder / "grades.csv"
    return Grader(*args, "--out", out, root=root, log=folder / "log", RED_TEAM_ROOT=str(root), RED_TEAM_OUT=str(out))


def red_team_result(grader: Grader) -> dict:
    import time

    out = Path(grader.proc.args[grader.proc.args.index("--out") + 1])
    result = grader.wait()
    written = out.read_text(encoding="utf-8") if out.exists() else ""
    time.sleep(1.5)  # a survivor writes within 0.1 s of the CSV appearing
    return {"result": result, "out": out, "written": written, "rows": read_rows(out) if out.exists() else {}}


@pytest.fixture(scope="module")
def red_team(started, course):
    if "red_team" not in started:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap): the sandboxed grader is not tested")
    run = started["red_team"]
    return {**red_team_result(run["grader"]), "before": run["before"], "after": grade.course_digest(course)}


@pytest.mark.slow
def test_red_team_cheats_get_no_points_and_no_traceback(red_team):
    result, rows = red_team["result"], red_team["rows"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    lies, cheats = rows["00_lies.ipynb"], rows["02_cheats.ipynb"]
    assert lies["status"] == cheats["status"] == "graded", (lies["reason"], cheats["reason"])
    assert [lies[e] for e in EXERCISES_00] == ["0"] * 4, lies["reason"]
    assert (cheats["freeze_all_but_last"], cheats["count_trainable"], cheats["optimizer_state_bytes_k"],
            cheats["total"]) == ("0", "0", "0", "0"), cheats["reason"]
    assert "SystemExit" in cheats["reason"], cheats["reason"]


@pytest.mark.slow
def test_red_team_right_code_answers_still_get_their_points(red_team):
    row = red_team["rows"]["02_right.ipynb"]
    assert (row["freeze_all_but_last"], row["count_trainable"]) == ("1", "1"), row["reason"]


@pytest.mark.slow
def test_red_team_leaves_the_course_and_the_results_alone(red_team):
    assert red_team["after"] == red_team["before"]  # byte-identical course tree (the one graded against)
    final = red_team["out"].read_text(encoding="utf-8")
    assert final == red_team["written"] and "forged" not in final  # no survivor rewrote it
    assert final.count("00_lies.ipynb") == 1


@pytest.mark.slow
def test_without_a_sandbox_tampering_is_detected_and_nothing_survives(started):
    """--sandbox none, on a copy of the course: the attack may write into that copy; the grader must notice,
    give no points, stop, kill the detached process, and write the CSV after it is gone."""
    run = red_team_result(started["tamper"]["grader"])
    assert run["result"].returncode == 0, run["result"].stderr[-3000:]
    lies, later = run["rows"]["00_lies.ipynb"], run["rows"]["00_later.ipynb"]
    assert lies["status"] == "stopped" and lies["total"] == "0", lies["reason"]
    assert "changed the course (helpers/checks.py" in lies["reason"], lies["reason"]
    assert later["status"] == "not graded" and "an earlier submission changed the course" in later["reason"]
    final = run["out"].read_text(encoding="utf-8")
    assert final == run["written"] and "forged" not in final


@pytest.mark.slow
def test_measured_context_comes_from_the_solution_not_the_submission(tmp_path, monkeypatch):
    """A check that judges against the lesson's measurements gets them from the grader's own run of the
    solution notebook: a submission that measures (or fakes) other numbers cannot move the target."""
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    table = ('results = {"fp32": {"perplexity": 10.0, "bytes": 400}, "int8": {"perplexity": 10.3, "bytes": 200},\n'
             '           "nf4": {"perplexity": 11.5, "bytes": 100}}')
    nbformat.write(notebook(table, 'smallest_ok = "int8"', 'check("smallest_within_5_percent", smallest_ok, '
                                                           'results=results)'), solutions / "01_loading.ipynb")
    monkeypatch.setattr(grade, "SOLUTIONS", solutions)
    monkeypatch.setattr(grade, "_REFERENCE", {})
    limits = grade.Limits(cell_timeout=60, submission_timeout=120, memory=None, sandbox=grade.bubblewrap() is not None)
    faked = table.replace("11.5", "10.1")  # the submission's own table makes nf4 qualify
    rows = {}
    for label, answer in (("faked", "nf4"), ("right", "int8")):
        row = grade.Row(label)
        grade.grade_notebook(notebook(faked, f"smallest_ok = {answer!r}"), "01", row, limits)
        rows[label] = row
    assert rows["faked"].points == {"smallest_within_5_percent": 0.0}, rows["faked"].reasons
    assert "more than 5 % above" in " ".join(rows["faked"].reasons)
    assert rows["right"].points == {"smallest_within_5_percent": 1.0}, rows["right"].reasons


def test_a_library_that_builds_into_its_package_gets_a_private_writable_copy_in_the_sandbox():
    """optimum-quanto takes a lock file in its own package directory on every use (lesson 11): read-only, that
    is an OSError. Each submission gets a copy mounted over it; the installed package is never written."""
    dirs = grade._extension_build_dirs()
    if not dirs:
        pytest.skip("optimum-quanto is not installed")
    workspace = grade.Workspace(True)
    try:
        argv = workspace.command(["true"])
        (copy, target), = workspace.writable_copies
        assert target == dirs[0] and copy.is_relative_to(workspace.root) and (copy / "unpack.cpp").is_file()
        i = argv.index(str(copy))
        assert argv[i - 1:i + 2] == ["--bind", str(copy), str(target)]
        assert argv.index("--bind", argv.index(str(workspace.run))) < i  # after the read-only root it overrides
    finally:
        workspace.close()
