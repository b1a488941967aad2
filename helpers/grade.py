"""Batch grading of submitted lesson notebooks.

    python -m helpers.grade SUBMISSIONS... [--out grades.csv] [--lesson NN]
                            [--cell-timeout 600] [--submission-timeout 1800] [--memory-limit 8G]

SUBMISSIONS are notebook files or folders of them (``*.ipynb``). Each one gets one row in the CSV: its
lesson, the points of every exercise, the total, the maximum, and the reason for every point not given.

How a submission is graded:
- The lesson is told from the notebook's cells (their ids and sources, compared with every lesson), or
  from a file name starting ``NN_``, or from ``--lesson NN``. A file that is not a notebook, a truncated
  file, a notebook whose lesson cannot be told, or a notebook of another lesson than the one it claims
  gets a row with the reason and no points; nothing in it is executed.
- The submission is read once, into memory, and never written to. Its code cells run one by one in a
  fresh kernel whose working directory is a temporary copy of the course layout (``helpers/`` etc. are
  linked, ``notebooks/`` is an empty folder), so files it writes land there and are deleted afterwards.
- Each cell has a time limit (``--cell-timeout``); a cell over it is interrupted and the next cell runs,
  so later exercises still count. A cell that ignores the interrupt ends the run (the kernel is
  stopped). ``--submission-timeout`` bounds the whole notebook.
- The kernel starts with a memory limit (``--memory-limit``): ``RLIMIT_DATA``, soft and hard, set in the
  kernel process before Python starts, so no cell can raise it. It bounds the process's writable
  private memory (heap, anonymous mmaps: every torch and numpy tensor on the CPU). An allocation over it
  fails with ``MemoryError`` (Python) or "can't allocate memory" (torch), which the row reports. Child
  processes inherit the limit, each on its own. ``RLIMIT_AS`` is not used: it counts address space that
  torch and the BLAS libraries reserve but never touch.
- Then the grader runs the checks itself, in the same kernel: the *answer key* is every
  ``check("name", answer, **context)`` call of the lesson's solution notebook; each is evaluated in the
  kernel's namespace against a freshly loaded copy of ``helpers/checks.py`` and ``helpers/exercises/``
  (not whatever the notebook imported or changed). So a notebook that redefines ``check``, patches the
  check registry, or edits or deletes its check cells gains nothing. Course modules the checks use
  (``helpers.estimate``...) are taken from the kernel only if their functions are the ones in the source
  files; a notebook that patched them is graded with fresh copies (the row says so). Only the lesson's
  module of ``helpers/exercises/`` is loaded. Event hooks, AST transformers and post input transformers
  the notebook registered are removed before grading. This defeats the cheats above; it is not a sandbox
  against code written to attack the grader (student code runs with the instructor's permissions, in the
  same process the checks run in).
- ``COURSE_STRICT_CHECKS`` is removed from the kernel's environment.

CSV columns: ``submission, lesson``, one column per exercise (the union over the lessons graded in this
run, in lesson order; empty for exercises of another lesson), ``total, max, status`` (``graded`` or
``not graded``), ``peak_memory_mib`` (the kernel's peak resident memory) and ``reason``: why the
submission was not graded, what went wrong while it ran (time and memory limits, a dead kernel), and
for every exercise short of full points, the check's own feedback. A summary table is printed too.
The exit status is 0 whenever the grader ran, whatever the submissions held; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
PATTERN = "[0-9][0-9]_*.ipynb"
MAX_BYTES = 100 * 2**20  # a lesson notebook with its outputs is a few MB
RECOGNISED = 0.25  # share of a lesson's cells a notebook must contain (by id or source) to be recognised
DEFAULT_CELL_TIMEOUT = 600  # seconds: the suite's nbval limit; the slowest real cell takes about 2 minutes
DEFAULT_SUBMISSION_TIMEOUT = 1800
DEFAULT_MEMORY_LIMIT = "8G"
GRADER_TIMEOUT = 300  # seconds for the grader's own set-up in the kernel (loading the checks' libraries)
CHECK_TIMEOUT = 60  # at least this for one check (it may call the notebook's functions)
INTERRUPT_GRACE = 10  # seconds a cell gets to stop after the interrupt at its time limit
OUT_OF_MEMORY = ("MemoryError", "can't allocate memory", "Cannot allocate memory", "bad_alloc", "out of memory")
CHECK_FN = "__grade_check__"


# ------------------------------------------------------------------------------------------------
# The answer key: the check calls of a lesson's solution notebook
# ------------------------------------------------------------------------------------------------
@dataclass
class CheckCall:
    name: str
    code: str  # the solution's call with `check` replaced by CHECK_FN, evaluated in the graded kernel
    points: float = 1.0
    module: str = ""  # the module of helpers/exercises/ that registers it, e.g. "lesson00"


def lessons() -> dict[str, Path]:
    """Lesson number ("00") -> its solution notebook."""
    return {p.name[:2]: p for p in sorted(SOLUTIONS.glob(PATTERN))}


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
    """Every ``check("name", ...)`` call in the notebook's code cells, first call per name, in order."""
    calls: dict[str, CheckCall] = {}
    for cell in nb.cells:
        if cell.cell_type != "code" or "check" not in cell.source:
            continue
        tree = _parse_cell(cell.source)
        for node in ast.walk(tree) if tree else []:
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and node.args[0].value not in calls):
                call = ast.Call(func=ast.Name(CHECK_FN, ast.Load()), args=node.args, keywords=node.keywords)
                calls[node.args[0].value] = CheckCall(node.args[0].value, ast.unparse(call))
    return list(calls.values())


