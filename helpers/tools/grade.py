"""Batch grading of submitted lesson notebooks.

    python -m helpers.tools.grade SUBMISSIONS... [--out grades.csv] [--lesson NN]
                            [--cell-timeout 600] [--submission-timeout 1800] [--memory-limit 8G]
                            [--sandbox auto|bwrap|none] [--quiet]

SUBMISSIONS are notebook files or folders of them (``*.ipynb``). Each one gets one row in the CSV: its
lesson, the points of every exercise, the total, the maximum, and the reason for every point not given.

How a submission is graded:
- The lesson is told from the notebook's cells (their ids and sources, compared with every lesson), or
  from a file name starting ``NN_``, or from ``--lesson NN``. A file that is not a notebook, a truncated
  file, a notebook whose lesson cannot be told, or a notebook of another lesson than the one it claims
  gets a row with the reason and no points; nothing in it is executed. Its maximum is the lesson's when the lesson
  is known (``--lesson``, the file name), else empty: 0 of 0 would read as full marks in a gradebook.
- An unchanged handout (every answer cell still the stub the student notebook was handed out with, and no code
  added or edited; outputs, metadata and markdown do not count) is "blank (unchanged from the handout)": 0 points
  of the lesson's maximum, and not run, since it answers nothing.
- The submission is read once, into memory, and never written to.

How it runs (what a submission can and cannot reach):
- Each submission gets a private workspace (a new temporary folder, mode 700): a *copy* of the course's code
  (``helpers/`` etc.; no links into the live tree) and an empty working folder, ``notebooks/``. Its code
  cells run one by one in a fresh kernel started there (``helpers.tools.runner``), with the course copy on
  ``PYTHONPATH``.
- With bubblewrap (``--sandbox auto``, the default, when ``bwrap`` is installed and works) the kernel runs
  with the whole filesystem read-only except its working folder, in its own PID
  namespace (it cannot see or signal the grader or other processes, nor read their command lines) and
  without network. Without it the kernel runs as you: it could write any file you can. The grader then
  still works in a private copy, kills every process the submission left, and compares a digest of the
  course tree before and after each submission: a submission that changed it gets no points and grading
  stops (restore the course, then grade again).
- Each cell has a time limit (``--cell-timeout``); a cell over it is interrupted and the next cell runs,
  so later exercises still count. A cell that ignores the interrupt ends the run (the kernel is
  stopped). ``--submission-timeout`` bounds the whole notebook.
- The kernel starts with a memory limit (``--memory-limit``): ``RLIMIT_DATA``, soft and hard, set in the
  kernel process before Python starts, so no cell can raise it. It bounds the process's writable
  private memory (heap, anonymous mmaps: every torch and numpy tensor on the CPU). An allocation over it
  fails with ``MemoryError`` (Python) or "can't allocate memory" (torch), which the row reports. Child
  processes inherit the limit, each on its own. ``RLIMIT_AS`` is not used: it counts address space that
  torch and the BLAS libraries reserve but never touch.
- When the cells have run, the grader reads each answer out of the kernel as plain data (``helpers.checks``:
  exact built-in types; the *answer key* is the answer expression of every ``check("name", answer)``
  call of the lesson's solution notebook). A function (a code answer) is pickled instead and run by the
  exercise's probe in a separate short-lived process, sandboxed the same way, on inputs the probe builds;
  what it did comes back as data. Then every process of the submission is killed (the kernel's session,
  the sandbox's PID namespace, and any orphan: the grader is a child subreaper, so detached processes are
  adopted and found).
- The verdicts are computed by the grader itself, from that data, against context it computes from the
  lesson's fixed inputs, with the checks it loaded before any submission ran. Nothing the notebook
  defines, patches or prints can change a check; the most it can do is give an answer. The few checks
  that judge against the lesson's own measurements get them from the grader's own run of the
  *solution* notebook (once per lesson per grader run), never from the submission.
- ``COURSE_STRICT_CHECKS`` is removed from the environment of everything a submission runs.
- The CSV is written once, after every submission's processes are gone.

CSV columns: ``submission, lesson`` (``05 QLoRA``: its number and title, as in the summary table), one column per
exercise, named with its maximum (``weights_7b (max 1)``; the union over the lessons graded in this run, in lesson
order; empty for exercises of another lesson), ``total, max`` (both empty when no lesson could be told),
``status`` (``graded`` or ``not graded``; ``stopped`` for a submission that changed the course),
``peak_memory_mib`` (the kernel's peak resident memory, read by the grader from /proc) and ``reason``, in full: why
the submission was not graded, what went wrong while it ran (time and memory limits, a dead kernel), and for
every exercise short of full points, the check's own feedback. The summary table on stdout uses the same lesson
and exercise names, and shows each row's first reason cut at a word boundary.

While a submission runs, stderr shows which one (k of n), which cell and the section above it, and the time so far:
one line redrawn in place on a terminal, plain lines now and then in a log file (``--quiet``: none).
The exit status is 0 whenever the grader ran, whatever the submissions held; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import LESSON_PATTERN, ROOT
from .runner import INTERRUPT_GRACE, CellRun, NotebookRun, limits_preexec, section_heading

SOLUTIONS = ROOT / "solutions"
MAX_BYTES = 100 * 2**20  # a lesson notebook with its outputs is a few MB
RECOGNISED = 0.25  # share of a lesson's cells a notebook must contain (by id or source) to be recognised
DEFAULT_CELL_TIMEOUT = 600  # seconds: the suite's nbval limit; the slowest real cell takes about 2 minutes
DEFAULT_SUBMISSION_TIMEOUT = 1800
DEFAULT_MEMORY_LIMIT = "8G"
CHECK_TIMEOUT = 60  # at least this for reading one answer out of the kernel
OUTPUT_LIMIT = 8 * 2**20  # bytes of output one cell may keep in the grader's memory
MESSAGE_LIMIT = 600  # characters of one check's feedback kept (a bound on what a submission's answer can make it)
REASON_WIDTH = 72  # characters of the first reason shown in the summary table (the CSV keeps every reason in full)
LOG_EVERY = 60  # seconds between progress lines when stderr is a file, not a terminal
OUT_OF_MEMORY = ("MemoryError", "can't allocate memory", "Cannot allocate memory", "bad_alloc", "out of memory")


# Warnings a library logs in the grader's own process that say nothing about a submission: bitsandbytes, imported
# to read lesson 01's quantization configs, warns once per run on CPUs with AVX512-BF16 that an optional fast kernel
# package is missing. The grader multiplies nothing in 4 bits. Only these messages are dropped; the loggers' others
# pass.
LIBRARY_NOISE = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",)}


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_library_noise() -> None:
    for name, starts in LIBRARY_NOISE.items():
        logging.getLogger(name).addFilter(_DropMessages(starts))


# ------------------------------------------------------------------------------------------------
# The answer key: the check calls of a lesson's solution notebook
# ------------------------------------------------------------------------------------------------
@dataclass
class CheckCall:
    name: str
    answer: str  # the solution's answer expression, evaluated in the graded kernel: it only yields data
    measured: dict[str, str] = field(default_factory=dict)  # the exercise's measured names -> expressions
    points: float = 1.0
    code: bool = False  # a code answer: a function run by the exercise's probe in a separate process


def lessons() -> dict[str, Path]:
    """Lesson number ("00") -> its solution notebook."""
    return {p.name[:2]: p for p in sorted(SOLUTIONS.glob(LESSON_PATTERN))}


def _parse_cell(source: str):
    try:
        return ast.parse(source)
    except SyntaxError:
        pass
    try:  # IPython syntax (%magics, !commands): transform it to Python first
        from IPython.core.inputtransformer2 import TransformerManager

        return ast.parse(TransformerManager().transform_cell(source))
    except Exception:
        return None


def check_calls(nb) -> list[CheckCall]:
    """Every ``check("name", answer, **measured)`` call in the notebook's code cells, first call per name."""
    calls: dict[str, CheckCall] = {}
    for cell in nb.cells:
        if cell.cell_type != "code" or "check" not in cell.source:
            continue
        tree = _parse_cell(cell.source)
        for node in ast.walk(tree) if tree else []:
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and node.args[0].value not in calls):
                answer = ast.unparse(node.args[1]) if len(node.args) > 1 else "None"
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}
                calls[node.args[0].value] = CheckCall(node.args[0].value, answer, keywords)
    return list(calls.values())


