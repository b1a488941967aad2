"""The course report (python -m helpers.tools.course_report): headlines read from executed notebooks, a failing
lesson, a lesson without a headline, a partial run.

No real lesson runs here: the suite already executes every solution notebook (nbval), and each one's headline call
is checked in tests/test_headline.py. The lessons below are synthetic, in a temporary solutions folder.
"""

import json
from pathlib import Path

import matplotlib.image
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers.constants import MiB
from helpers.tools import course_report as report

HEADLINE = """\
from helpers.headline import headline

headline("a toy technique", measured={"before": before, "after": after}, predicted={"after": (guess, after)},
         quality={"perplexity": ppl}, time={"s per step": seconds}, extra={"share": share})"""


def notebook(*sources) -> nbformat.NotebookNode:
    cells = [new_markdown_cell(s[3:]) if s.startswith("md:") else new_code_cell(s) for s in sources]
    return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})


def assert_png(path: Path):
    assert path.read_bytes()[:8] == report.PNG_SIGNATURE, path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100, path


def toy_lessons(folder: Path) -> None:
    folder.mkdir()
    nbformat.write(notebook("md:# 90 · a lesson that passes",
                            "MiB = 2**20\nbefore = {'weights': 100 * MiB, 'activations': 60 * MiB}\n"
                            "after = {'weights': 25 * MiB, 'activations': 60 * MiB}",
                            "guess = 90 * MiB\nppl = 12.5\nseconds = 0.25\nshare = 0.1", HEADLINE),
                   folder / "90_fine.ipynb")
    nbformat.write(notebook("x = 1", "md:## The broken part", "raise ValueError('boom\\nmore detail')",
                            "open('never-ran', 'w')"), folder / "91_broken.ipynb")
    nbformat.write(notebook("y = 2"), folder / "92_noheadline.ipynb")


@pytest.mark.slow
def test_headlines_are_read_from_the_executed_lessons_and_a_failure_is_reported(tmp_path):
    toy_lessons(tmp_path / "solutions")
    out = tmp_path / "out"
    status = report.main(["--solutions", str(tmp_path / "solutions"), "--out", str(out), "--no-progress",
                          "--timeout", "60"])
    assert status == 1
    data = json.loads((out / "course_report.json").read_text())
    lessons = {lesson["lesson"]: lesson for lesson in data["lessons"]}
    assert [lessons[k]["status"] for k in ("90", "91", "92")] == ["passed", "failed", "passed"]
    fine = lessons["90"]
    assert fine["technique"] == "a toy technique" and fine["notes"] == []
    assert fine["cells_run"] == fine["cells_total"] == 3
    assert fine["headline"]["measured"][0] == {"label": "before", "total": 160 * MiB, "parts": {
        "weights": 100 * MiB, "gradients": 0, "optimizer": 0, "activations": 60 * MiB}}
    assert fine["headline"]["predicted"] == [{"label": "after", "predicted": 90 * MiB, "measured": 85 * MiB}]
    broken = lessons["91"]
    assert (broken["error"], broken["error_cell"], broken["error_section"]) == (
        "ValueError: boom", 2, "The broken part")
    assert broken["cells_run"] == 2 and not (tmp_path / "solutions" / "never-ran").exists()
    assert broken["notes"] == ["no headline: the lesson stopped before its headline cell"]
    assert lessons["92"]["headline"] is None and "states no headline" in lessons["92"]["notes"][0]
    assert not data["partial"]

    text = (out / "course_report.md").read_text()
    assert "Partial" not in text
    assert "| 91_broken | ❌ failed |" in text
    assert "Error in cell 2 (section “The broken part”): `ValueError: boom`" in text
    assert "| 90_fine | ✅ passed |" in text and "160.0 → 85.0 MiB (0.53x)" in text
    assert "Technique: a toy technique." in text
    assert "| after | 90.0 | 85.0 | +5.88 |" in text and "| perplexity | 12.5 |" in text
    assert "| s per step | 0.25 |" in text and "| share | 0.1 |" in text
    assert "92_noheadline" in text and "states no headline" in text
    assert "1 failed" in text
    for png in ("memory-90.png", "run-time.png", "predicted-vs-measured.png"):
        assert f"]({png})" in text
        assert_png(out / png)
    # the solutions were read, never written
    assert nbformat.read(tmp_path / "solutions" / "90_fine.ipynb", as_version=4).cells[1].outputs == []


def test_a_run_that_stops_early_leaves_a_report_that_says_it_is_partial(tmp_path, monkeypatch):
    toy_lessons(tmp_path / "solutions")
    ran = []

    def fake_run_lesson(path, timeout=900, cell_bar=None):
        if len(ran) == 1:
            assert "Partial report" in (tmp_path / "out" / "course_report.md").read_text()  # written after lesson 1
            raise KeyboardInterrupt
        ran.append(path)
        return report.LessonResult(lesson=path.stem[:2], name=path.stem, status="passed", seconds=3.0)

    monkeypatch.setattr(report, "run_lesson", fake_run_lesson)
    monkeypatch.setattr(report, "machine_lines", lambda: ["a test machine"])
    assert report.main(["--solutions", str(tmp_path / "solutions"), "--out", str(tmp_path / "out"),
                        "--no-progress"]) == 130
    text = (tmp_path / "out" / "course_report.md").read_text()
    assert "**Partial report**: 1 of 3 lessons done (interrupted). Not run: 91_broken, 92_noheadline." in text
    assert json.loads((tmp_path / "out" / "course_report.json").read_text())["partial"] is True
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no half-written files left


def test_the_report_is_written_under_its_own_names():
    assert report.DEFAULT_OUT.name == "course-report"
    assert (report.REPORT_MD, report.REPORT_JSON) == ("course_report.md", "course_report.json")
    ignored = (report.DEFAULT_OUT.parent / ".gitignore").read_text().split()
    assert "/course-report/" in ignored