def answer_key(lesson: str) -> list[CheckCall]:
    import nbformat

    from helpers.checks import EXERCISES, _load_lesson_checks

    with contextlib.suppress(Exception):  # a lesson being written may not import: grade with the rest
        _load_lesson_checks()
    calls = check_calls(nbformat.read(lessons()[lesson], as_version=4))
    fallback = f"lesson{lesson}" if (ROOT / "helpers" / "exercises" / f"lesson{lesson}.py").exists() else ""
    for call in calls:
        if call.name in EXERCISES:
            call.points = EXERCISES[call.name].points
            call.module = EXERCISES[call.name].fn.__module__.rpartition(".")[2]
        else:
            call.module = fallback
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
        return None, f"not a valid notebook ({type(err).__name__}: {str(err)[:120]})"
    return nb, None


def _normal(source: str) -> str:
    return " ".join(source.split())


_FINGERPRINTS: dict[str, list[tuple[str | None, set[str]]]] = {}


def _fingerprints() -> dict[str, list[tuple[str | None, set[str]]]]:
    """Per lesson, per cell other than the set-up cell: (cell id, normalised sources: student and solution)."""
    if not _FINGERPRINTS:
        import nbformat

        from helpers.colab import SETUP_CELL
        from helpers.notebooks import student_version

        for lesson, path in lessons().items():
            try:
                solution = nbformat.read(path, as_version=4)
                student = student_version(solution, path.name)
            except Exception:  # a lesson being written can be broken for a while; it is just not recognised
                continue
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
# Running a notebook in a fresh kernel
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


@dataclass
class Outcome:
    status: str  # ok, error, timeout (interrupted), stuck (did not stop: kernel killed), dead
    ename: str = ""
    evalue: str = ""


