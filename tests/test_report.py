"""The course report (python -m helpers.tools.course_report): headline specs, a failing lesson, a partial run.

The full suite already executes every solution notebook (nbval), so only lesson 00 is run for real here;
every other lesson's spec is checked statically against its solution notebook.
"""

import json
import re
from pathlib import Path

import matplotlib.image
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers.constants import LESSON_PATTERN, ROOT
from helpers.memory import MemoryReport
from helpers.tools import course_report as report

SOLUTIONS = ROOT / "solutions"
MiB = 2**20


def solution(lesson: str) -> Path:
    hits = sorted(SOLUTIONS.glob(f"{lesson}_*.ipynb"))
    assert len(hits) == 1, f"lesson {lesson}: {hits}"
    return hits[0]


def notebook(*sources) -> nbformat.NotebookNode:
    return new_notebook(cells=[new_code_cell(s) for s in sources],
                        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def assert_png(path: Path):
    assert path.read_bytes()[:8] == report.PNG_SIGNATURE, path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100, path


# --- the specs, statically ----------------------------------------------------------------------------

@pytest.mark.parametrize("lesson", sorted(report.SPECS))
def test_spec_uses_only_names_its_solution_notebook_binds(lesson):
    spec = report.SPECS[lesson]
    nb = nbformat.read(solution(lesson), as_version=4)
    assert spec.configs or spec.predicted, "a spec says at least what the lesson measured"
    assert report.unbound_names(spec, nb) == {}


def test_every_lesson_has_a_spec():
    lessons = sorted(p.name[:2] for p in SOLUTIONS.glob(LESSON_PATTERN))
    assert "12" in lessons and [lesson for lesson in lessons if lesson not in report.SPECS] == []


def test_the_static_check_catches_a_renamed_variable():
    nb = notebook("import torch\nfrom helpers.memory import measure as m\nreport_full = 1\nfor k in range(3):\n"
                  "    loop_result = k\n    del_me = 2\n    del del_me",
                  "def helper():\n    inside = 1\n    return inside\nsquares = [n * n for n in range(3)]\n"
                  "try:\n    pass\nexcept ValueError as err:\n    caught = err\n%time x = 1")
    assert report.notebook_names(nb) >= {"torch", "m", "report_full", "k", "loop_result", "helper", "squares",
                                         "caught"}
    assert not report.notebook_names(nb) & {"del_me", "inside", "n", "err"}
    good = report.Headline("t", configs=(("a", "report_full"),), quality=(("q", "[loop_result for _ in range(2)]"),),
                           time=(("t", "(lambda v: v)(helper())"),))
    assert report.unbound_names(good, nb) == {}
    renamed = report.Headline("t", configs=(("a", "report"),), predicted=(("p", "m(del_me)", "squares[0]"),))
    assert report.unbound_names(renamed, nb) == {"report": {"report"}, "m(del_me)": {"del_me"}}


def test_headline_values_reads_reports_dicts_and_numbers_and_reports_errors():
    namespace = {"measured": MemoryReport(weights=3 * MiB, activations=MiB), "guess": 5 * MiB, "ppl": 12,
                 "parts": {"weights": 2 * MiB}}
    spec = report.Headline("t", configs=(("m", "measured"), ("d", "parts")), predicted=(("p", "guess", "measured"),),
                           quality=(("q", "ppl"), ("bad", "missing + 1")))
    values = report._headline_values(spec.for_kernel(), namespace)
    assert values["configs"][0] == {"label": "m", "total": 4 * MiB,
                                    "parts": {"weights": 3 * MiB, "gradients": 0, "optimizer": 0,
                                              "activations": MiB}}
    assert values["configs"][1]["total"] == 2 * MiB
    assert values["predicted"] == [{"label": "p", "predicted": 5 * MiB, "measured": 4 * MiB}]
    assert values["quality"][0] == {"label": "q", "value": 12.0}
    assert values["quality"][1]["error"].startswith("NameError")
    assert report.error_percent(values["predicted"][0]) == 25.0


# --- running lessons ----------------------------------------------------------------------------------

def toy_lessons(folder: Path):
    folder.mkdir()
    fine = notebook("MiB = 2**20\nbefore = {'weights': 100 * MiB, 'activations': 60 * MiB}\n"
                    "after = {'weights': 25 * MiB, 'activations': 60 * MiB}", "guess = 90 * MiB\nppl = 12.5")
    fine.cells.insert(0, new_markdown_cell("# a lesson that passes"))
    nbformat.write(fine, folder / "90_fine.ipynb")
    nbformat.write(notebook("x = 1", "raise ValueError('boom\\nmore detail')", "open('never-ran', 'w')"),
                   folder / "91_broken.ipynb")
    nbformat.write(notebook("y = 2"), folder / "92_nospec.ipynb")
    return {"90": report.Headline("a toy", configs=(("before", "before"), ("after", "after")),
                                  predicted=(("after", "guess", "after"),),
                                  quality=(("perplexity", "ppl"), ("renamed", "old_name")))}


def test_a_failing_lesson_is_reported_and_the_report_carries_on(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "SPECS", toy_lessons(tmp_path / "solutions"))
    out = tmp_path / "out"
    status = report.main(["--solutions", str(tmp_path / "solutions"), "--out", str(out), "--no-progress",
                          "--timeout", "60"])
    assert status == 1
    data = json.loads((out / "report.json").read_text())
    lessons = {lesson["lesson"]: lesson for lesson in data["lessons"]}
    assert [lessons[k]["status"] for k in ("90", "91", "92")] == ["passed", "failed", "passed"]
    assert lessons["91"]["error"] == "ValueError: boom" and lessons["91"]["error_cell"] == 1
    assert lessons["91"]["cells_run"] == 2 and not (tmp_path / "solutions" / "never-ran").exists()
    assert not data["partial"]
    text = (out / "report.md").read_text()
    assert "Partial" not in text
    assert "| 91_broken | ❌ failed |" in text and "Error in cell 1: `ValueError: boom`" in text
    assert "| 90_fine | ✅ passed |" in text and "160.0 → 85.0 MiB (0.53x)" in text
    assert "| after | 90.0 | 85.0 | +5.88 |" in text and "| perplexity | 12.5 |" in text
    assert "could not evaluate: renamed (NameError" in text          # a spec that fails: a note, not a crash
    assert "92_nospec" in text and "no headline spec" in text
    assert "1 failed" in text
    for png in ("memory-90.png", "run-time.png", "predicted-vs-measured.png"):
        assert f"]({png})" in text
        assert_png(out / png)
    # the solutions were read, never written
    assert nbformat.read(tmp_path / "solutions" / "90_fine.ipynb", as_version=4).cells[1].outputs == []


def test_a_run_that_stops_early_leaves_a_report_that_says_it_is_partial(tmp_path, monkeypatch):
    toy_lessons(tmp_path / "solutions")
    ran = []

    def fake_run_lesson(path, timeout=900, spec=None, cell_bar=None):
        if len(ran) == 1:
            assert "Partial report" in (tmp_path / "out" / "report.md").read_text()   # written after lesson 1
            raise KeyboardInterrupt
        ran.append(path)
        return report.LessonResult(lesson=path.stem[:2], name=path.stem, status="passed", seconds=3.0)

    monkeypatch.setattr(report, "run_lesson", fake_run_lesson)
    monkeypatch.setattr(report, "machine_lines", lambda: ["a test machine"])
    assert report.main(["--solutions", str(tmp_path / "solutions"), "--out", str(tmp_path / "out"),
                        "--no-progress"]) == 130
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**Partial report**: 1 of 3 lessons done (interrupted). Not run: 91_broken, 92_nospec." in text
    assert json.loads((tmp_path / "out" / "report.json").read_text())["partial"] is True
    assert not list((tmp_path / "out").glob(".*tmp*"))                          # no half-written files left


@pytest.mark.slow
def test_lesson_00_for_real(tmp_path):
    out = tmp_path / "out"
    assert report.main(["--lessons", "00", "--out", str(out), "--no-progress"]) == 0
    [lesson] = json.loads((out / "report.json").read_text())["lessons"]
    assert lesson["status"] == "passed" and lesson["error"] is None and lesson["notes"] == []
    assert lesson["cells_run"] == lesson["cells_total"] > 20 and lesson["seconds"] > 5
    headline = lesson["headline"]
    configs = {row["label"]: row for row in headline["configs"]}
    inference, training = configs["inference, 4 x 128"], configs["training step, fp32 AdamW, 4 x 128"]

    # The numbers match what the lesson printed when its solution was saved (exact bytes, same code).
    printed = "".join(o.get("text", "") for cell in nbformat.read(solution("00"), as_version=4).cells
                      for o in cell.get("outputs", []))
    for row, name in ((inference, "inference"), (training, "training")):
        shown = float(re.search(rf"{name}: +peak ([\d,.]+) MiB", printed).group(1).replace(",", ""))
        assert abs(row["total"] / MiB - shown) < 0.01 * shown, (name, row["total"] / MiB, shown)
        assert row["total"] == sum(row["parts"].values())
    assert abs(training["parts"]["optimizer"] / training["parts"]["weights"] - 2) < 0.01   # AdamW: two moments
    ppl = float(re.search(r"held-out perplexity of the course model[^:]*: ([\d.]+)", printed).group(1))
    [quality] = headline["quality"]
    assert abs(quality["value"] - ppl) < 0.1
    assert len(headline["predicted"]) == 3
    assert all(abs(report.error_percent(row)) < 10 for row in headline["predicted"])

    text = (out / "report.md").read_text()
    ratio = training["total"] / inference["total"]
    assert ("| 00_where_the_memory_goes | ✅ passed |" in text
            and f"{inference['total'] / MiB:,.1f} → {training['total'] / MiB:,.1f} MiB ({ratio:.2f}x)" in text)
    for row in headline["predicted"]:
        assert (f"| {row['label']} | {row['predicted'] / MiB:,.1f} | {row['measured'] / MiB:,.1f} | "
                f"{report.error_percent(row):+.2f} |") in text
    assert f"| held-out perplexity (16 chunks) | {quality['value']:,.4g} |" in text
    assert "## This machine" in text and "bf16:" in text and "Partial" not in text
    for png in ("memory-00.png", "run-time.png", "predicted-vs-measured.png"):
        assert f"]({png})" in text
        assert_png(out / png)