def answer_key(lesson: str) -> list[CheckCall]:
    """The lesson's check calls, with each exercise's points, kind, and only the keywords it measures."""
    import nbformat

    from helpers.checks import EXERCISES, _load_lesson_checks

    with contextlib.suppress(Exception):  # a lesson being written may not import: grade with the rest
        _load_lesson_checks()
    calls = check_calls(nbformat.read(lessons()[lesson], as_version=4))
    for call in calls:
        ex = EXERCISES.get(call.name)
        call.points = ex.points if ex else 1.0
        call.code = bool(ex and ex.probe)
        call.measured = {k: v for k, v in call.measured.items() if ex and k in ex.measured}
    return calls


# ------------------------------------------------------------------------------------------------
# Reading a submission and telling its lesson
# ------------------------------------------------------------------------------------------------
def read_submission(path: Path):
    """(notebook, None) or (None, the reason it cannot be graded). Reads the file once, writes nothing."""
    import nbformat

    try:
        if path.is_dir():
            return None, "a folder, not a notebook"
        size = path.stat().st_size
        if size > MAX_BYTES:
            return None, f"the file is {size / 2**20:,.0f} MiB, far larger than a lesson notebook"
        data = path.read_bytes()
    except OSError as err:
        return None, f"cannot read the file ({err.strerror or err})"
    if not data.strip():
        return None, "the file is empty"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not a notebook: the file is not text (binary data)"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}: {err.msg}"
        if text.lstrip().startswith("{") and ('"cells"' in text or '"nbformat"' in text):
            ends_early = err.pos >= len(text.rstrip()) - 1 or err.msg.startswith("Unterminated")
            return None, ("a damaged notebook: its JSON " + ("ends early (truncated file?)" if ends_early else
                                                             "is broken") + f" ({where})")
        return None, f"not a notebook: the file is not JSON ({where})"
    if not isinstance(raw, dict) or ("cells" not in raw and "worksheets" not in raw):
        return None, "not a notebook: valid JSON, but it has no cells"
    try:
        nb = nbformat.reads(text, as_version=4)
        for cell in nb.cells:
            if cell.cell_type not in ("code", "markdown", "raw") or not isinstance(cell.source, str):
                raise ValueError(f"a cell of type {cell.get('cell_type')!r} without source text")
    except Exception as err:
        return None, f"not a valid notebook ({type(err).__name__}: {shorten(err, 160)})"
    return nb, None


def shorten(text, width: int) -> str:
    """``text`` on one line, at most ``width`` characters: cut at a word boundary (in a long path or name, after a
    separator), with "…" to say so."""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    head = text[:width - 1]
    if text[width - 1] != " ":  # the cut falls inside a word: go back to its start
        space = head.rfind(" ")
        separator = max(head.rfind(c) for c in "/\\._-,:;")
        if space >= width // 2 or (space > 0 and separator < width // 2):
            head = head[:space]
        elif separator >= width // 2:  # one long word (a path): after its last separator
            head = head[:separator + 1]
    return head.rstrip(" ,;:") + "…"


def _normal(source: str) -> str:
    return " ".join(source.split())


_HANDOUTS: dict[str, tuple] = {}
_FINGERPRINTS: dict[str, list[tuple[str | None, set[str]]]] = {}