class Kernel:
    """A fresh python3 kernel with a memory limit, run cell by cell with a time limit each."""

    def __init__(self, cwd: Path, memory_limit: int | None, startup_timeout: float = 120):
        from jupyter_client import KernelManager

        env = {k: v for k, v in os.environ.items() if k != "COURSE_STRICT_CHECKS"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("MPLBACKEND", "agg")

        def limit_memory():  # runs in the child between fork and exec: before any Python code of the kernel
            if memory_limit:
                import resource

                resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))

        self.km = KernelManager(kernel_name="python3")
        # The kernel's own stdout/stderr (start-up warnings, C-level prints) would clutter the grader's.
        self.km.start_kernel(cwd=str(cwd), env=env, preexec_fn=limit_memory,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             extra_arguments=["--HistoryManager.hist_file=:memory:"])
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=startup_timeout)
        except Exception:
            self.close()
            raise

    def _drain(self):
        """Discard what the kernel published (outputs are not kept: only each reply's status matters)."""
        with contextlib.suppress(Exception):
            for _ in range(10_000):
                self.kc.iopub_channel.get_msg(timeout=0)  # raises Empty when nothing is left

    def _wait(self, msg_id: str, until: float) -> dict | None:
        from queue import Empty

        while time.monotonic() < until:
            try:
                msg = self.kc.get_shell_msg(timeout=0.25)
            except Empty:
                self._drain()
                if not self.km.is_alive():
                    return {"dead": True}
                continue
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                self._drain()
                return msg["content"]
        return None

    def run(self, code: str, timeout: float) -> Outcome:
        if not self.km.is_alive():
            return Outcome("dead")
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        reply = self._wait(msg_id, time.monotonic() + timeout)
        if reply is None:
            with contextlib.suppress(Exception):
                self.km.interrupt_kernel()
            reply = self._wait(msg_id, time.monotonic() + INTERRUPT_GRACE)
            if reply is None or reply.get("dead"):
                self.close()
                return Outcome("stuck" if reply is None else "dead")
            return Outcome("timeout", reply.get("ename", ""), reply.get("evalue", ""))
        if reply.get("dead"):
            return Outcome("dead")
        if reply.get("status") == "error":
            return Outcome("error", str(reply.get("ename", "")), str(reply.get("evalue", "")))
        return Outcome("ok")

    def close(self):
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=True)


