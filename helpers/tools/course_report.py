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

Each lesson's run time stands beside the minutes the README's course map advertises (``advertised_minutes``), and
a lesson's *main figure* (the image output of its cell tagged ``main-figure``) is saved beside the report.

The report is rewritten after every lesson, marked *partial* until the last one is done, so a run that
stops early leaves a report that says how far it got. Every file is written to a temporary name and
renamed into place. The exit status is 0 when every lesson passed, 1 otherwise. Progress goes to stderr: bars on a
terminal, plain lines when stderr is a file or a pipe (no carriage returns in a log).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..constants import ROOT, GiB
from ..headline import as_duration, as_mib, error_percent, md_cell
from ..memory_report import CATEGORIES, LABELS, moment_words

DEFAULT_OUT = ROOT / "course-report"  # ignored by git (.gitignore: /course-report/)
REPORT_MD, REPORT_JSON = "course_report.md", "course_report.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAIN_FIGURE_TAG = "main-figure"  # the cell whose image is a lesson's main figure (cell metadata "tags")
SLOW = 1.5  # a lesson slower than this many times its advertised minutes is flagged
ADVERTISED_COLUMN = "minutes, 2-core CPU"  # the README course map's column of advertised run times
TIMELINE_SECTION = "The peak is a moment: one step over time"  # lesson 00's section that shows a step over time


# --- running a lesson ----------------------------------------------------------------------------------

@dataclass
class LessonResult:
    lesson: str  # "03"
    name: str  # "03_gradient_checkpointing"
    status: str = "not run"  # "passed" | "failed"
    seconds: float = 0.0  # kernel start to the end of the last cell
    advertised_minutes: float | None = None  # what the README's course map says it takes (a 2-core CPU)
    load: float | None = None  # the machine's 5-minute load average when the lesson ended: other work slows it
    cells_run: int = 0
    cells_total: int = 0
    error: str | None = None  # first line of the error
    error_cell: int | None = None  # index in the notebook's cells, as JupyterLab counts them (from 0)
    error_section: str | None = None  # the markdown heading above the failing cell
    slowest_cell: tuple[int, float] | None = None  # (index, seconds)
    slowest_section: str | None = None  # the markdown heading above the slowest cell
    technique: str | None = None
    headline: dict | None = None  # what the lesson's headline(...) call emitted (helpers.headline)
    main_figure_cell: int | None = None  # the cell tagged main-figure whose image the report shows
    main_figure_section: str | None = None
    notes: list[str] = field(default_factory=list)
    main_figure: bytes | None = field(default=None, repr=False)  # that image, PNG (a file beside the report)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def times_advertised(self) -> float | None:
        """The run time over the minutes the course map advertises (None when it advertises none)."""
        return self.seconds / 60 / self.advertised_minutes if self.advertised_minutes else None

    @property
    def slow(self) -> bool:
        """More than SLOW times the minutes the course map advertises."""
        return (self.times_advertised or 0) > SLOW

    @property
    def busy(self) -> bool:
        """The machine had more work than cores while the lesson ran (its run time says more about the load)."""
        return self.load is not None and self.load > (os.cpu_count() or 1)

    def as_json(self) -> dict:
        data = asdict(self)
        data.pop("main_figure")  # the PNG is a file of its own
        return data


def _first_line(text) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def main_figure(nb) -> tuple[int, bytes] | None:
    """(cell index, PNG bytes) of the first image a cell tagged ``main-figure`` shows; None when no tagged cell shows
    one (no cell is tagged, or the lesson failed before it)."""
    for index, cell in enumerate(nb.cells):
        if MAIN_FIGURE_TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                data = base64.b64decode("".join(png) if isinstance(png, list) else png)
                if data.startswith(PNG_SIGNATURE):
                    return index, data
    return None


def run_lesson(path, timeout: int = 900, on_cell=None) -> LessonResult:
    """Run one solution notebook in a fresh kernel (an in-memory copy), then read its headline and main figure from
    its outputs. ``on_cell(cell_run, done, total)``: called after every code cell (progress)."""
    import nbformat

    from ..headline import read
    from .runner import run_notebook, section_heading

    path = Path(path)
    result = LessonResult(lesson=path.stem[:2], name=path.stem)
    nb = nbformat.read(path, as_version=4)
    result.cells_total = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.strip())
    run = run_notebook(nb, cwd=path.parent, cell_timeout=timeout, strict_checks=True, pythonpath=[ROOT],
                       progress=on_cell)
    result.seconds, result.cells_run = run.seconds, len(run.cells)
    if run.slowest is not None:
        result.slowest_cell = (run.slowest.index, run.slowest.seconds)
        result.slowest_section = section_heading(nb, run.slowest.index)
    if run.error is not None:
        result.error, result.error_cell, result.error_section = run.error.message, run.error.index, run.error.heading
    result.status = "failed" if run.error is not None or run.stopped else "passed"
    figure = main_figure(nb)
    if figure is not None:
        result.main_figure_cell, result.main_figure = figure
        result.main_figure_section = section_heading(nb, result.main_figure_cell)
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


