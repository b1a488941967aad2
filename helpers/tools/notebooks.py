"""Student notebooks are generated from the solution notebooks: one source of truth per lesson.

    python -m helpers.tools.notebooks build              # regenerate notebooks/NN_*.ipynb from solutions/
    python -m helpers.tools.notebooks check              # exit 1 if anything drifts (tests and CI)
    python -m helpers.tools.notebooks execute [03 ...]   # re-run solutions in place (outputs kept), then build
    python -m helpers.tools.notebooks badges             # the "Open in Colab" badge of each lesson, for README.md
    python -m helpers.tools.notebooks leaks [03 ...]     # exercises whose answer is on the page above them

A solution notebook is the finished lesson with its outputs. Solution code sits between a line
``### BEGIN SOLUTION`` and a line ``### END SOLUTION`` (the nbgrader convention); markdown answers sit
between ``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->``. The student version replaces each
region and clears every output. The first code cell of every notebook is the course set-up cell,
``SETUP_CELL`` in helpers/tools/colab.py, stamped in here so no lesson can drift from it; just above it sits a
markdown cell with the lesson's "Open in Colab" badge (``colab_badge``: it opens the *student* notebook
``notebooks/NN_x.ipynb`` from GitHub), stamped the same way, so a new lesson gets both from ``build``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import html
import math
import os
import re
import sys
import textwrap
from fnmatch import fnmatch
from pathlib import Path

import nbformat

from helpers.tools.colab import COLAB_BADGE_IMAGE, SETUP_CELL, colab_badge

from ..constants import LESSON_PATTERN, ROOT

CODE_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")
MARKDOWN_MARKERS = ("<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->")
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
MARKDOWN_STUB = ("*Your answer here.*",)
# Execution timestamps and collapsed state say nothing about the lesson and would make every
# regenerated student notebook differ from the last one.
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "collapsed")
SETUP_CELL_ID = "course-setup"  # fixed, so that inserting the set-up cell is deterministic
# The badge cell's id names its lesson ("colab-badge-04"): an id shared by every lesson would make
# notebooks of different lessons look alike to anything that compares cell ids (helpers.tools.grade does).
BADGE_CELL_ID = "colab-badge"
HINT = "run: python -m helpers.tools.notebooks build"


def _markers(cell) -> tuple[str, str] | None:
    return {"code": CODE_MARKERS, "markdown": MARKDOWN_MARKERS}.get(cell.cell_type)


def _regions(cell, where: str) -> list[tuple[int, int]]:
    """(begin_line, end_line) of each solution region in a cell; ValueError if markers don't pair up."""
    markers = _markers(cell)
    if markers is None:
        return []
    begin, end = markers
    regions, start = [], None
    # startswith, not ==: a marker with trailing text must still count, or the solution would leak.
    for i, line in enumerate(cell.source.split("\n")):
        mark = line.strip()
        if mark.startswith(begin):
            if start is not None:
                raise ValueError(f"{where}: nested '{begin}' on line {i + 1} "
                                 f"(the region opened on line {start + 1} is not closed)")
            start = i
        elif mark.startswith(end):
            if start is None:
                raise ValueError(f"{where}: '{end}' on line {i + 1} has no '{begin}' before it")
            regions.append((start, i))
            start = None
    if start is not None:
        raise ValueError(f"{where}: '{begin}' on line {start + 1} has no matching '{end}'")
    return regions


def _where(name: str, index: int, cell) -> str:
    return f"{name}, cell {index} (id {cell.get('id', '?')}, {cell.cell_type})"


def solution_regions(nb, name: str = "notebook") -> list[tuple[int, str]]:
    """(cell_index, text between the markers) for every solution region, code and markdown alike."""
    found = []
    for index, cell in enumerate(nb.cells):
        lines = cell.source.split("\n")
        for begin, end in _regions(cell, _where(name, index, cell)):
            found.append((index, "\n".join(lines[begin + 1:end])))
    return found


def exercise_cells(nb, name: str = "notebook") -> list[int]:
    """Indices of the code cells that contain a solution region (the exercises students fill in)."""
    return sorted({index for index, _ in solution_regions(nb, name) if nb.cells[index].cell_type == "code"})


