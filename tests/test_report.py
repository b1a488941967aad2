"""The course report (python -m helpers.tools.course_report): headlines read from executed notebooks, a failing
lesson, a lesson without a headline, a partial run.

No real lesson runs here: the suite already executes every solution notebook (nbval), and each one's headline call
is checked in tests/test_headline.py. The lessons below are synthetic, in a temporary solutions folder.
"""

import base64
import io
import json
import logging
from pathlib import Path

import matplotlib.image
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from helpers import plots
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


def tiny_png() -> bytes:
    fig = plots._figure((1.5, 1.5))
    fig.subplots().plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def toy_lessons(folder: Path) -> None:
    folder.mkdir()
    fine = notebook("md:# 90 · a lesson that passes",
                    "MiB = 2**20\nbefore = {'weights': 100 * MiB, 'activations': 60 * MiB}\n"
                    "after = {'weights': 25 * MiB, 'activations': 60 * MiB}",
                    "md:## The slow part", "import time\ntime.sleep(1.5)",
                    "md:## The figure", "from IPython.display import Image, display\nimport base64\n"
                    f"display(Image(data=base64.b64decode({base64.b64encode(tiny_png()).decode()!r})))",
                    "guess = 90 * MiB\nppl = 12.5\nseconds = 0.25\nshare = 0.1", HEADLINE)
    fine.cells[5].metadata["tags"] = [report.MAIN_FIGURE_TAG]
    nbformat.write(fine, folder / "90_fine.ipynb")
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
    assert fine["cells_run"] == fine["cells_total"] == 5
    assert (fine["slowest_cell"][0], fine["slowest_section"]) == (3, "The slow part")
    assert (fine["main_figure_cell"], fine["main_figure_section"]) == (5, "The figure") and "main_figure" not in fine
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
    assert "**Technique** (the lesson's headline): a toy technique\n" in text
    assert "Slowest cell: “The slow part” (cell 3, 1." in text
    assert "](main-figure-90.png)" in text and "(“The figure”, cell 5)" in text
    assert "| after | 90.0 | 85.0 | +5.88 |" in text and "| perplexity | 12.5 |" in text
    assert "| s per step | 0.25 |" in text and "| share | 0.1 |" in text
    assert "92_noheadline" in text and "states no headline" in text
    assert "1 failed" in text
    for png in ("memory-90.png", "main-figure-90.png", "savings.png", "run-time.png", "predicted-vs-measured.png"):
        assert f"]({png})" in text
        assert_png(out / png)
    # the solutions were read, never written
    assert nbformat.read(tmp_path / "solutions" / "90_fine.ipynb", as_version=4).cells[5].outputs == []


def test_a_run_that_stops_early_leaves_a_report_that_says_it_is_partial(tmp_path, monkeypatch):
    toy_lessons(tmp_path / "solutions")
    ran = []

    def fake_run_lesson(path, timeout=900, on_cell=None):
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


# --- the report's words, columns and plots, from results built here (no kernel) ---------------------------

def measured(label, moment=None, **parts):
    return {"label": label, "total": sum(parts.values()), "parts": {c: parts.get(c, 0) for c in plots.COLOURS},
            **({"moment": moment} if moment else {})}


def toy_result(lesson="90", minutes=2.0, advertised=1.0, **changes) -> report.LessonResult:
    """A lesson that passed in ``minutes``: inference, then a training step whose peak is at the start of backward."""
    headline = {"technique": "a toy technique, batch 2 x 8", "measured": [
        measured("inference, 2 x 8", weights=100 * MiB, activations=20 * MiB),
        measured("training step, 2 x 8", "backward start", weights=100 * MiB, optimizer=200 * MiB,
                 activations=60 * MiB)],
        "predicted": [{"label": "training step, 2 x 8", "predicted": 330 * MiB, "measured": 360 * MiB}]}
    result = report.LessonResult(lesson=lesson, name=f"{lesson}_toy", status="passed", seconds=60 * minutes,
                                 advertised_minutes=advertised, cells_run=4, cells_total=4, slowest_cell=(37, 41.2),
                                 slowest_section="Where the time goes", technique=headline["technique"],
                                 headline=headline)
    for key, value in changes.items():
        setattr(result, key, value)
    return result


def rendered(results, machine=("a test machine",)) -> str:
    return report.render(results, list(machine), {}, [])


def test_the_moment_of_each_peak_is_a_column_and_a_training_step_without_gradients_is_explained():
    text = rendered([toy_result()])
    assert "| peak MiB | moment of the peak | vs first |" in text
    assert "| inference, 2 x 8 | 100.0 | 0.0 | 0.0 | 20.0 | 120.0 | — | 1.00x |" in text
    assert "| training step, 2 x 8 | 100.0 | 0.0 | 200.0 | 60.0 | 360.0 | start of backward | 3.00x |" in text
    assert ("A training step can show 0 MiB of gradients because its peak is at the start of backward, before any "
            "gradient exists") in text