def course_mirror(folder: Path) -> Path:
    """folder/ with links to the course's top-level entries and an empty notebooks/; returns notebooks/."""
    for entry in ROOT.iterdir():
        if entry.name not in ("notebooks", "solutions", ".git"):
            (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (folder / "notebooks").mkdir()
    return folder / "notebooks"


# ------------------------------------------------------------------------------------------------
# What runs inside the graded kernel, after the submission (this file is loaded there by path)
# ------------------------------------------------------------------------------------------------
def _changed_functions(module, path: Path) -> list[str]:
    """Functions and methods of ``module`` whose code is not the code in its source file ``path``."""
    import inspect

    code = compile(path.read_text(encoding="utf-8"), str(path), "exec", dont_inherit=True)
    expected, todo = {}, [code]
    while todo:
        for const in todo.pop().co_consts:
            if inspect.iscode(const):
                if "<" not in const.co_qualname:  # skip lambdas, comprehensions and nested functions
                    expected.setdefault(const.co_qualname, []).append(const)
                todo.append(const)
    changed = []
    for qualname, wants in expected.items():
        obj = module
        for part in qualname.split("."):
            obj = vars(obj).get(part) if isinstance(obj, type) else getattr(obj, part, None)
            if obj is None:
                break
        if obj is None or isinstance(obj, type):
            continue
        if isinstance(obj, (staticmethod, classmethod)):
            candidates = [obj.__func__]
        elif isinstance(obj, property):
            candidates = [f for f in (obj.fget, obj.fset, obj.fdel) if f is not None]
        else:
            candidates = [obj]
        codes = [getattr(inspect.unwrap(f), "__code__", None) if callable(f) else None for f in candidates]
        if not any(code is not None and code in wants for code in codes):
            changed.append(qualname)
    return changed


def kernel_prepare(namespace: dict, alias: str, out: str, modules: list[str]) -> None:
    """Neutralise the notebook's hooks, load fresh checks under ``alias``, report to the file ``out``.

    ``modules``: the modules of helpers/exercises/ to load (the lesson's), or all of them if empty.
    """
    import importlib
    import resource
    import types

    notes = []
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        shell = get_ipython()
        for callbacks in shell.events.callbacks.values():
            callbacks.clear()
        shell.ast_transformers.clear()
        shell.input_transformers_post.clear()
    sys.settrace(None)
    sys.setprofile(None)
    os.environ.pop("COURSE_STRICT_CHECKS", None)
    helpers_dir = Path(__file__).resolve().parent
    for name in [m for m in list(sys.modules) if m == alias or m.startswith(alias + ".")]:
        del sys.modules[name]
    package = types.ModuleType(alias)
    package.__path__ = [str(helpers_dir)]
    package.__file__ = str(helpers_dir / "__init__.py")
    package.__package__ = alias
    sys.modules[alias] = package
    # Only the course modules the lesson's checks import (and what those import) matter; other modules may
    # be edited on disk while a notebook runs, which must not read as tampering.
    sources = [helpers_dir / "exercises" / f"{m}.py" for m in modules] or [*(helpers_dir / "exercises").glob("*.py")]
    needed: set[str] = set()
    while sources:
        text = sources.pop().read_text(encoding="utf-8")
        for name in set(re.findall(r"^\s*from \.{1,2}(\w+) import", text, re.MULTILINE)) - needed:
            if (helpers_dir / f"{name}.py").exists():
                needed.add(name)
                sources.append(helpers_dir / f"{name}.py")
    for path in sorted(helpers_dir / f"{name}.py" for name in needed):
        module = sys.modules.get(f"helpers.{path.stem}")
        if path.stem in ("__init__", "checks", "grade") or module is None:
            continue
        try:
            if Path(module.__file__).resolve() != path:
                continue
            changed = _changed_functions(module, path)
        except Exception:
            continue
        if changed:
            notes.append(f"the notebook changed helpers.{path.stem} ({', '.join(changed[:3])}): "
                         "checks used a fresh copy of it")
        else:  # the lesson's own objects (Dims, reports) must be instances of the classes the checks see
            sys.modules[f"{alias}.{path.stem}"] = module
    importlib.import_module(f"{alias}.checks")
    if modules:  # only the lesson's checks: exercises/__init__.py would import every lesson's libraries
        exercises = types.ModuleType(f"{alias}.exercises")
        exercises.__path__ = [str(helpers_dir / "exercises")]
        exercises.__package__ = f"{alias}.exercises"
        sys.modules[exercises.__name__] = exercises
        package.exercises = exercises
        for name in modules:
            importlib.import_module(f"{alias}.exercises.{name}")
    else:
        importlib.import_module(f"{alias}.exercises")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "prepared", "notes": notes, "peak_rss_kib": peak_kib}) + "\n")


def kernel_check(namespace: dict, alias: str, out: str, name: str, code: str) -> None:
    """Evaluate one answer-key call in the notebook's namespace with the fresh ``run_check``."""
    record = {"kind": "check", "name": name}
    try:
        run_check = sys.modules[f"{alias}.checks"].run_check
        result = eval(code, {**namespace, CHECK_FN: run_check})  # noqa: S307 (the solution's own call)
        record.update(status=result.status, points=float(result.points), message=str(result.message))
    except NameError as err:
        record.update(status="missing", points=0.0,
                      message=f"{err}: the cell that sets it did not run, or failed")
    except NotImplementedError:
        record.update(status="missing", points=0.0, message="its cell still raises NotImplementedError")
    except KeyboardInterrupt:
        record.update(status="timeout", points=0.0, message="the check was stopped at the time limit")
    except BaseException as err:
        record.update(status="error", points=0.0,
                      message=f"its inputs could not be evaluated ({type(err).__name__}: {str(err)[:200]})")
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------
# Grading
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    submission: str
    lesson: str = ""
    points: dict[str, float] = field(default_factory=dict)
    max_points: float = 0.0
    status: str = "not graded"
    peak_mib: float | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.points.values())