def _handouts() -> dict[str, tuple]:
    """Per lesson: (its solution notebook, the student notebook handed out, which ``student_version`` makes of it)."""
    if not _HANDOUTS:
        import nbformat

        from helpers.tools.notebooks import student_version

        for lesson, path in lessons().items():
            try:
                solution = nbformat.read(path, as_version=4)
                _HANDOUTS[lesson] = solution, student_version(solution, path.name)
            except Exception:  # a lesson being written can be broken for a while; it is just not recognised
                continue
    return _HANDOUTS


def _fingerprints() -> dict[str, list[tuple[str | None, set[str]]]]:
    """Per lesson, per cell other than the set-up cell: (cell id, normalised sources: student and solution)."""
    if not _FINGERPRINTS:
        from helpers.tools.colab import SETUP_CELL

        for lesson, (solution, student) in _handouts().items():
            by_id = {c.get("id"): c for c in solution.cells}
            cells = []
            for cell in student.cells:
                if cell.source == SETUP_CELL:
                    continue
                sources = {_normal(cell.source)}
                if cell.get("id") in by_id:
                    sources.add(_normal(by_id[cell.get("id")].source))
                cells.append((cell.get("id"), {s for s in sources if len(s) >= 20}))
            _FINGERPRINTS[lesson] = cells
    return _FINGERPRINTS


def _lines(source: str) -> str:
    """A cell's source without blank lines or trailing spaces (what an editor changes unnoticed); indentation kept."""
    return "\n".join(line.rstrip() for line in source.strip().splitlines() if line.strip())


def _is_stub(cell) -> bool:
    """An answer cell as handed out: ``student_version`` put a stub where the solution's region was."""
    from helpers.tools.notebooks import CODE_STUB, MARKDOWN_STUB

    stub = "\n".join(CODE_STUB if cell.cell_type == "code" else MARKDOWN_STUB)
    return cell.cell_type in ("code", "markdown") and stub in _lines(cell.source)


def unchanged_handout(nb, lesson: str) -> bool:
    """True if ``nb`` is lesson ``lesson``'s student notebook as handed out: every answer cell still holds its stub
    and no code cell was added or edited. Outputs, metadata, cell ids, the lesson's own markdown and deleted cells
    other than answer cells do not count. Such a notebook answers nothing, whatever it ran."""
    if lesson not in _handouts():
        return False
    student = _handouts()[lesson][1]
    stubs = {(c.cell_type, _lines(c.source)) for c in student.cells if _is_stub(c)}
    handout_code = {_lines(c.source) for c in student.cells if c.cell_type == "code"}
    cells = {(c.cell_type, _lines(c.source)) for c in nb.cells if c.source.strip()}
    return bool(stubs) and stubs <= cells and {s for kind, s in cells if kind == "code"} <= handout_code


def lesson_scores(nb) -> dict[str, float]:
    """For each lesson, the share of its cells found in the notebook (same cell id or same source)."""
    ids = {c.get("id") for c in nb.cells if c.get("id")}
    sources = {_normal(c.source) for c in nb.cells}
    scores = {}
    for lesson, cells in _fingerprints().items():
        found = sum(1 for cid, srcs in cells if (cid and cid in ids) or srcs & sources)
        scores[lesson] = found / len(cells) if cells else 0.0
    return scores


def lesson_from_name(path: Path) -> str | None:
    known = lessons()
    name = path.name
    for lesson, solution in known.items():
        if solution.stem in name:
            return lesson
    match = re.match(r"(\d\d)(?!\d)", name)
    return match.group(1) if match and match.group(1) in known else None


def identify_lesson(path: Path, nb, forced: str | None = None) -> tuple[str | None, str | None]:
    """(lesson, None), or (None, why it cannot be graded as any lesson / as the lesson it claims)."""
    scores = lesson_scores(nb)
    best = max(scores, key=scores.get, default=None)
    recognised = best if best is not None and scores[best] >= RECOGNISED else None
    claimed = forced or lesson_from_name(path)
    how = "--lesson" if forced else "its file name"
    if claimed:
        if recognised and recognised != claimed and scores.get(claimed, 0) < RECOGNISED:
            return None, (f"another lesson's notebook: {how} says lesson {claimed}, but its cells are lesson "
                          f"{recognised}'s ({lessons()[recognised].stem}, {scores[recognised]:.0%} of its cells)")
        return claimed, None
    if recognised:
        return recognised, None
    return None, ("cannot tell which lesson this is: its cells match no lesson; name the file NN_*.ipynb "
                  "or pass --lesson NN")


# ------------------------------------------------------------------------------------------------
# Where a submission runs: a private workspace, a sandbox when the platform has one
# ------------------------------------------------------------------------------------------------
def parse_bytes(text: str) -> int | None:
    """'8G', '512M', '1.5GiB', '1000000' -> bytes; 'none' or '0' -> None (no limit)."""
    text = str(text).strip()
    if text.lower() in ("none", "0", "off", ""):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 8G, 512M or none)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))