def test_the_timeline_section_the_report_points_to_is_in_lesson_00():
    from helpers.tools.runner import _HEADING

    nb = nbformat.read(next((report.ROOT / "solutions").glob("00_*.ipynb")), as_version=4)
    headings = [m.group(2) for c in nb.cells if c.cell_type == "markdown" for m in map(_HEADING.match,
                                                                                      c.source.splitlines()) if m]
    assert report.TIMELINE_SECTION in headings


def test_run_time_stands_beside_the_advertised_time_and_is_flagged_over_one_and_a_half_times_it():
    slow, at_limit, unknown = (toy_result("90", 2.0, 1.0), toy_result("91", 1.5, 1.0),
                               toy_result("92", 5.0, None))
    assert (slow.slow, at_limit.slow, unknown.slow) == (True, False, False)
    text = rendered([slow, at_limit, unknown])
    assert "| run time | advertised |" in text
    assert "| 90_toy | ✅ passed | 2 min 00 s ⚠️ 2.0× advertised | 1 min |" in text
    assert "| 91_toy | ✅ passed | 1 min 30 s | 1 min |" in text
    assert "| 92_toy | ✅ passed | 5 min 00 s | — |" in text
    assert "(1 over 1.5× the advertised time: 90)" in text
    assert "in 2 min 00 s (the course map advertises 1 min: ⚠️ 2.0× that)" in text
    assert "busy" not in text
    busy = rendered([toy_result(load=1000.0), toy_result("91", load=0.0)])
    assert "The machine was busy: a load average of 1000.0 on " in busy
    assert "the machine was busy (load average above its " in busy and ") during 90, which slows any lesson" in busy


def test_an_error_that_rounds_to_zero_has_no_minus_sign():
    result = toy_result()
    result.headline["predicted"] = [{"label": "exact", "predicted": 100 * MiB - 1, "measured": 100 * MiB}]
    assert "| exact | 100.0 | 100.0 | +0.00 |" in rendered([result])


