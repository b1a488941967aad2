"""The course report: run every solution notebook on this machine and say what each technique measured.

    python -m helpers.tools.course_report                 # every lesson -> course-report/course_report.md, PNGs, .json
    python -m helpers.tools.course_report --lessons 00 03 # a subset
    python -m helpers.tools.course_report --out /tmp/r --timeout 900

Each lesson runs top to bottom in a fresh kernel (``helpers.tools.runner``), on an in-memory copy of its solution
notebook (the file is never written), with the notebook's folder as the working directory, as JupyterLab and the
tests run it, and with ``COURSE_STRICT_CHECKS=1`` (unless set otherwise), so a failing exercise check fails the
lesson as it does in the test suite. A lesson that fails is reported with the failing cell, the section it is in
and the first line of its error, and the report carries on with the next lesson.

Each lesson states its own *headline* in its last cell (``helpers.headline.headline``: its measured
``MemoryReport`` objects, its predictions, perplexities and timings); the report reads it from the executed
notebook's outputs and knows no lesson's variable names. A lesson without one (or that failed before it) still
gets its run time and result, with a note.

The report is rewritten after every lesson, marked *partial* until the last one is done, so a run that
stops early leaves a report that says how far it got. Every file is written to a temporary name and
renamed into place. The exit status is 0 when every lesson passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..constants import ROOT
from ..headline import as_mib, error_percent, md_cell
from ..memory_report import CATEGORIES, LABELS

DEFAULT_OUT = ROOT / "course-report"  # ignored by git (.gitignore: /course-report/)
REPORT_MD, REPORT_JSON = "course_report.md", "course_report.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- running a lesson ----------------------------------------------------------------------------------

@dataclass
class LessonResult:
    lesson: str  # "03"
    name: str  # "03_gradient_checkpointing"
    status: str = "not run"  # "passed" | "failed"
    seconds: float = 0.0  # kernel start to the end of the last cell
    cells_run: int = 0
    cells_total: int = 0
    error: str | None = None  # first line of the error
    error_cell: int | None = None  # index in the notebook's cells, as JupyterLab counts them (from 0)
    error_section: str | None = None  # the markdown heading above the failing cell
    slowest_cell: tuple[int, float] | None = None
    technique: str | None = None
    headline: dict | None = None  # what the lesson's headline(...) call emitted (helpers.headline)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _first_line(text) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def run_lesson(path, timeout: int = 900, cell_bar=None) -> LessonResult:
    """Run one solution notebook in a fresh kernel (an in-memory copy), then read its headline from its outputs."""
    import nbformat

    from ..headline import read
    from .runner import run_notebook

    path = Path(path)
    result = LessonResult(lesson=path.stem[:2], name=path.stem)
    nb = nbformat.read(path, as_version=4)
    result.cells_total = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.strip())
    if cell_bar is not None:
        cell_bar.reset(total=result.cells_total)
        cell_bar.set_description(path.stem[:32])
    run = run_notebook(nb, cwd=path.parent, cell_timeout=timeout, strict_checks=True, pythonpath=[ROOT],
                       progress=(lambda cell, done, total: cell_bar.update()) if cell_bar is not None else None)
    result.seconds, result.cells_run = run.seconds, len(run.cells)
    if run.slowest is not None:
        result.slowest_cell = (run.slowest.index, run.slowest.seconds)
    if run.error is not None:
        result.error, result.error_cell, result.error_section = run.error.message, run.error.index, run.error.heading
    result.status = "failed" if run.error is not None or run.stopped else "passed"
    result.headline = read(nb)
    if result.headline is not None:
        result.technique = result.headline.get("technique")
        if result.error:
            result.notes.append("the lesson failed: the numbers below are what it had measured before the failure")
    elif result.error:
        result.notes.append("no headline: the lesson stopped before its headline cell")
    else:
        result.notes.append("this lesson states no headline (helpers.headline.headline in its last cell): run time "
                            "and result only")
    return result


# --- the report ----------------------------------------------------------------------------------------

def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def _before_after(result: LessonResult) -> str:
    configs = (result.headline or {}).get("measured", [])
    if len(configs) < 2:
        return ""
    before, after = configs[0], configs[-1]
    ratio = after["total"] / before["total"] if before["total"] else float("nan")
    return f"{as_mib(before['total'])} → {as_mib(after['total'])} MiB ({ratio:.2f}x)"


def _prediction_summary(result: LessonResult) -> str:
    rows = (result.headline or {}).get("predicted", [])
    if not rows:
        return ""
    errors = [error_percent(r) for r in rows]
    worst = max(errors, key=abs)
    within = sum(abs(e) <= 10 for e in errors)
    return f"{within} of {len(rows)} within ±10 % (worst {worst:+.1f} %)"


def _status(result: LessonResult) -> str:
    return {"passed": "✅ passed", "failed": "❌ failed"}.get(result.status, result.status)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def plot_memory(result: LessonResult, path: Path) -> bool:
    """Stacked bars by category of the lesson's measured configurations; False if none has a breakdown."""
    from helpers.plots import measured_bars

    rows = {r["label"]: r["parts"] for r in (result.headline or {}).get("measured", []) if r.get("parts")}
    if not rows:
        return False
    _save(measured_bars(rows, title=f"Lesson {result.lesson}: measured peak by category").figure, path)
    return True