def advertised_minutes(readme=ROOT / "README.md") -> dict[str, float]:
    """Lesson -> the minutes the README's course map advertises on a 2-core CPU (the first number of its cell:
    "3.5, plus 1.5 once per machine" -> 3.5). Empty when the README or that column is missing: the report then
    shows run times alone."""
    try:
        lines = Path(readme).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    found, column = {}, None
    for line in lines:
        if not line.startswith("|"):
            column = None  # a table ends at its first line that is not a row
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index(ADVERTISED_COLUMN) if ADVERTISED_COLUMN in cells else None
            continue
        lesson = re.match(r"\[?(\d\d)\b", cells[0])
        number = re.search(r"\d+(?:\.\d+)?", cells[column]) if column < len(cells) else None
        if lesson and number:
            found[lesson.group(1)] = float(number.group())
    return found


# --- the report ----------------------------------------------------------------------------------------

def _minutes(minutes: float) -> str:
    return f"{minutes:g} min"


def _signed(percent: float, digits: int = 2) -> str:
    """A signed percentage that never reads "-0.00"."""
    return f"{round(percent, digits) + 0.0:+.{digits}f}"


def load_average() -> float | None:
    """The 5-minute load average (None where the system does not say)."""
    try:
        return os.getloadavg()[1]
    except (AttributeError, OSError):
        return None


def _run_time(result: LessonResult) -> str:
    """The run time, flagged when over SLOW times the advertised minutes."""
    flag = f" ⚠️ {result.times_advertised:.1f}× advertised" if result.slow else ""
    return as_duration(result.seconds) + flag


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
    return f"{within} of {len(rows)} within ±10 % (worst {_signed(worst, 1)} %)"


def _status(result: LessonResult) -> str:
    return {"passed": "✅ passed", "failed": "❌ failed"}.get(result.status, result.status)


def savings(results: list[LessonResult]) -> list[dict]:
    """Each lesson's saving for the overview chart: its first measured configuration (the baseline, "before") and
    its last (the headline, "after"), by the lesson's own labels; lessons with fewer than two are left out."""
    rows = []
    for r in results:
        configs = (r.headline or {}).get("measured", [])
        if len(configs) >= 2 and configs[0]["total"]:
            before, after = configs[0], configs[-1]
            rows.append({"lesson": r.lesson, "before_label": before["label"], "after_label": after["label"],
                         "before": before["total"], "after": after["total"],
                         "percent": 100 * after["total"] / before["total"]})
    return rows


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight", pad_inches=0.15)  # nothing cut at the edges
    os.replace(tmp, path)


def plot_memory(result: LessonResult, path: Path) -> bool:
    """Stacked bars by category of the lesson's measured configurations, under the lesson's own labels; False if
    none has a breakdown."""
    from helpers.plots import measured_bars

    rows = [r for r in (result.headline or {}).get("measured", []) if r.get("parts")]
    if not rows:
        return False
    ax = measured_bars({r["label"]: r["parts"] for r in rows}, moments={r["label"]: r.get("moment") for r in rows},
                       title=f"Lesson {result.lesson}: measured peak by category")
    _save(ax.figure, path)
    return True


def plot_savings(results: list[LessonResult], path: Path) -> bool:
    """Every lesson's after as a percentage of its before, on one chart."""
    from helpers.plots import saving_bars

    rows = [(f"{s['lesson']}: {s['before_label']} → {s['after_label']}", s["before"], s["after"])
            for s in savings(results)]
    if not rows:
        return False
    _save(saving_bars(rows).figure, path)
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

    done = [(r.name, r.seconds, r.passed, r.advertised_minutes) for r in results if r.status != "not run"]
    if not done:
        return False
    _save(run_times(done, slow=SLOW).figure, path)
    return True


# --- the machine and the model -------------------------------------------------------------------------

def model_line(env=None) -> str:
    """Which model the lessons load: COURSE_MODEL from the environment the kernels inherit, else the default."""
    from helpers.models import DEFAULT_MODEL

    name = (os.environ if env is None else env).get("COURSE_MODEL")
    if name and name != DEFAULT_MODEL:
        return f"Model: {name} (set by COURSE_MODEL; the numbers are this model's, not the course model's)."
    return f"Model: {DEFAULT_MODEL}, the course model (COURSE_MODEL not set)."