def _human(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


@functools.cache
def _extension_build_dirs() -> list[Path]:
    """Directories of C++ extensions that a course library builds inside its own package (see Workspace)."""
    import importlib.util

    spec = importlib.util.find_spec("optimum.quanto")
    if spec is None or not spec.submodule_search_locations:
        return []
    extension = Path(spec.submodule_search_locations[0]) / "library" / "extensions" / "cpp"  # sources and build/
    return [extension] if extension.is_dir() else []


def bubblewrap() -> str | None:
    """The ``bwrap`` program if it is installed and works here (it needs user namespaces), else None."""
    program = shutil.which("bwrap")
    if program is None:
        return None
    trial = subprocess.run([program, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid",
                            "--unshare-net", "--die-with-parent", "true"], capture_output=True, timeout=30)
    return program if trial.returncode == 0 else None


COPIED = ("helpers", "requirements.txt", "pyproject.toml", "binder")  # what a lesson imports or reads


class Workspace:
    """A private temporary folder for one submission (or one reference run, or one probe).

    ``course/``: a copy of the course's code (never links into the live tree); ``course/notebooks``: the
    working directory, the one place a sandboxed process may write besides its own ``/tmp``; ``run/``:
    the kernel's connection file and sockets.
    """

    def __init__(self, sandbox: bool):
        self.root = Path(tempfile.mkdtemp(prefix="grade-"))
        os.chmod(self.root, 0o700)
        self.course = self.root / "course"
        self.course.mkdir()
        for name in COPIED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, self.course / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.exists():
                shutil.copy2(source, self.course / name)
        self.work = self.course / "notebooks"
        self.work.mkdir()
        (self.work / ".tmp").mkdir()  # TMPDIR: the rest of the filesystem is read-only in the sandbox
        self.run = self.root / "run"
        self.run.mkdir()
        self.sandbox = sandbox
        # Libraries that build a C++ extension into their own package directory on first use, and take a lock file
        # there on every use (optimum-quanto's CPU kernels: lesson 11's quantized cache): each submission gets its
        # own writable copy of that directory, mounted over it, so the read-only sandbox can load it and nothing a
        # submission writes there reaches the next one.
        self.writable_copies = []
        for build in _extension_build_dirs():
            copy = self.root / "extensions" / str(len(self.writable_copies))
            shutil.copytree(build, copy, ignore=shutil.ignore_patterns("__pycache__", "lock"))
            self.writable_copies.append((copy, build))

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as it runs for a submission: inside bubblewrap (read-only filesystem but the working
        directory, own PID namespace, no network) when the grader uses it. (Not a fresh /tmp: the course and
        its Python may live there.)"""
        if not self.sandbox:
            return argv
        return [bubblewrap(), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                "--ro-bind", str(self.course), str(self.course), "--bind", str(self.work), str(self.work),
                "--bind", str(self.run), str(self.run),
                *(arg for copy, build in self.writable_copies for arg in ("--bind", str(copy), str(build))),
                "--unsetenv", "JPY_PARENT_PID",  # its parent is invisible from the PID namespace
                "--unshare-pid", "--unshare-net", "--die-with-parent", "--chdir", str(self.work), "--", *argv]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("COURSE_STRICT_CHECKS", "PYTHONPATH")}
        env.update(PYTHONPATH=str(self.course), MPLBACKEND="agg", IPYTHONDIR=str(self.work / ".ipython"),
                   MPLCONFIGDIR=str(self.work / ".matplotlib"), TMPDIR=str(self.work / ".tmp"),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        return env

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


# Processes: the grader adopts every orphan its children leave (a "subreaper"), so a process that
# detaches from its session is still found, and killed, when its submission ends.
def become_subreaper() -> bool:
    with contextlib.suppress(Exception):
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    return False


def descendants(pid: int | None = None) -> set[int]:
    """Every living process below ``pid`` (default: this one), read from /proc."""
    pid = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_new_processes(keep: set[int]) -> int:
    """SIGKILL every descendant not in ``keep`` until none is left; returns how many were killed."""
    import signal

    killed = set()
    for _ in range(100):
        extra = descendants() - keep
        if not extra:
            break
        for pid in extra:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap what was ours (zombies still show in /proc)
                pass
        time.sleep(0.05)
    return len(killed)


# ------------------------------------------------------------------------------------------------
# Answers out of the kernel: plain data (or a pickled function), never a verdict
# ------------------------------------------------------------------------------------------------
# Runs in the graded kernel after the notebook. The boundary code is a fresh copy of checks.py loaded by
# path (not the notebook's helpers.checks). Whatever the notebook did to the kernel, all it can change is
# the data printed here: its own answer. The verdict is computed by the grader, outside.
ANSWER_SNIPPET = """\
def _grade_answer(_token, _expr, _measured, _code, _pickle):
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("_grade_boundary_" + _token, {checks!r})
    boundary = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boundary)
    record = {{}}
    try:
        value = eval(_expr, globals())
        if _code and callable(value):
            import cloudpickle
            with open(_pickle, "wb") as f:
                cloudpickle.dump(value, f)
            record["status"] = "function"
        elif _code and value is not None:
            record.update(status="refused", message="give the function itself (its name, without parentheses), "
                                                    "not its result (a " + type(value).__name__ + ").")
        else:
            record.update(status="data", data=boundary.plain(value))
        record["measured"] = {{k: boundary.plain(eval(e, globals())) for k, e in _measured.items()}}
    except NameError as err:
        record.update(status="missing", message=str(err) + ": the cell that sets it did not run, or failed")
    except NotImplementedError:
        record.update(status="missing", message="its cell still raises NotImplementedError")
    except boundary.AnswerError as err:
        record.update(status="refused", message=str(err))
    except BaseException as err:
        record.update(status="error", message="it could not be read (" + type(err).__name__ + ": "
                                             + str(err)[:2000] + ")")  # the grader shortens it
    sys.stdout.write("\\n" + _token + json.dumps(record) + "\\n")
    sys.stdout.flush()
"""


def read_record(stdout: str, token: str) -> dict | None:
    """The last record the answer code printed after ``token``; None if there is none or it is not a dict."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(token):
            with contextlib.suppress(ValueError):
                record = json.loads(line[len(token):])
                return record if isinstance(record, dict) else None
    return None


def kernel_answers(kernel: NotebookRun, key: list[CheckCall], workspace: Workspace, timeout: float) -> dict[str, dict]:
    """Each check call's answer record, read from the kernel (see ANSWER_SNIPPET)."""
    records: dict[str, dict] = {}
    define = kernel.run_code(ANSWER_SNIPPET.format(checks=str(workspace.course / "helpers" / "checks.py")), timeout)
    if define.status != "ok":
        return {c.name: {"status": "error", "message": f"the grader could not read answers ({define.status} "
                                                       f"{define.ename})"} for c in key}
    for call in key:
        token = secrets.token_hex(8)
        pickle = workspace.work / f".answer-{token}.pkl"
        code = f"_grade_answer({token!r}, {call.answer!r}, {call.measured!r}, {call.code!r}, {str(pickle)!r})"
        outcome = kernel.run_code(code, timeout)
        record = read_record(outcome.stdout, token) if outcome.status == "ok" else None
        if record is None:
            record = {"status": "error", "message": f"no answer could be read ({outcome.status})"}
        if record.get("status") == "function":
            try:
                record["pickle"] = pickle.read_bytes()
            except OSError:
                record = {"status": "error", "message": "the function could not be saved for the check"}
        records[call.name] = record
        if outcome.status in ("stuck", "dead"):
            break
    return records


