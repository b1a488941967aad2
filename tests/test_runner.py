"""helpers.tools.runner: one notebook, cell by cell, in a fresh kernel, with limits.

Tiny synthetic notebooks only; every kernel here starts in about a second.
"""

import os

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers.tools import runner
from helpers.tools.runner import NotebookRun, run_notebook


def notebook(*cells):
    return new_notebook(cells=[new_markdown_cell(c[3:]) if c.startswith("md:") else new_code_cell(c) for c in cells])


def test_the_nearest_heading_above_a_cell():
    nb = notebook("md:# Lesson\n\n## Baseline, measured\ntext", "x = 1", "md:no heading here", "y = 2",
                  "md:### Exercise 2 ###\n", "z = 3")
    assert [runner.section_heading(nb, i) for i in (0, 1, 3, 5)] == [None, "Baseline, measured",
                                                                    "Baseline, measured", "Exercise 2"]


def test_the_kernel_environment(monkeypatch):
    base = {"PYTHONPATH": "/a", "COURSE_STRICT_CHECKS": "0", "HOME": "/h"}
    env = runner.kernel_env(base, strict_checks=True, pythonpath=["/course"])
    assert env == {"PYTHONPATH": "/course" + os.pathsep + "/a", "COURSE_STRICT_CHECKS": "0", "HOME": "/h",
                   "COURSE_PROGRESS": "0"}  # strict: set unless the caller set it already
    assert runner.kernel_env({}, strict_checks=True)["COURSE_STRICT_CHECKS"] == "1"
    assert "COURSE_STRICT_CHECKS" not in runner.kernel_env(base, strict_checks=False)
    assert "COURSE_PROGRESS" not in runner.kernel_env({}, progress_bars=True)
    assert base == {"PYTHONPATH": "/a", "COURSE_STRICT_CHECKS": "0", "HOME": "/h"}  # not changed


@pytest.mark.slow
def test_a_run_with_an_error_stops_there_and_says_where(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("COURSE_STRICT_CHECKS", "1")
    seen, started = [], []
    nb = notebook("md:## Set-up", "import os\nprint('in', os.getcwd())", "",
                  "print(os.environ.get('COURSE_PROGRESS'), os.environ.get('COURSE_STRICT_CHECKS'))",
                  "md:## The broken part", "raise ValueError('boom\\nmore detail')", "open('never-ran', 'w')")
    result = run_notebook(nb, cwd=tmp_path, strict_checks=False, progress=lambda c, done, total: seen.append(
        (c.index, done, total)), before_cell=lambda *where: started.append(where))
    assert not result.ok and result.stopped == "error" and result.not_run == [6]
    assert [c.status for c in result.cells] == ["ok", "ok", "error"]
    assert result.cells[0].stdout == f"in {tmp_path}\n" and result.cells[1].stdout == "0 None\n"
    assert (result.error.index, result.error.heading, result.error.ename, result.error.message) == (
        5, "The broken part", "ValueError", "ValueError: boom")
    assert str(result.error) == "cell 5 (in “The broken part”): ValueError: boom"
    assert seen == started == [(1, 1, 4), (3, 2, 4), (5, 3, 4)]
    assert all(c.seconds >= 0 for c in result.cells) and result.seconds >= sum(c.seconds for c in result.cells)
    assert nb.cells[5].outputs[0].output_type == "error"  # the notebook object holds the outputs
    assert not (tmp_path / "never-ran").exists()
    # The kernel's stderr is the console's: IPC sockets, so ipykernel has no plain-text TCP to warn about.
    assert "without encryption" not in capfd.readouterr().err


@pytest.mark.slow
def test_time_limits_interrupt_and_later_cells_run(tmp_path):
    nb = notebook("import time\ntime.sleep(30)", "print('after')", "while True:\n    pass",
                  "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
                  "print('never')")
    result = run_notebook(nb, cwd=tmp_path, cell_timeout=2, interrupt_grace=3, stop_on_error=False)
    assert [(c.index, c.status) for c in result.cells] == [(0, "timeout"), (1, "ok"), (2, "timeout"), (3, "stuck")]
    assert result.cells[0].ename == "KeyboardInterrupt" and result.cells[1].stdout == "after\n"
    assert result.stopped == "kernel" and result.not_run == [4]
    assert result.error.index == 0 and result.error.message.startswith("timed out: the cell ran longer than its limit")
    assert result.cells[0].seconds < 10


@pytest.mark.slow
def test_a_total_limit_a_memory_limit_a_dead_kernel_and_an_output_cap(tmp_path):
    hog = "hog = bytearray(2 * 2**30)"
    nb = notebook(hog, "print('x' * 5000)", "import time\ntime.sleep(30)", "print('not reached')")
    result = run_notebook(nb, cwd=tmp_path, memory_limit=512 * 2**20, total_timeout=8, max_output_bytes=1000,
                          stop_on_error=False, quiet_kernel=True)
    assert [c.status for c in result.cells] == ["error", "ok", "timeout"]
    assert result.cells[0].ename == "MemoryError"
    assert "output cut at 1,000 bytes" in nb.cells[1].outputs[-1].text and result.cells[1].stdout == ""
    assert result.stopped == "time" and result.not_run == [3]

    with NotebookRun(notebook("x = 41"), cwd=tmp_path) as run:
        assert run.run_cells().ok
        assert run.run_code("print(x + 1)", timeout=30).stdout == "42\n"
        assert len(run.nb.cells) == 1  # run_code's cells are not kept
        died = run.run_code("import os\nos._exit(1)", timeout=30)
        assert died.status == "dead" and not run.alive
        assert run.run_code("print(1)").status == "dead"


def test_a_kernel_that_does_not_start_is_a_result(tmp_path):
    result = run_notebook(notebook("x = 1"), cwd=tmp_path, launcher=lambda argv: ["/nonexistent/program", *argv],
                          startup_timeout=5)
    assert result.stopped == "start" and result.not_run == [0] and result.error.index is None
    assert result.error.message.startswith("the kernel did not start")