def _cell_problem(index: int, outcome: Outcome, cell_timeout: float, memory_limit: int | None) -> str | None:
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
            return f"{where} ran out of memory{limit}: {text[:160]}"
    return None


def grade_notebook(nb, lesson: str, row: Row, cell_timeout: float, submission_timeout: float,
                   memory_limit: int | None) -> None:
    """Execute ``nb`` (an in-memory copy) in a fresh kernel, then run the lesson's checks; fill in ``row``."""
    key = answer_key(lesson)
    _zero(row, lesson)
    if not key:
        row.reasons.append(f"lesson {lesson}'s solution has no check calls: nothing to grade")
    with tempfile.TemporaryDirectory(prefix="grade-", ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        (tmp / "course").mkdir()
        cwd = course_mirror(tmp / "course")
        out = tmp / "results.jsonl"
        try:
            kernel = Kernel(cwd, memory_limit)
        except Exception as err:
            row.reasons.append(f"the kernel did not start ({type(err).__name__}: {str(err)[:160]})")
            return
        try:
            alive, errors = True, []
            deadline = time.monotonic() + submission_timeout
            cells = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
            for n, (index, cell) in enumerate(cells):
                left = deadline - time.monotonic()
                if left <= 0:
                    row.reasons.append(f"the notebook exceeded its time limit ({submission_timeout:g} s): "
                                       f"{len(cells) - n} cell(s) from cell {index} on did not run")
                    break
                outcome = kernel.run(cell.source, min(cell_timeout, left))
                problem = _cell_problem(index, outcome, cell_timeout, memory_limit)
                if problem:
                    row.reasons.append(problem)
                elif outcome.status == "error" and outcome.ename != "NotImplementedError":
                    errors.append(f"{index} ({outcome.ename})")
                if outcome.status in ("stuck", "dead"):
                    alive = False
                    break
            if errors:
                row.reasons.append("errors in cell " + ", ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""))
            if not alive:
                row.reasons.append("exercises not graded: the kernel is gone")
                row.status = "graded"
                return
            grade_module, alias = Path(__file__).resolve(), f"_course_grading_{secrets.token_hex(6)}"
            prepare = (f"import importlib.util as _u, sys as _s\n"
                       f"_spec = _u.spec_from_file_location({alias + '_grade'!r}, {str(grade_module)!r})\n"
                       f"_g = _s.modules[{alias + '_grade'!r}] = _u.module_from_spec(_spec)\n"
                       f"_spec.loader.exec_module(_g)\n"
                       f"_g.kernel_prepare(globals(), {alias!r}, {str(out)!r}, "
                       f"{sorted({c.module for c in key if c.module})!r})")
            outcome = kernel.run(prepare, max(cell_timeout, GRADER_TIMEOUT))  # the grader's time, not the notebook's
            if outcome.status != "ok":
                row.reasons.append(f"exercises not graded: the grader could not load the checks in the kernel "
                                   f"({outcome.status} {outcome.ename}: {outcome.evalue[:120]})")
                return
            for call in key:
                code = (f"import sys as _s\n_s.modules[{alias + '_grade'!r}].kernel_check(globals(), {alias!r}, "
                        f"{str(out)!r}, {call.name!r}, {call.code!r})")
                outcome = kernel.run(code, max(cell_timeout, CHECK_TIMEOUT))
                if outcome.status in ("stuck", "dead"):
                    row.reasons.append(f"{call.name}: the check did not finish ({outcome.status}); "
                                       "later exercises not graded")
                    break
            row.status = "graded"
            _read_results(out, key, row)
        finally:
            kernel.close()


def _read_results(out: Path, key: list[CheckCall], row: Row) -> None:
    records = []
    with contextlib.suppress(OSError):
        for line in out.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    by_name = {r.get("name"): r for r in records if r.get("kind") == "check"}
    for r in records:
        if r.get("kind") == "prepared":
            row.reasons.extend(str(n) for n in r.get("notes", []))
            with contextlib.suppress(TypeError, ValueError):
                row.peak_mib = round(float(r["peak_rss_kib"]) / 1024, 1)
    for call in key:
        r = by_name.get(call.name)
        if r is None:
            row.reasons.append(f"{call.name}: no result (the check did not run)")
            continue
        try:
            points = min(max(float(r.get("points", 0.0)), 0.0), call.points)
        except (TypeError, ValueError):
            points = 0.0
        row.points[call.name] = points
        if points < call.points:
            row.reasons.append(f"{call.name}: {r.get('status')}: {str(r.get('message', ''))[:300]}")


def _zero(row: Row, lesson: str | None) -> None:
    """A row not graded, for a lesson known from its name: its exercises at 0 of their points."""
    with contextlib.suppress(Exception):
        if lesson:
            key = answer_key(lesson)
            row.lesson, row.max_points = lessons()[lesson].stem, sum(c.points for c in key)
            row.points = {c.name: 0.0 for c in key}


def grade(path: Path, forced: str | None, cell_timeout: float, submission_timeout: float,
          memory_limit: int | None) -> Row:
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
        grade_notebook(nb, lesson, row, cell_timeout, submission_timeout, memory_limit)
    except Exception as err:  # a bug in the grader must cost one row, not the whole room's grades
        row.status = "not graded"
        row.reasons.append(f"grader error ({type(err).__name__}: {str(err)[:200]})")
    return row


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:g}"


def write_csv(rows: list[Row], out: Path) -> list[str]:
    """Write the rows; return the header."""
    exercises: list[str] = []
    for lesson in sorted({r.lesson for r in rows if r.lesson}):
        for name in (name for r in rows if r.lesson == lesson for name in r.points):
            if name not in exercises:
                exercises.append(name)
    header = ["submission", "lesson", *exercises, "total", "max", "status", "peak_memory_mib", "reason"]
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r.submission, r.lesson, *(_fmt(r.points[e]) if e in r.points else "" for e in exercises),
                             _fmt(r.total), _fmt(r.max_points), r.status,
                             "" if r.peak_mib is None else _fmt(r.peak_mib), " | ".join(r.reasons)])
    return header