# ------------------------------------------------------------------------------------------------
# Code answers: the exercise's probe, in a separate short-lived process
# ------------------------------------------------------------------------------------------------
def run_probe(name: str, pickled: bytes, sandbox: bool, timeout: float, memory_limit: int | None) -> dict:
    """Run exercise ``name``'s probe on the pickled function in a fresh (sandboxed) process; its data."""
    workspace = Workspace(sandbox)
    keep = descendants()
    token = secrets.token_hex(8)
    try:
        argv = workspace.command([sys.executable, "-m", "helpers.tools.grade", "--run-probe", name])
        proc = subprocess.Popen(argv, cwd=workspace.work, env=workspace.env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                preexec_fn=limits_preexec(memory_limit))
        try:
            stdout, _ = proc.communicate(token.encode() + b"\n" + pickled, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "error", "message": f"running your function took longer than {timeout:g} s"}
        finally:
            kill_new_processes(keep)
        record = read_record(stdout.decode("utf-8", "replace"), token)
        if record is None:
            return {"status": "error", "message": f"the process that ran your function ended without an answer "
                                                  f"(exit status {proc.returncode})"}
        return record
    finally:
        workspace.close()


def probe_main(name: str) -> int:
    """``python -m helpers.tools.grade --run-probe NAME``: read a token line and a pickled function from stdin, probe
    the function, print its data after the token. (The token is not on the command line, where any process can
    read it; learner code in this process could still find it: what it could forge is its own answer's data.)"""
    from helpers.checks import AnswerError, answer_data

    token = sys.stdin.buffer.readline().decode().strip()
    pickled = sys.stdin.buffer.read()
    try:
        import cloudpickle

        record = {"status": "data", "data": answer_data(name, cloudpickle.loads(pickled))}
    except AnswerError as err:
        record = {"status": "refused", "message": str(err)}
    except BaseException as err:  # the learner's code: say what happened, as data
        record = {"status": "error", "message": f"your function could not be run ({type(err).__name__}: "
                                                f"{str(err)[:2000]})"}  # the grader shortens it
    sys.stdout.write("\n" + token + json.dumps(record) + "\n")
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------------------------------
# Grading
# ------------------------------------------------------------------------------------------------
@dataclass
class Limits:
    cell_timeout: float = DEFAULT_CELL_TIMEOUT
    submission_timeout: float = DEFAULT_SUBMISSION_TIMEOUT
    memory: int | None = parse_bytes(DEFAULT_MEMORY_LIMIT)
    sandbox: bool = False


BLANK = "blank (unchanged from the handout)"


@dataclass
class Row:
    submission: str
    lesson: str = ""  # its number ("05"); "" when no lesson could be told
    points: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] | None = None  # exercise -> its points; None: no lesson, so no maximum at all
    status: str = "not graded"
    peak_mib: float | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def max_points(self) -> float | None:
        return None if self.maxima is None else sum(self.maxima.values())

    @property
    def total(self) -> float | None:
        return None if self.maxima is None else sum(self.points.values())


def _cell_problem(index: int, outcome: CellRun, cell_timeout: float, memory_limit: int | None) -> str | None:
    where = f"cell {index}"
    if outcome.status == "timeout":
        return f"{where} exceeded the time limit ({cell_timeout:g} s) and was interrupted"
    if outcome.status == "stuck":
        return (f"{where} exceeded the time limit ({cell_timeout:g} s) and did not stop when interrupted: "
                "the kernel was stopped, later cells did not run")
    if outcome.status == "dead":
        hint = f" (memory limit {_human(memory_limit)}?)" if memory_limit else ""
        return f"the kernel died in {where}{hint}; later cells did not run"
    if outcome.status == "error":
        text = f"{outcome.ename}: {outcome.evalue}"
        if any(word in text for word in OUT_OF_MEMORY):
            limit = f" (limit {_human(memory_limit)})" if memory_limit else ""
            return f"{where} ran out of memory{limit}: {shorten(text, 160)}"
    return None


def _peak_rss_mib(pids: set[int]) -> float | None:
    """The largest peak resident memory (VmHWM) among ``pids``, read from /proc by the grader."""
    peaks = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
    return round(max(peaks), 1) if peaks else None