def _statements_run_by_the_cell(body):
    """The statements a region runs itself: into if/for/while/with/try, not into def, class or lambda."""
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _statements_run_by_the_cell(getattr(node, field, []))


def solution_side_effects(nb, name: str = "notebook") -> list[str]:
    """What a code solution region does besides binding names, which the student version would not do.

    A student notebook replaces each region by a stub, so the cells after it must not depend on anything
    the region did: the names it binds are checked by ``ruff --select F821`` on the student notebook
    (undefined there), and this checks the rest: a region must not change objects that exist outside it
    (``model.x = ...``, ``d[k] = ...``, ``x += ...`` on an outer name, ``del``) or call a method for its
    effect (``model.requires_grad_(False)``, ``torch.manual_seed(0)``). Functions it defines may do
    anything: they run only when called.
    """
    problems = []
    for index, text in solution_regions(nb, name):
        if nb.cells[index].cell_type != "code":
            continue
        where = _where(name, index, nb.cells[index])
        try:
            tree = ast.parse(textwrap.dedent(text))
        except SyntaxError as err:
            problems.append(f"{where}: the solution does not parse ({err.msg}, line {err.lineno})")
            continue
        bound = set()
        for node in _statements_run_by_the_cell(tree.body):
            line = f"{where}, solution line {getattr(node, 'lineno', '?')}"
            targets = {ast.Assign: lambda n: n.targets, ast.AnnAssign: lambda n: [n.target],
                       ast.AugAssign: lambda n: [n.target], ast.Delete: lambda n: n.targets}
            for target in targets.get(type(node), lambda n: [])(node):
                for part in ast.walk(target):
                    if isinstance(part, (ast.Attribute, ast.Subscript)):
                        problems.append(f"{line}: changes an object in place ({ast.unparse(target)})")
                        break
            if isinstance(node, ast.Delete):
                problems.append(f"{line}: deletes {', '.join(ast.unparse(t) for t in node.targets)}")
            if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id not in bound:
                problems.append(f"{line}: updates {node.target.id}, which exists outside the solution, in place")
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func,
                                                                                               ast.Attribute):
                problems.append(f"{line}: calls {ast.unparse(node.value.func)}() for its effect")
            for part in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
                if isinstance(part, ast.Name) and isinstance(part.ctx, ast.Store):
                    bound.add(part.id)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
    return problems


def _is_setup_or_placeholder(source: str) -> bool:
    lines = [line.strip() for line in source.split("\n")]
    return "helpers.tools.colab" in source or all(not line or line.startswith("#") for line in lines)


def stamp_setup_cell(nb, name: str = "notebook") -> bool:
    """Make the first code cell the course set-up cell, in place; True if anything changed.

    The first code cell is replaced only if it is a set-up cell (an outdated one, using helpers.tools.colab)
    or a placeholder (nothing but comments); otherwise a set-up cell is inserted before it, so lesson
    code is never overwritten.
    """
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    if code and nb.cells[code[0]].source == SETUP_CELL:
        return False
    if code and _is_setup_or_placeholder(nb.cells[code[0]].source):
        if _regions(nb.cells[code[0]], _where(name, code[0], nb.cells[code[0]])):
            raise ValueError(f"{name}: the set-up cell (cell {code[0]}) must not contain a solution region")
        nb.cells[code[0]].source = SETUP_CELL
        return True
    cell = nbformat.v4.new_code_cell(SETUP_CELL)
    if nb.get("nbformat_minor", 0) >= 5:
        cell.id = SETUP_CELL_ID
    else:  # notebooks before format 4.5 have no cell ids
        cell.pop("id", None)
    nb.cells.insert(code[0] if code else len(nb.cells), cell)
    return True


def is_lesson(name: str) -> bool:
    """True for a lesson file name (NN_topic.ipynb): only lessons have a student notebook to open in Colab."""
    return fnmatch(Path(name).name, LESSON_PATTERN)


def is_badge_cell(cell) -> bool:
    """A markdown cell that is the course's Colab badge: by its id (``colab-badge-NN``), or (an old or copied
    one) by being nothing but a link around Colab's badge image."""
    if cell.cell_type != "markdown":
        return False
    text = cell.source.strip()
    return str(cell.get("id", "")).startswith(BADGE_CELL_ID) or (
        COLAB_BADGE_IMAGE in text and text.startswith("[![") and "\n" not in text)