def memory_bytes() -> int | None:
    """This machine's RAM in bytes (None where neither psutil nor sysconf says)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def cpu_line(cpuinfo: str | None = None) -> str:
    """CPU name, cores (and those this process may use) and RAM."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ram = memory_bytes()
    return (f"CPU: {name}, {cores} cores" + (f" ({usable} usable here)" if usable != cores else "")
            + (f"; RAM: {ram / GiB:.1f} GiB." if ram else "; RAM: unknown."))


def machine_lines() -> list[str]:
    lines = [model_line(), cpu_line()]
    load = load_average()
    if load is not None:
        lines.append(f"Load average when the report started: {load:.1f} (5 minutes) on {os.cpu_count()} cores"
                     + (": other work is running, and it slows the lessons." if load > (os.cpu_count() or 1) else "."))
    try:
        from helpers.hardware import hardware_check

        lines += hardware_check().lines()
    except Exception as err:  # the report must not fail on the hardware check
        lines.append(f"hardware check failed: {_first_line(err)}")
    try:
        import torch

        lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads.")
    except Exception:
        pass
    lines.append(f"{platform.platform()}, Python {platform.python_version()}.")
    return lines


def strict_checks() -> bool:
    """Whether a failing exercise check fails the lesson: the kernels get COURSE_STRICT_CHECKS=1 unless set."""
    return os.environ.get("COURSE_STRICT_CHECKS", "1") == "1"


def how_to_read() -> list[str]:
    """What the report's words and columns mean."""
    checks = ("and every exercise check passed (COURSE_STRICT_CHECKS=1)" if strict_checks() else
              "(COURSE_STRICT_CHECKS is not 1 here: a failing exercise check does not fail the lesson)")
    return [
        "## How to read this report", "",
        f"- **passed**: the lesson's solution notebook ran top to bottom in a fresh kernel, every `assert` in it held "
        f"{checks}. **failed**: a cell raised; the report names the cell and its section.",
        f"- **run time**: from the kernel's start to the end of the last cell, beside the minutes the README's course "
        f"map advertises for a 2-core CPU; ⚠️ marks a lesson that took more than {SLOW:g}× its advertised time.",
        "- **peak**: the largest total of live tensor bytes during a measured block, split by category at that "
        "moment; **moment of the peak** says when in a training step it was (— when the measurement does not say, "
        "e.g. inference). A training step can show 0 MiB of gradients because its peak is at the start of "
        f"backward, before any gradient exists (lesson 00's section “{TIMELINE_SECTION}” shows the step over time).",
        "- **vs first**: a configuration's peak divided by the lesson's first measured configuration (its baseline).",
        "- **error %** = (predicted − measured) / measured: positive means the prediction is above the measurement.",
        ""]


