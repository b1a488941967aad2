"""Every student notebook runs to the end: the only errors are its unanswered exercises."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers.notebooks import CODE_STUB

ROOT = Path(__file__).resolve().parents[1]
STUDENT = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", STUDENT, ids=[p.stem for p in STUDENT])
def test_student_notebook_runs_apart_from_its_exercises(path, monkeypatch):
    monkeypatch.delenv("COURSE_STRICT_CHECKS", raising=False)  # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
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
    assert os.environ.get("COURSE_STRICT_CHECKS") is None