def badge_cell_id(name: str) -> str:
    """The badge cell's id for lesson ``name``: 'colab-badge-04' for '04_lora.ipynb'."""
    return f"{BADGE_CELL_ID}-{Path(name).name[:2]}"


def stamp_colab_badge(nb, name: str) -> bool:
    """Put lesson ``name``'s "Open in Colab" badge in a markdown cell just above the first code cell (the
    set-up cell), in place; True if anything changed. A badge that points to another notebook or sits
    elsewhere is rewritten or moved, and extra copies are removed. Run ``stamp_setup_cell`` first."""
    want = colab_badge(Path(name).name)
    with_ids = nb.get("nbformat_minor", 0) >= 5  # notebooks before format 4.5 have no cell ids
    badges = [i for i, cell in enumerate(nb.cells) if is_badge_cell(cell)]
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    if not code:
        raise ValueError(f"{name}: no code cell to put the Colab badge above (stamp the set-up cell first)")
    if (badges == [code[0] - 1] and nb.cells[badges[0]].source == want
            and (not with_ids or nb.cells[badges[0]].get("id") == badge_cell_id(name))):
        return False
    cell = nb.cells[badges[0]] if badges else nbformat.v4.new_markdown_cell()
    if with_ids:
        cell.id = badge_cell_id(name)
    else:
        cell.pop("id", None)
    for index in reversed(badges):
        del nb.cells[index]
    cell.source = want
    nb.cells.insert(next(i for i, c in enumerate(nb.cells) if c.cell_type == "code"), cell)
    return True


def stamp(nb, name: str = "notebook") -> bool:
    """Stamp the set-up cell and, for a lesson file name, the Colab badge above it; True if anything changed.

    Only those two cells are touched: every other cell, its source and its outputs stay as they are."""
    changed = stamp_setup_cell(nb, name)
    if is_lesson(name):
        changed = stamp_colab_badge(nb, name) or changed
    return changed


def _replace_regions(cell, where: str) -> str:
    lines = cell.source.split("\n")
    stub = CODE_STUB if cell.cell_type == "code" else MARKDOWN_STUB
    # Back to front, so the line numbers of earlier regions stay valid.
    for begin, end in reversed(_regions(cell, where)):
        indent = lines[begin][:len(lines[begin]) - len(lines[begin].lstrip())]
        lines[begin:end + 1] = [indent + line for line in stub]
    return "\n".join(lines)


def student_version(nb, name: str = "notebook"):
    """The student notebook for a solution notebook (pure: ``nb`` is not modified).

    With a lesson file ``name`` (NN_topic.ipynb) it carries that lesson's Colab badge."""
    solution_regions(nb, name)  # unbalanced markers are reported with the cell numbers of the source
    nb = copy.deepcopy(nb)
    stamp(nb, name)
    # Widget state is output too (saved by the executing kernel) and would show answers.
    nb.metadata.pop("widgets", None)
    for index, cell in enumerate(nb.cells):
        cell.source = _replace_regions(cell, _where(name, index, cell))
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def _render(nb) -> str:
    """Exactly the text nbformat.write puts in a file, so drift can be checked without writing."""
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def build(solutions_dir="solutions", notebooks_dir="notebooks", check: bool = False) -> list[str]:
    """Regenerate notebooks_dir/NN_*.ipynb from solutions_dir/NN_*.ipynb; return the files that changed.

    With check=True nothing is written and the files that *would* change are returned, including
    student notebooks that have no solution any more (build deletes those).
    """
    solutions_dir, notebooks_dir = Path(solutions_dir), Path(notebooks_dir)
    changed = []
    solutions = sorted(solutions_dir.glob(LESSON_PATTERN))
    for source in solutions:
        nb = _read(source)
        if stamp(nb, source.name):
            # Only the set-up cell and the badge are rewritten; the solution's outputs stay as they were.
            changed.append(str(source))
            if not check:
                nbformat.write(nb, source, version=4)
        target = notebooks_dir / source.name
        student = student_version(nb, source.name)
        if not target.exists() or target.read_text(encoding="utf-8") != _render(student):
            changed.append(str(target))
            if not check:
                target.parent.mkdir(parents=True, exist_ok=True)
                nbformat.write(student, target, version=4)
    names = {source.name for source in solutions}
    for stale in sorted(notebooks_dir.glob(LESSON_PATTERN)):
        if stale.name not in names:
            changed.append(str(stale))
            if not check:
                stale.unlink()
    return changed