def plot_predictions(results: list[LessonResult], path: Path) -> bool:
    """Predicted against measured, every lesson: both totals side by side, and the error in percent."""
    from helpers.plots import prediction_errors

    rows = [(f"{r.lesson} {row['label']}", row["predicted"], row["measured"])
            for r in results for row in (r.headline or {}).get("predicted", [])]
    if not rows:
        return False
    _save(prediction_errors(rows), path)
    return True


def plot_run_time(results: list[LessonResult], path: Path) -> bool:
    from helpers.plots import run_times

    done = [(r.name, r.seconds, r.passed) for r in results if r.status != "not run"]
    if not done:
        return False
    _save(run_times(done).figure, path)
    return True


def machine_lines() -> list[str]:
    try:
        from helpers.hardware import hardware_check

        lines = hardware_check().lines()
    except Exception as err:  # the report must not fail on the hardware check
        lines = [f"hardware check failed: {_first_line(err)}"]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads.")
    except Exception:
        pass
    lines.append(f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPU cores.")
    return lines


def _lesson_section(result: LessonResult, plots: dict) -> list[str]:
    title = result.name[3:].replace("_", " ")
    out = [f"## {result.lesson} {title[:1].upper() + title[1:]}", ""]
    line = f"**{_status(result)}** in {_seconds(result.seconds)}, {result.cells_run} of {result.cells_total} code cells"
    if result.slowest_cell:
        line += f" (slowest: cell {result.slowest_cell[0]}, {_seconds(result.slowest_cell[1])})"
    out += [line + ".", ""]
    if result.error:
        where = f"cell {result.error_cell}" if result.error_cell is not None else ""
        if where and result.error_section:
            where += f" (section “{md_cell(result.error_section)}”)"
        out += [f"Error in {where + ': ' if where else ''}`{md_cell(result.error)}`", ""]
    if result.technique:
        out += [f"Technique: {result.technique}.", ""]
    out += [f"*Note: {md_cell(note)}.*" if not note.endswith(".") else f"*Note: {md_cell(note)}*"
            for note in result.notes]
    if result.notes:
        out.append("")
    h = result.headline or {}
    configs = h.get("measured", [])
    if configs:
        base = configs[0]["total"]
        out += ["| configuration (measured) | " + " | ".join(LABELS[c] for c in CATEGORIES)
                + " | peak MiB | vs first |", "|---|" + "---:|" * (len(CATEGORIES) + 2)]
        for row in configs:
            parts = row.get("parts") or {}
            cells = [as_mib(parts[c]) if c in parts else "" for c in CATEGORIES]
            ratio = f"{row['total'] / base:.2f}x" if base else ""
            out.append(f"| {md_cell(row['label'])} | " + " | ".join(cells) + f" | {as_mib(row['total'])} | {ratio} |")
        out.append("")
    predicted = h.get("predicted", [])
    if predicted:
        out += ["| predicted vs measured | predicted MiB | measured MiB | error % |", "|---|---:|---:|---:|"]
        out += [(f"| {md_cell(r['label'])} | {as_mib(r['predicted'])} | {as_mib(r['measured'])} | "
                 f"{error_percent(r):+.2f} |")
                for r in predicted]
        out.append("")
    for group, heading in (("quality", "value"), ("time", "seconds"), ("extra", "value")):
        rows = h.get(group, [])
        if rows:
            out += [f"| {group} | {heading} |", "|---|---:|"]
            out += [f"| {md_cell(r['label'])} | {r['value']:,.4g} |" for r in rows]
            out.append("")
    if result.lesson in plots:
        out += [f"![{result.name}: memory by category]({plots[result.lesson]})", ""]
    return out


def render(results: list[LessonResult], machine: list[str], plots: dict, pending: list[str],
           interrupted: str | None = None, command: str = "") -> str:
    """The Markdown report. ``pending``: lessons not run yet; a report with any is marked partial."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# Course report", ""]
    if pending or interrupted:
        why = interrupted or "the run was still going when this was written"
        out += [f"> **Partial report**: {len(results)} of {len(results) + len(pending)} lessons done ({why}). "
                f"Not run: {', '.join(pending) or 'none'}.", ""]
    out += [f"Written {now}" + (f" by `{command}`" if command else "") + ".", "", "## This machine", ""]
    out += [f"- {md_cell(line)}" for line in machine] + [""]
    passed = sum(r.passed for r in results)
    total = sum(r.seconds for r in results)
    out += ["## Summary", "",
            "| lesson | result | run time | before → after (peak) | predicted vs measured |",
            "|---|---|---:|---|---|"]
    for r in results:
        out.append(f"| {r.name} | {_status(r)} | {_seconds(r.seconds)} | {_before_after(r)} | "
                   f"{_prediction_summary(r)} |")
    predictions = [error_percent(row) for r in results for row in (r.headline or {}).get("predicted", [])]
    out += ["", f"**Totals**: {passed} of {len(results)} lessons passed"
            + (f", {len(results) - passed} failed" if passed < len(results) else "")
            + f"; run time {_seconds(total)}"
            + (f"; {sum(abs(e) <= 10 for e in predictions)} of {len(predictions)} predictions within ±10 % of the "
               f"measurement" if predictions else "") + ".", ""]
    for key, alt in (("run-time", "run time per lesson"), ("predictions", "predicted vs measured")):
        if key in plots:
            out += [f"![{alt}]({plots[key]})", ""]
    for r in results:
        out += _lesson_section(r, plots)
    return "\n".join(out).rstrip() + "\n"


def write_report(out_dir, results: list[LessonResult], machine: list[str], pending: list[str] = (),
                 interrupted: str | None = None, command: str = "") -> Path:
    """Write course_report.md, course_report.json and the plots into out_dir (each file atomically); return the .md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    for r in results:
        if plot_memory(r, out_dir / f"memory-{r.lesson}.png"):
            plots[r.lesson] = f"memory-{r.lesson}.png"
    if plot_run_time(results, out_dir / "run-time.png"):
        plots["run-time"] = "run-time.png"
    if plot_predictions(results, out_dir / "predicted-vs-measured.png"):
        plots["predictions"] = "predicted-vs-measured.png"
    partial = bool(pending) or interrupted is not None
    data = {"partial": partial, "pending": list(pending), "interrupted": interrupted, "machine": machine,
            "lessons": [asdict(r) for r in results], "plots": plots}
    _atomic_write(out_dir / REPORT_JSON, json.dumps(data, indent=1).encode())
    path = out_dir / REPORT_MD
    _atomic_write(path, render(results, machine, plots, list(pending), interrupted, command).encode())
    return path


def run(solutions_dir=None, lessons=(), out=DEFAULT_OUT, timeout: int = 900, progress: bool = True,
        command: str = "") -> list[LessonResult]:
    """Run the chosen lessons one by one, rewriting the report after each; return their results."""
    from tqdm import tqdm

    from helpers.tools.notebooks import _select

    solutions_dir = Path(solutions_dir or ROOT / "solutions")
    paths = _select(solutions_dir, list(lessons))
    if not paths:
        raise SystemExit(f"no solution notebooks in {solutions_dir}")
    machine = machine_lines()
    results: list[LessonResult] = []
    lesson_bar = tqdm(paths, desc="lessons", unit="lesson", position=0, disable=not progress, file=sys.stderr)
    cell_bar = tqdm(total=0, unit="cell", position=1, leave=False, disable=not progress, file=sys.stderr)
    try:
        for i, path in enumerate(lesson_bar):
            lesson_bar.set_postfix_str(path.stem)
            result = run_lesson(path, timeout=timeout, cell_bar=cell_bar)
            results.append(result)
            lesson_bar.write(f"{path.stem}: {result.status} in {_seconds(result.seconds)}"
                             + (f" (cell {result.error_cell}: {result.error})" if result.error else ""),
                             file=sys.stderr)
            write_report(out, results, machine, pending=[p.stem for p in paths[i + 1:]], command=command)
    except KeyboardInterrupt:
        done = {r.name for r in results}
        write_report(out, results, machine, pending=[p.stem for p in paths if p.stem not in done],
                     interrupted="interrupted", command=command)
        raise
    finally:
        cell_bar.close()
        lesson_bar.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.tools.course_report", description=__doc__.split("\n")[0])
    parser.add_argument("--lessons", nargs="*", default=[], metavar="NN",
                        help="lessons to run, e.g. 00 03 or 03_gradient_checkpointing (default: all)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default: 900)")
    parser.add_argument("--solutions", default=str(ROOT / "solutions"), help="folder of solution notebooks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    given = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"python -m helpers.tools.course_report {given}".rstrip()
    try:
        results = run(args.solutions, args.lessons, args.out, args.timeout, progress=not args.no_progress,
                      command=command)
    except KeyboardInterrupt:
        print(f"interrupted: partial report in {Path(args.out) / REPORT_MD}", file=sys.stderr)
        return 130
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} lessons passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"\nreport: {Path(args.out) / REPORT_MD}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