def _lesson_section(result: LessonResult, plots: dict) -> list[str]:
    title = result.name[3:].replace("_", " ")
    out = [f"## {result.lesson} {title[:1].upper() + title[1:]}", ""]
    advertised = (f" (the course map advertises {_minutes(result.advertised_minutes)}"
                  + (f": ⚠️ {result.times_advertised:.1f}× that" if result.slow else "")
                  + ")") if result.advertised_minutes else ""
    load = (f" The machine was busy: a load average of {result.load:.1f} on {os.cpu_count()} cores while it ran."
            if result.busy else "")
    out += [f"**{_status(result)}** in {as_duration(result.seconds)}{advertised}, {result.cells_run} of "
            f"{result.cells_total} code cells.{load}", ""]
    if result.slowest_cell:
        index, seconds = result.slowest_cell
        where = f"“{md_cell(result.slowest_section)}” (cell {index}, " if result.slowest_section else f"cell {index} ("
        out += [f"Slowest cell: {where}{as_duration(seconds)}).", ""]
    if result.error:
        where = f"cell {result.error_cell}" if result.error_cell is not None else ""
        if where and result.error_section:
            where += f" (section “{md_cell(result.error_section)}”)"
        out += [f"Error in {where + ': ' if where else ''}`{md_cell(result.error)}`", ""]
    if result.technique:  # the lesson's own line, as it gave it: the report adds no workload of its own
        out += [f"**Technique** (the lesson's headline): {md_cell(result.technique)}", ""]
    out += [f"*Note: {md_cell(note)}.*" if not note.endswith(".") else f"*Note: {md_cell(note)}*"
            for note in result.notes]
    if result.notes:
        out.append("")
    h = result.headline or {}
    configs = h.get("measured", [])
    if configs:
        base = configs[0]["total"]
        out += ["| configuration (the lesson's label) | " + " | ".join(LABELS[c] for c in CATEGORIES)
                + " | peak MiB | moment of the peak | vs first |",
                "|---|" + "---:|" * (len(CATEGORIES) + 1) + "---|---:|"]
        for row in configs:
            parts = row.get("parts") or {}
            cells = [as_mib(parts[c]) if c in parts else "" for c in CATEGORIES]
            ratio = f"{row['total'] / base:.2f}x" if base else ""
            out.append(f"| {md_cell(row['label'])} | " + " | ".join(cells) + f" | {as_mib(row['total'])} | "
                       f"{moment_words(row.get('moment')) or '—'} | {ratio} |")
        out.append("")
    predicted = h.get("predicted", [])
    if predicted:
        out += ["| predicted vs measured | predicted MiB | measured MiB | error % |", "|---|---:|---:|---:|"]
        out += [(f"| {md_cell(r['label'])} | {as_mib(r['predicted'])} | {as_mib(r['measured'])} | "
                 f"{_signed(error_percent(r))} |")
                for r in predicted]
        out.append("")
    for group, heading in (("quality", "value"), ("time", "seconds"), ("extra", "value")):
        rows = h.get(group, [])
        if rows:
            out += [f"| {group} | {heading} |", "|---|---:|"]
            out += [f"| {md_cell(r['label'])} | {r['value']:,.4g} |" for r in rows]
            out.append("")
    if f"memory-{result.lesson}" in plots:
        out += [f"![{result.name}: measured peak by category]({plots[f'memory-{result.lesson}']})", ""]
    if f"figure-{result.lesson}" in plots:
        section = f"“{md_cell(result.main_figure_section)}”, " if result.main_figure_section else ""
        out += [f"![{result.name}: the lesson's main figure]({plots[f'figure-{result.lesson}']})", "",
                f"*The lesson's main figure, as this run drew it ({section}cell {result.main_figure_cell}).*", ""]
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
    out += [f"Written {now}" + (f" by `{command}`" if command else "") + ".", "", "## Machine and model", ""]
    out += [f"- {md_cell(line)}" for line in machine] + [""]
    out += how_to_read()
    passed = sum(r.passed for r in results)
    total = sum(r.seconds for r in results)
    out += ["## Summary", "",
            "| lesson | result | run time | advertised | before → after (peak) | predicted vs measured |",
            "|---|---|---:|---:|---|---|"]
    for r in results:
        advertised = _minutes(r.advertised_minutes) if r.advertised_minutes else "—"
        out.append(f"| {r.name} | {_status(r)} | {_run_time(r)} | {advertised} | {_before_after(r)} | "
                   f"{_prediction_summary(r)} |")
    predictions = [error_percent(row) for r in results for row in (r.headline or {}).get("predicted", [])]
    slow = [r.lesson for r in results if r.slow]
    busy = [r.lesson for r in results if r.busy]
    out += ["", f"**Totals**: {passed} of {len(results)} lessons passed"
            + (f", {len(results) - passed} failed" if passed < len(results) else "")
            + f"; run time {as_duration(total)}"
            + (f" ({len(slow)} over {SLOW:g}× the advertised time: {', '.join(slow)})" if slow else "")
            + (f"; the machine was busy (load average above its {os.cpu_count()} cores) during "
               f"{', '.join(busy)}, which slows any lesson" if busy else "")
            + (f"; {sum(abs(e) <= 10 for e in predictions)} of {len(predictions)} predictions within ±10 % of the "
               f"measurement" if predictions else "") + ".", ""]
    for key, alt in (("savings", "each lesson's saving on its own baseline"), ("run-time", "run time per lesson"),
                     ("predictions", "predicted vs measured")):
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
            plots[f"memory-{r.lesson}"] = f"memory-{r.lesson}.png"
        if r.main_figure:
            _atomic_write(out_dir / f"main-figure-{r.lesson}.png", r.main_figure)
            plots[f"figure-{r.lesson}"] = f"main-figure-{r.lesson}.png"
    for key, plot in (("savings", plot_savings), ("run-time", plot_run_time),
                      ("predictions", plot_predictions)):
        name = "predicted-vs-measured.png" if key == "predictions" else f"{key}.png"
        if plot(results, out_dir / name):
            plots[key] = name
    partial = bool(pending) or interrupted is not None
    data = {"partial": partial, "pending": list(pending), "interrupted": interrupted, "machine": machine,
            "slow_factor": SLOW, "savings": savings(results), "lessons": [r.as_json() for r in results],
            "plots": plots}
    _atomic_write(out_dir / REPORT_JSON, json.dumps(data, indent=1).encode())
    path = out_dir / REPORT_MD
    _atomic_write(path, render(results, machine, plots, list(pending), interrupted, command).encode())
    return path