class NotebookFailed(RuntimeError):
    """A solution notebook that did not run to the end (its file is left as it was)."""


def execute(path, timeout: int = 900, cwd=None):
    """Run a solution notebook top to bottom and save it in place with its outputs; return it.

    The working directory is the notebook's folder (as in JupyterLab) unless ``cwd`` is given. The kernel
    runs through ``helpers.tools.runner`` (``COURSE_PROGRESS=0``: no progress bars in the saved outputs).
    On an error nothing is saved, so a failing run never replaces good outputs: ``NotebookFailed`` says
    which cell failed, the section it is in, and the first line of the error.
    """
    from helpers.tools.runner import run_notebook

    path = Path(path)
    nb = _read(path)
    stamp(nb, path.name)  # the set-up cell is what makes `helpers` importable
    result = run_notebook(nb, cwd=cwd or path.parent, cell_timeout=timeout)
    if not result.ok:
        raise NotebookFailed(f"{path.name}: {result.error or result.stopped}; not saved")
    nbformat.write(nb, path, version=4)
    return nb


# ------------------------------------------------------------------------------------------------
# No answer on the page: what an exercise's check judged must not be readable above the exercise
# ------------------------------------------------------------------------------------------------
# A printed number answers an exercise if, read in any of these units, it is within the exercise's own
# tolerance of the answer (bytes printed in KiB, MiB, GiB, kB, MB or GB; a fraction printed in %).
UNITS = (1, 2**10, 2**20, 2**30, 1e3, 1e6, 1e9, 1e-2)
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
# Small whole numbers (a batch size, a stage, a rank) are on every page; an exercise whose answer is one
# is a choice, kept honest by where it sits (before the cells that would decide it), not by this scan.
SMALL = 100
MIN_LINE = 12  # solution lines shorter than this (``return x``) say nothing about the answer


def _cell_text(cell) -> str:
    """What a reader sees of a cell: its markdown, or its outputs (text, with HTML tags removed)."""
    if cell.cell_type == "markdown":
        return cell.source
    parts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append(out["text"])
        data = out.get("data", {})
        for mime in ("text/plain", "text/markdown", "text/html", "text/latex"):
            if mime in data:
                text = data[mime]
                parts.append(html.unescape(re.sub(r"<[^>]+>", " ", text)) if mime == "text/html" else text)
    return "\n".join(parts)


DURATION = re.compile(r"\s?(?:s|ms|min|seconds?)\b")  # "2.43 s": a time, never bytes or a fraction in other units


def _numbers(text: str) -> set[tuple[float, bool]]:
    """(number, whether it may be in another unit): a small whole number ("4 blocks") or a duration ("2.43 s")
    is only itself."""
    found = set()
    for match in NUMBER.finditer(text):
        digits = match.group()
        number = float(digits.replace(",", ""))
        duration = DURATION.match(text, match.end()) is not None
        found.add((number, not duration and ("." in digits or "e" in digits.lower() or number >= SMALL)))
    return found


def _leaves(data) -> list[float]:
    """The numbers in an answer worth looking for: not booleans, not small whole numbers."""
    if isinstance(data, dict):
        return [x for k, v in data.items() if k != "__class__" for x in _leaves(v)]
    if isinstance(data, list):
        return [x for v in data for x in _leaves(v)]
    if type(data) in (int, float) and math.isfinite(data) and not (data == int(data) and abs(data) < SMALL):
        return [abs(float(data))]
    return []


def _printed_as(value: float, printed: set[tuple[float, bool]], tolerance: float) -> float | None:
    for number, scalable in printed:
        for unit in UNITS if scalable else (1,):
            if abs(number * unit - value) <= max(tolerance, 1e-12) * value:
                return number
    return None


def _code_lines(region: str) -> list[str]:
    """A solution region's statements, whitespace removed, right-hand sides of assignments only."""
    lines = []
    for line in region.split("\n"):
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^[A-Za-z_][\w.]*\s*=(?!=)\s*(.+)$", line)
        line = re.sub(r"\s+", "", match.group(1) if match else line)
        if len(line) >= MIN_LINE:
            lines.append(line)
    return lines