def execute(nb, key: list[CheckCall], row: Row, limits: Limits, what: str = "") -> dict[str, dict] | None:
    """Run ``nb``'s code cells in a fresh kernel in a private workspace, then read each answer as data.

    Every process the run started is gone when this returns. None if the kernel did not survive. ``what``: how the
    progress line names this run, when it is not the submission's own."""
    workspace, keep = Workspace(limits.sandbox), descendants()
    kernel = NotebookRun(nb, cwd=workspace.work, env=workspace.env(), strict_checks=False,
                         launcher=workspace.command, ipc_dir=workspace.run, memory_limit=limits.memory,
                         quiet_kernel=True, cell_timeout=limits.cell_timeout, total_timeout=limits.submission_timeout,
                         interrupt_grace=INTERRUPT_GRACE, max_output_bytes=OUTPUT_LIMIT,
                         before_cell=lambda index, n, total: PROGRESS.cell(nb, index, n, total, what))
    try:
        try:
            PROGRESS.doing(what + "starting its kernel")
            kernel.start()
        except Exception as err:
            row.reasons.append(f"the kernel did not start ({type(err).__name__}: {shorten(err, 160)})")
            return None
        result = kernel.run_cells(stop_on_error=False)
        errors = []
        for cell in result.cells:
            problem = _cell_problem(cell.index, cell, limits.cell_timeout, limits.memory)
            if problem:
                row.reasons.append(problem)
            elif cell.status == "error" and cell.ename != "NotImplementedError":
                errors.append(f"{cell.index} ({cell.ename})")
        if result.stopped == "time":
            row.reasons.append(f"the notebook exceeded its time limit ({limits.submission_timeout:g} s): "
                               f"{len(result.not_run)} cell(s) from cell {result.not_run[0]} on did not run")
        if errors:
            row.reasons.append("errors in cell " + ", ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""))
        if result.stopped == "kernel":
            row.reasons.append("exercises not graded: the kernel is gone")
            return None
        PROGRESS.doing(what + "reading the answers out of the kernel")
        records = kernel_answers(kernel, key, workspace, max(limits.cell_timeout, CHECK_TIMEOUT))
        row.peak_mib = _peak_rss_mib(descendants() - keep)
        return records
    finally:
        kernel.close()
        kill_new_processes(keep)
        workspace.close()


_REFERENCE: dict[str, dict[str, dict]] = {}


def reference_measurements(lesson: str, key: list[CheckCall], limits: Limits) -> dict[str, dict]:
    """The lesson's own measurements the checks need (``measured``), from one run of its solution notebook
    in the same kind of workspace; once per lesson per grader run. {exercise: {name: plain value}}."""
    if lesson not in _REFERENCE:
        import nbformat

        row = Row("reference")
        solution = nbformat.read(lessons()[lesson], as_version=4)
        wanted = [CheckCall(c.name, "None", c.measured, c.points) for c in key if c.measured]
        records = execute(solution, wanted, row, Limits(limits.cell_timeout, 4 * limits.submission_timeout,
                                                        None, limits.sandbox),
                          what=f"lesson {lesson}'s solution, run once for the checks that use its measurements: ") or {}
        _REFERENCE[lesson] = {name: r.get("measured") for name, r in records.items() if r.get("status") == "data"}
        if not _REFERENCE[lesson] and wanted:
            PROGRESS.note(f"the reference run of lesson {lesson}'s solution failed: "
                          + shorten("; ".join(row.reasons), 300))
    return _REFERENCE[lesson]


def judge(call: CheckCall, record: dict | None, reference: dict[str, dict], limits: Limits) -> tuple[float, str]:
    """(points, reason or "") for one exercise, from the answer record read out of the kernel."""
    from helpers.checks import PASS, AnswerError, plain, verdict

    record = record or {"status": "error", "message": "no answer was read (the check did not run)"}
    if record.get("status") == "function":
        PROGRESS.doing(f"checking {call.name}: running the submitted function in a separate process")
        record = run_probe(call.name, record.get("pickle", b""), limits.sandbox, limits.cell_timeout, limits.memory)
    status = record.get("status")
    if status != "data":
        what = {"missing": "missing", "refused": "not yet", "error": "not yet"}.get(status, "not yet")
        return 0.0, f"{call.name}: {what}: {shorten(record.get('message', ''), MESSAGE_LIMIT)}"
    if call.measured and call.name not in reference:
        return 0.0, f"{call.name}: not graded: the grader's own run of the solution notebook failed"
    try:
        data = plain(record.get("data"))
    except AnswerError as err:
        return 0.0, f"{call.name}: not yet: {err}"
    result = verdict(call.name, data, measured=reference.get(call.name) or {})
    points = min(max(result.points, 0.0), call.points) if result.status == PASS else 0.0
    return points, "" if points >= call.points else f"{call.name}: {result.status}: " + shorten(result.message,
                                                                                                 MESSAGE_LIMIT)


def grade_notebook(nb, lesson: str, row: Row, limits: Limits) -> None:
    """Execute ``nb`` (an in-memory copy) in a fresh kernel, then judge its answers here; fill in ``row``."""
    key = answer_key(lesson)
    _zero(row, lesson)
    if not key:
        row.reasons.append(f"lesson {lesson}'s solution has no check calls: nothing to grade")
    records = execute(nb, key, row, limits)
    row.status = "graded"
    if records is None:
        return
    reference = reference_measurements(lesson, key, limits) if any(c.measured for c in key) else {}
    for call in key:
        points, reason = judge(call, records.get(call.name), reference, limits)
        row.points[call.name] = points
        if reason:
            row.reasons.append(reason)


def _zero(row: Row, lesson: str | None) -> None:
    """A row for a known lesson, with its exercises at 0 of their points. With no lesson the row keeps no maximum."""
    with contextlib.suppress(Exception):
        if lesson:
            key = answer_key(lesson)
            row.lesson, row.maxima = lesson, {c.name: c.points for c in key}
            row.points = dict.fromkeys(row.maxima, 0.0)


def grade(path: Path, forced: str | None, limits: Limits) -> Row:
    """One row for one submission; never raises."""
    row = Row(str(path))
    try:
        nb, reason = read_submission(path)
        if nb is None:
            row.reasons.append(reason)
            _zero(row, forced or lesson_from_name(path))
            return row
        lesson, reason = identify_lesson(path, nb, forced)
        if lesson is None:
            row.reasons.append(reason)
            _zero(row, forced or lesson_from_name(path))
            return row
        if unchanged_handout(nb, lesson):  # nothing to run: it answers nothing
            _zero(row, lesson)
            row.status = "graded"
            row.reasons.append(f"{BLANK}: not run")
            return row
        grade_notebook(nb, lesson, row, limits)
    except Exception as err:  # a bug in the grader must cost one row, not the whole room's grades
        row.status = "not graded"
        row.reasons.append(f"grader error ({type(err).__name__}: {shorten(err, 300)})")
    return row


def course_digest(root: Path = ROOT) -> dict[str, str]:
    """sha256 of every file of the course tree (not .git, .venv or caches): a submission must not change it."""
    digests = {}
    skip = {".git", ".venv", "__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".ruff_cache"}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


@functools.cache
def lesson_label(lesson: str) -> str:
    """"05 QLoRA": the lesson's number and its notebook's title up to any subtitle, as on the course map; "" for no
    lesson. The CSV and the summary table both name lessons this way."""
    if not lesson:
        return ""
    path = lessons().get(lesson)
    title = path.stem[3:].replace("_", " ").capitalize() if path else ""
    with contextlib.suppress(Exception):
        nb = _handouts()[lesson][0]
        heading = next(line for cell in nb.cells if cell.cell_type == "markdown"
                       for line in cell.source.splitlines() if line.startswith("# "))
        title = re.sub(rf"^#\s*{lesson}\s*[·.:-]?\s*", "", heading).split(":")[0].strip() or title
    return f"{lesson} {title}".strip()


def exercise_label(name: str, points: float) -> str:
    """"weights_7b (max 1)": an exercise and its points, in the CSV's header and the summary table."""
    return f"{name} (max {_fmt(points)})"


def _exercises(rows: list[Row]) -> dict[str, float]:
    """Every exercise of the lessons graded, in lesson order, with its maximum."""
    exercises: dict[str, float] = {}
    for lesson in sorted({r.lesson for r in rows if r.lesson}):
        for r in rows:
            if r.lesson == lesson and r.maxima:
                exercises.update((name, points) for name, points in r.maxima.items() if name not in exercises)
    return exercises


def write_csv(rows: list[Row], out: Path) -> list[str]:
    """Write the rows, every reason in full; return the header."""
    exercises = _exercises(rows)
    header = ["submission", "lesson", *(exercise_label(e, p) for e, p in exercises.items()), "total", "max", "status",
              "peak_memory_mib", "reason"]
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r.submission, lesson_label(r.lesson), *(_fmt(r.points.get(e)) for e in exercises),
                             _fmt(r.total), _fmt(r.max_points), r.status, _fmt(r.peak_mib), " | ".join(r.reasons)])
    return header