def summary(rows: list[Row]) -> str:
    lines = [f"{'submission':40} {'lesson':6} {'points':>9}  {'status':10}  first reason"]
    for r in rows:
        name = r.submission if len(r.submission) <= 40 else "..." + r.submission[-37:]
        reason = r.reasons[0] if r.reasons else ""
        lines.append(f"{name:40} {r.lesson[:2]:6} {_fmt(r.total) + '/' + _fmt(r.max_points):>9}  {r.status:10}  "
                     f"{reason[:70] + ('...' if len(reason) > 70 else '')}")
    return "\n".join(lines)


def expand(paths: list[str]) -> list[Path]:
    """Files as given; folders -> their *.ipynb files (not checkpoints), sorted."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        else:
            found.append(p)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.grade",
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
    submissions = expand(args.submissions)
    if not submissions:
        parser.error("no notebooks found in the folders given")
    out = Path(args.out)
    if any(out.resolve() == s.resolve() for s in submissions):
        parser.error(f"--out {out} is one of the submissions: the grader never writes to a submission")
    rows = []
    for path in submissions:
        print(f"grading {path} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        rows.append(grade(path, forced, args.cell_timeout, args.submission_timeout, memory_limit))
        print(f"  {_fmt(rows[-1].total)}/{_fmt(rows[-1].max_points)} in {time.monotonic() - start:.0f} s",
              file=sys.stderr, flush=True)
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