def check_records(nb) -> list[tuple[int, dict]]:
    """(cell index, record) for every check output of an executed notebook: what each check judged."""
    return [(index, out["metadata"]["course_check"]) for index, cell in enumerate(nb.cells)
            if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.get("metadata", {}).get("course_check")]


def answers_on_the_page(solution, student, name: str = "notebook") -> list[str]:
    """Why each exercise of an executed solution notebook can be answered from the page above it.

    Numbers: the answer each check judged (recorded in its output's metadata when the solution ran) must
    not be printed, within the exercise's tolerance, in any markdown or output above the exercise cell.
    Code: the solution region's statements must not all appear in the student notebook above it."""
    from helpers.checks import EXERCISES, _load_lesson_checks

    _load_lesson_checks()
    found = []
    exercise_at = exercise_cells(solution, name)
    for index, record in check_records(solution):
        if record["exercise"] not in EXERCISES:
            continue
        ex = EXERCISES[record["exercise"]]
        start = max((i for i in exercise_at if i <= index), default=index)  # the cell the answer is in
        printed = _numbers("\n".join(_cell_text(c) for c in solution.cells[:start]))
        for value in _leaves(record["answer"]):
            hit = _printed_as(value, printed, ex.tolerance)
            if hit is not None:
                found.append(f"{name}: {ex.name}'s answer {value:,.6g} is printed above it as {hit:,.6g} "
                             f"(within its tolerance of {ex.tolerance:.2%})")
    regions = solution_regions(solution, name)
    for index, region in regions:
        if solution.cells[index].cell_type != "code":
            continue
        lines = _code_lines(region)
        above = re.sub(r"\s+", "", "\n".join(c.source for c in student.cells[:index]))
        if lines and all(line in above for line in lines):
            found.append(f"{name}: the solution of cell {index} appears verbatim above it in the student notebook")
    return found


def _select(solutions_dir: Path, names: list[str]) -> list[Path]:
    """Solutions matching NAMES: '03', '03_lora', '03_lora.ipynb' or a path; all of them if none."""
    every = sorted(solutions_dir.glob(LESSON_PATTERN))
    if not names:
        return every
    chosen = []
    for name in names:
        stem = Path(name).name.removesuffix(".ipynb")
        hits = [p for p in every if p.stem == stem or p.stem.startswith(stem + "_")]
        if not hits:
            raise SystemExit(f"no solution notebook matches {name!r} in {solutions_dir}")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.tools.notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "check", "execute", "badges", "leaks"])
    parser.add_argument("names", nargs="*", help="execute and leaks: lessons, e.g. 03 or 03_lora")
    parser.add_argument("--timeout", type=int, default=900, help="execute only: seconds per cell")
    args = parser.parse_args(argv)
    solutions, notebooks = ROOT / "solutions", ROOT / "notebooks"

    def show(paths):
        return "\n".join("  " + os.path.relpath(p) for p in paths)

    if args.command == "badges":
        for path in sorted(solutions.glob(LESSON_PATTERN)):
            print(f"{path.stem}: {colab_badge(path.name)}")
        return 0
    if args.command == "leaks":
        found = [leak for path in _select(solutions, args.names)
                 for leak in answers_on_the_page(_read(path), student_version(_read(path), path.name), path.name)]
        print("\n".join(found) or "no exercise's answer is on the page above it")
        return 1 if found else 0
    if args.command == "check":
        drift = build(solutions, notebooks, check=True)
        if drift:
            print(f"notebooks out of date ({len(drift)}):\n{show(drift)}\n{HINT}")
            return 1
        print("notebooks are in sync with solutions")
        return 0
    if args.command == "execute":
        for path in _select(solutions, args.names):
            print(f"executing {os.path.relpath(path)} ...", flush=True)
            try:
                execute(path, timeout=args.timeout)
            except NotebookFailed as err:
                print(f"failed: {err}", file=sys.stderr)
                return 1
    changed = build(solutions, notebooks)
    print(f"updated {len(changed)} file(s)" + (":\n" + show(changed) if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