def _points(r: Row) -> str:
    return "—" if r.max_points is None else f"{_fmt(r.total)}/{_fmt(r.max_points)}"


def _first_reason(r: Row, width: int) -> str:
    """The row's first reason, cut at a word boundary to ``width``; how many more the CSV holds."""
    if not r.reasons:
        return ""
    more = f" (+{len(r.reasons) - 1} more in the CSV)" if len(r.reasons) > 1 else ""
    return shorten(r.reasons[0], max(width - len(more), 20)) + more


def summary(rows: list[Row], reason_width: int = REASON_WIDTH) -> str:
    """The table printed at the end: one line per submission, then each lesson's exercises with their maxima."""
    name_width = min(max([len("submission"), *(len(r.submission) for r in rows)]), 40)
    lesson_width = max([len("lesson"), *(len(lesson_label(r.lesson)) for r in rows)])
    lines = [f"{'submission':{name_width}}  {'lesson':{lesson_width}}  {'points':>7}  {'status':10}  reason"]
    for r in rows:
        name = r.submission if len(r.submission) <= name_width else "…" + r.submission[-(name_width - 1):]
        lines.append(f"{name:{name_width}}  {lesson_label(r.lesson) or '—':{lesson_width}}  {_points(r):>7}  "
                     f"{r.status:10}  {_first_reason(r, reason_width)}")
    for lesson in sorted({r.lesson for r in rows if r.lesson}):
        maxima = next(r.maxima for r in rows if r.lesson == lesson and r.maxima is not None)
        names = ", ".join(exercise_label(name, points) for name, points in maxima.items())
        lines.append(f"exercises of {lesson_label(lesson)}: {names}")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class Progress:
    """What the grader is doing, on stderr (never in the CSV or on stdout): which submission (k of n), which cell and
    the section heading above it, and the time so far. On a terminal: one line, redrawn in place every second. In a
    file or a pipe: plain lines (no carriage returns), when a submission starts and ends and at most one every
    ``log_every`` seconds between. ``quiet``: nothing."""

    def __init__(self, stream=None, *, quiet: bool = False, terminal: bool | None = None,
                 log_every: float = LOG_EVERY):
        self.stream = stream or sys.stderr
        self.quiet, self.log_every = quiet, log_every
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._lock = threading.Lock()
        self._who, self._what = "", ""  # "2 of 30, alice.ipynb"; "cell 14 in “Baseline”"
        self._began = self._logged = 0.0
        self._drawn = False  # a status line is on the terminal (so clear it before printing)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, k: int, n: int, path: Path) -> None:
        """Submission ``k`` of ``n`` starts."""
        with self._lock:
            self._who, self._what, self._began = f"{k} of {n}, {path.name}", "started", time.monotonic()
            self._show(log=True)
        if not self.quiet and self._thread is None:
            self._thread = threading.Thread(target=self._tick, daemon=True, name="grade-progress")
            self._thread.start()

    def doing(self, what: str) -> None:
        """What the current submission is at now (a cell, reading the answers, a check)."""
        with self._lock:
            self._what = what
            self._show()

    def cell(self, nb, index: int, n: int, total: int, prefix: str = "") -> None:
        """A runner's ``before_cell``: code cell ``index`` of ``nb`` (the ``n``-th of ``total``) starts."""
        heading = section_heading(nb, index)
        self.doing(f"{prefix}cell {index}" + (f" in “{shorten(heading, 40)}”" if heading else "")
                   + f" ({n} of {total} code cells)")

    def end(self, result: str) -> None:
        """The current submission is done: one permanent line with its result and time."""
        with self._lock:
            line = f"{self._who}: {result} in {_clock(time.monotonic() - self._began)}"
            self._who = self._what = ""
            self._print(line)

    def note(self, text: str) -> None:
        """A message that stays (a warning), printed even when quiet; the status line is redrawn below it."""
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)
            self._show()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._clear()

    # --- drawing (with the lock held) ------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                self._show()

    def _status(self) -> str:
        return f"{self._who}: {self._what}, {_clock(time.monotonic() - self._began)}"

    def _show(self, log: bool = False) -> None:
        """Redraw the terminal's status line; in a log, write a line if ``log`` or if the last one is old."""
        if self.quiet or not self._who:
            return
        if self.terminal:
            self.stream.write("\r\x1b[K" + shorten(self._status(), self._columns() - 1))  # one row: redrawable
            self.stream.flush()
            self._drawn = True
        elif log or time.monotonic() - self._logged >= self.log_every:
            self._print(self._status())

    def _columns(self) -> int:
        """The width of the terminal this writes to (stdout may be a file meanwhile); 0 (a pseudo-terminal that
        never said) falls back to $COLUMNS or 80."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return columns if columns >= 20 else shutil.get_terminal_size().columns

    def _print(self, line: str) -> None:
        if not self.quiet:
            self._clear()
            print(line, file=self.stream, flush=True)
            self._logged = time.monotonic()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


PROGRESS = Progress(quiet=True)  # main() replaces it; the grading functions report to it


def expand(paths: list[str]) -> list[Path]:
    """Files as given; folders -> their *.ipynb files (not checkpoints), sorted."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        else:
            found.append(p)
    return found