def test_the_advertised_minutes_are_read_from_the_readme_course_map(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n| lesson | technique | minutes, 2-core CPU | on a T4 |\n|---|---|---|---|\n"
                      "| [00 Where](a.ipynb) [![Colab](b)](c) | t | 1 | 1 |\n"
                      "| [09 Sharding](d.ipynb) | a, b | 3.5, plus 1.5 once per machine | 3 |\n"
                      "| [12 Capstone](e.ipynb) | t | (to be measured) | 2 |\n\n| other | minutes |\n| 13 | 7 |\n")
    assert report.advertised_minutes(readme) == {"00": 1.0, "09": 3.5}
    assert report.advertised_minutes(tmp_path / "missing.md") == {}
    readme.write_text("| lesson | minutes |\n|---|---|\n| 00 | 1 |\n")
    assert report.advertised_minutes(readme) == {}
    lessons = {p.name[:2] for p in (report.ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")}
    assert set(report.advertised_minutes()) == lessons  # the real course map times every lesson


def test_the_report_says_what_passed_means_which_model_ran_the_ram_and_the_sign_of_the_error(monkeypatch):
    monkeypatch.setenv("COURSE_STRICT_CHECKS", "1")
    machine = [report.model_line({}), report.cpu_line("model name\t: A Test CPU\n")]
    text = rendered([toy_result()], machine)
    assert "- Model: SmolLM2-135M-Instruct, the course model (COURSE_MODEL not set)." in text
    assert "- CPU: A Test CPU, " in text and " GiB." in text.split("- CPU:")[1].split("\n")[0]
    assert ("**passed**: the lesson's solution notebook ran top to bottom in a fresh kernel, every `assert` in it held "
            "and every exercise check passed") in text
    assert ("**error %** = (predicted − measured) / measured: positive means the prediction is above the "
            "measurement.") in text
    assert "Model: Qwen/Qwen2.5-0.5B (set by COURSE_MODEL" in report.model_line({"COURSE_MODEL": "Qwen/Qwen2.5-0.5B"})
    assert report.memory_bytes() > 2**28
    monkeypatch.setenv("COURSE_STRICT_CHECKS", "0")
    assert "a failing exercise check does not fail the lesson" in rendered([toy_result()])


def test_the_slowest_cell_is_named_by_its_section():
    assert "Slowest cell: “Where the time goes” (cell 37, 41.2 s)." in rendered([toy_result()])
    assert "Slowest cell: cell 37 (41.2 s)." in rendered([toy_result(slowest_section=None)])


def test_the_technique_and_the_labels_are_the_lessons_own():
    text = rendered([toy_result()])
    assert "**Technique** (the lesson's headline): a toy technique, batch 2 x 8\n" in text
    labels = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| inference")
              or line.startswith("| training")]
    assert labels == ["inference, 2 x 8", "training step, 2 x 8", "training step, 2 x 8"]


def test_the_overview_chart_puts_each_lessons_after_on_its_own_baseline(tmp_path):
    one_config = toy_result("91")
    one_config.headline = {**one_config.headline, "measured": one_config.headline["measured"][:1]}
    rows = report.savings([toy_result("90"), one_config, toy_result("92", headline=None)])
    assert rows == [{"lesson": "90", "before_label": "inference, 2 x 8", "after_label": "training step, 2 x 8",
                     "before": 120 * MiB, "after": 360 * MiB, "percent": 300.0}]
    ax = plots.saving_bars([("a: x → y", 200 * MiB, 50 * MiB), ("b: p → q", 100 * MiB, 100 * MiB)])
    assert [round(bar.get_width()) for bar in ax.patches] == [25, 100]
    texts = [t.get_text() for t in ax.texts]
    assert "  25 %: 200.0 → 50.0 MiB" in texts and " baseline = 100 %" in texts
    assert "baseline" in ax.get_title() and "baseline = 100 %" in ax.get_xlabel()
    assert report.plot_savings([toy_result("90")], tmp_path / "savings.png")
    assert_png(tmp_path / "savings.png")
    assert not report.plot_savings([one_config], tmp_path / "none.png")


def test_the_main_figure_is_the_image_of_the_cell_tagged_main_figure(tmp_path):
    png = tiny_png()
    tagged = new_code_cell("plot()", metadata={"tags": ["main-figure"]})
    tagged.outputs = [new_output("stream", name="stdout", text="x"),
                      new_output("display_data", data={"image/png": base64.b64encode(png).decode(),
                                                       "text/plain": "<Figure>"})]
    other = new_code_cell("other()")
    other.outputs = [new_output("display_data", data={"image/png": base64.b64encode(tiny_png()).decode()})]
    assert report.main_figure(new_notebook(cells=[other, new_markdown_cell("# x"), tagged])) == (2, png)
    assert report.main_figure(new_notebook(cells=[other])) is None  # no cell tagged: nothing, quietly
    empty = new_code_cell("plot()", metadata={"tags": ["main-figure"]})
    assert report.main_figure(new_notebook(cells=[empty])) is None  # tagged, but the run stopped before it

    result = toy_result(main_figure=png, main_figure_cell=2, main_figure_section="Baseline, measured")
    md = report.write_report(tmp_path, [result], ["a test machine"])
    assert (tmp_path / "main-figure-90.png").read_bytes() == png
    text = md.read_text()
    assert "![90_toy: the lesson's main figure](main-figure-90.png)" in text
    assert "(“Baseline, measured”, cell 2)" in text
    assert "main_figure" not in json.loads((tmp_path / "course_report.json").read_text())["lessons"][0]


def test_the_report_plots_use_no_category_colour():
    from matplotlib.colors import to_hex

    categories = {c.lower() for c in plots.COLOURS.values()}
    figures = [plots.prediction_errors([("a", 110 * MiB, 100 * MiB), ("b", 50 * MiB, 100 * MiB)]),
               plots.run_times([("90_a", 30, True, 1.0), ("91_b", 200, False, 1.0), ("92_c", 10, True, None)]).figure,
               plots.saving_bars([("a", 2 * MiB, MiB)]).figure]
    used = set()
    for fig in figures:
        for ax in fig.axes:
            for artist in [*ax.patches, *ax.collections, *ax.lines]:
                for get in ("get_facecolor", "get_color", "get_edgecolor"):
                    colours = getattr(artist, get, lambda: [])()
                    colours = [colours] if isinstance(colours, str) or len(colours) in (3, 4) and not hasattr(
                        colours[0], "__len__") else colours
                    used |= {to_hex(c) for c in colours}
    assert used and not used & categories


def test_the_memory_plot_keeps_the_lessons_labels_wraps_them_and_puts_the_legend_below():
    labels = ["train everything", "train the last K blocks + norm", "freeze the bottom, plain SGD, 2 x 128"]
    parts = {"weights": 100 * MiB, "gradients": 10 * MiB, "optimizer": 20 * MiB, "activations": 30 * MiB}
    ax = plots.measured_bars(dict.fromkeys(labels, parts), moments=dict.fromkeys(labels, "backward start"))
    fig = ax.figure
    fig.canvas.draw()
    ticks = ax.get_xticklabels()
    assert [" ".join(t.get_text().split()) for t in ticks] == labels  # the same words, only wrapped
    assert all(len(line) <= plots.LABEL_CHARS for t in ticks for line in t.get_text().split("\n"))
    boxes = [t.get_window_extent() for t in ticks]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False))  # side by side, none overlapping
    assert all(t.get_rotation() == 0 for t in ticks)
    legend = ax.get_legend().get_window_extent()
    assert legend.y1 < min(b.y0 for b in boxes) and legend.width < fig.bbox.width
    assert sum(t.get_gid() == "moment" for t in ax.texts) == 3


def test_progress_in_a_log_is_plain_lines():
    stream = io.StringIO()  # not a terminal, as stderr is under `2> file`
    shown = report.Progress(2, stream=stream, every=0)
    shown.start("90_toy")
    shown.cell(None, 1, 4)
    shown.finish(toy_result())
    shown.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == ["[1/2] 90_toy: running", "[1/2] 90_toy: 1 of 4 code cells done",
                                 "[1/2] 90_toy: passed in 2 min 00 s (⚠️ 2.0× advertised)"]
    assert report.Progress(2, enabled=False, stream=stream).lines is False


def test_the_bitsandbytes_kernels_warning_is_silenced(caplog):
    report.quiet_libraries()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "No module named 'kernels'")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