# --- progress on the console ---------------------------------------------------------------------------

class Progress:
    """What the report says on stderr while it runs: tqdm bars on a terminal; plain lines (a lesson's start, every
    minute or so its cells done, its result) when stderr is a file or a pipe, so a log holds no carriage returns."""

    def __init__(self, total: int, enabled: bool = True, stream=None, every: float = 60.0):
        self.stream = stream or sys.stderr
        self.total, self.every = total, every
        self.bars = enabled and self.stream.isatty()
        self.lines = enabled and not self.bars
        self.done = 0
        if self.bars:
            from tqdm import tqdm

            self.lesson_bar = tqdm(total=total, desc="lessons", unit="lesson", position=0, file=self.stream)
            self.cell_bar = tqdm(total=0, unit="cell", position=1, leave=False, file=self.stream)

    def say(self, line: str) -> None:
        if self.bars:
            self.lesson_bar.write(line, file=self.stream)
        elif self.lines:
            print(line, file=self.stream, flush=True)

    def start(self, name: str) -> None:
        self.name, self.said_at = name, time.monotonic()
        if self.bars:
            self.lesson_bar.set_postfix_str(name)
            self.cell_bar.reset(total=0)
            self.cell_bar.set_description(name[:32])
        if self.lines:  # a bar shows the lesson's name itself
            self.say(f"[{self.done + 1}/{self.total}] {name}: running")

    def cell(self, cell_run, done: int, total: int) -> None:
        """After every code cell (the runner's ``progress`` callback)."""
        if self.bars:
            if self.cell_bar.total != total:
                self.cell_bar.reset(total=total)
            self.cell_bar.update(done - self.cell_bar.n)
        elif self.lines and time.monotonic() - self.said_at >= self.every:
            self.said_at = time.monotonic()
            self.say(f"[{self.done + 1}/{self.total}] {self.name}: {done} of {total} code cells done")

    def finish(self, result: LessonResult) -> None:
        self.done += 1
        slow = f" (⚠️ {result.times_advertised:.1f}× advertised)" if result.slow else ""
        self.say(f"[{self.done}/{self.total}] {result.name}: {result.status} in {as_duration(result.seconds)}{slow}"
                 + (f" (cell {result.error_cell}: {result.error})" if result.error else ""))
        if self.bars:
            self.lesson_bar.update(1)

    def close(self) -> None:
        if self.bars:
            self.cell_bar.close()
            self.lesson_bar.close()


def quiet_libraries() -> None:
    """Silence what libraries print on import that says nothing about this machine: bitsandbytes warns that the
    optional ``kernels`` package is missing on CPUs with AVX512-BF16 (its 4-bit CPU path works without it)."""
    def not_kernels(record) -> bool:
        return "kernels-community" not in str(record.msg)

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(not_kernels)


def run(solutions_dir=None, lessons=(), out=DEFAULT_OUT, timeout: int = 900, progress: bool = True,
        command: str = "") -> list[LessonResult]:
    """Run the chosen lessons one by one, rewriting the report after each; return their results."""
    from helpers.tools.notebooks import _select

    solutions_dir = Path(solutions_dir or ROOT / "solutions")
    paths = _select(solutions_dir, list(lessons))
    if not paths:
        raise SystemExit(f"no solution notebooks in {solutions_dir}")
    quiet_libraries()
    machine = machine_lines()
    advertised = advertised_minutes()
    results: list[LessonResult] = []
    shown = Progress(len(paths), enabled=progress)
    try:
        for i, path in enumerate(paths):
            shown.start(path.stem)
            result = run_lesson(path, timeout=timeout, on_cell=shown.cell)
            result.advertised_minutes, result.load = advertised.get(result.lesson), load_average()
            results.append(result)
            shown.finish(result)
            write_report(out, results, machine, pending=[p.stem for p in paths[i + 1:]], command=command)
    except KeyboardInterrupt:
        done = {r.name for r in results}
        write_report(out, results, machine, pending=[p.stem for p in paths if p.stem not in done],
                     interrupted="interrupted", command=command)
        raise
    finally:
        shown.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.tools.course_report", description=__doc__.split("\n")[0])
    parser.add_argument("--lessons", nargs="*", default=[], metavar="NN",
                        help="lessons to run, e.g. 00 03 or 03_gradient_checkpointing (default: all)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default: 900)")
    parser.add_argument("--solutions", default=str(ROOT / "solutions"), help="folder of solution notebooks")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
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