def grade_all(submissions: list[Path], forced: str | None, limits: Limits) -> list[Row]:
    """A row per submission, one after another; after a submission that changed the course, none is run."""
    before = course_digest()
    rows = []
    for k, path in enumerate(submissions, 1):
        if rows and rows[-1].status == "stopped":
            row = Row(str(path), reasons=["not graded: an earlier submission changed the course; restore it "
                                          "(git status, git checkout) and grade again"])
            _zero(row, forced or lesson_from_name(path))
            rows.append(row)
            continue
        PROGRESS.begin(k, len(submissions), path)
        row = grade(path, forced, limits)
        after = course_digest()
        changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
        if changed:
            row.points = dict.fromkeys(row.points, 0.0)
            row.status = "stopped"
            row.reasons.insert(0, f"this submission changed the course ({', '.join(changed[:3])}): no points, and "
                                  "grading stopped")
        rows.append(row)
        PROGRESS.end(f"{_points(row)} ({row.status})")
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-probe"] and len(argv) == 2:  # internal: the probe process of run_probe
        return probe_main(argv[1])
    parser = argparse.ArgumentParser(prog="python -m helpers.tools.grade",
                                     description="Grade submitted lesson notebooks into a CSV.")
    parser.add_argument("submissions", nargs="+", help="notebook files, or folders of them")
    parser.add_argument("--out", default="grades.csv", help="the CSV to write (default grades.csv)")
    parser.add_argument("--lesson", help="grade every submission as this lesson (e.g. 03), instead of telling "
                                         "the lesson from each notebook")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT,
                        help=f"seconds per cell before it is interrupted (default {DEFAULT_CELL_TIMEOUT})")
    parser.add_argument("--submission-timeout", type=float, default=DEFAULT_SUBMISSION_TIMEOUT,
                        help=f"seconds for a whole notebook (default {DEFAULT_SUBMISSION_TIMEOUT})")
    parser.add_argument("--memory-limit", default=DEFAULT_MEMORY_LIMIT,
                        help=f"the kernel's memory limit (RLIMIT_DATA), e.g. 4G, 512M or none "
                             f"(default {DEFAULT_MEMORY_LIMIT})")
    parser.add_argument("--sandbox", choices=["auto", "bwrap", "none"], default="auto",
                        help="run submissions inside bubblewrap: auto (when it is installed and works; the "
                             "default), bwrap (required: stop if it is missing) or none")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress on stderr (which submission, which cell, the time so far)")
    args = parser.parse_args(argv)
    try:
        memory_limit = parse_bytes(args.memory_limit)
    except ValueError as err:
        parser.error(str(err))
    if args.cell_timeout <= 0 or args.submission_timeout <= 0:
        parser.error("time limits must be positive")
    forced = None
    if args.lesson:
        stem = Path(args.lesson).name.removesuffix(".ipynb")
        forced = next((n for n, p in lessons().items() if stem in (n, p.stem) or stem.zfill(2) == n), None)
        if forced is None:
            parser.error(f"no lesson {args.lesson!r}; lessons: {', '.join(lessons())}")
    sandbox = args.sandbox != "none" and bubblewrap() is not None
    if args.sandbox == "bwrap" and not sandbox:
        parser.error("--sandbox bwrap: bubblewrap is not installed or does not work here "
                     "(Debian/Ubuntu: apt-get install bubblewrap)")
    submissions = expand(args.submissions)
    if not submissions:
        parser.error("no notebooks found in the folders given")
    out = Path(args.out)
    if any(out.resolve() == s.resolve() for s in submissions):
        parser.error(f"--out {out} is one of the submissions: the grader never writes to a submission")
    limits = Limits(args.cell_timeout, args.submission_timeout, memory_limit, sandbox)
    become_subreaper()
    quiet_library_noise()
    print("submissions run in a bubblewrap sandbox (read-only files, no network, own processes)" if sandbox else
          "no sandbox: submissions run as you, in a private copy of the course (see the README, 'Grading')",
          file=sys.stderr)
    global PROGRESS
    PROGRESS = Progress(quiet=args.quiet)
    try:
        rows = grade_all(submissions, forced, limits)
    finally:
        PROGRESS.close()
    # Every submission's processes are gone (killed with its workspace) before the CSV is written.
    try:
        write_csv(rows, out)
    except OSError as err:
        print(f"cannot write {out}: {err}", file=sys.stderr)
        return 1
    print(summary(rows))
    print(f"wrote {out} ({len(rows)} row(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
