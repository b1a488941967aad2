"""Plots the lessons share: stacked bars of memory by category, and a step's memory over time."""

from __future__ import annotations

import textwrap

from .constants import GiB, MiB
from .memory_report import CATEGORIES, LABELS, moment_words

COLOURS = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "activations": "#C44E52"}


def stacked_bars(reports: dict, title: str = "", ax=None, unit: int = MiB, unit_name: str = "MiB",
                 legend: bool = True):
    """One bar per report (``{"label": MemoryReport}``), stacked by category, its total on top and, under the total,
    the moment of its peak when the report knows it ("peak: start of backward"): the categories are those alive at that
    moment, so a training step's bar can show no gradients at all. The category legend sits under the plot
    (``legend=False``: none, for a caller that draws its own with more entries)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(2.2 + 1.6 * len(reports), 4.2))
    labels = list(reports)
    bottoms = [0.0] * len(labels)
    for c in CATEGORIES:
        values = [getattr(reports[k], c) / unit for k in labels]
        ax.bar(labels, values, bottom=bottoms, color=COLOURS[c], label=LABELS[c], width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=False)]
    # "peak: start of backward (accumulating)" over two lines, so that it stays about as wide as its bar
    moments = [textwrap.fill(f"peak: {words}", 24) if (words := moment_words(getattr(reports[k], "moment", None)))
               else "" for k in labels]
    readable = {"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.85}  # over any line
    for x, (total, moment) in enumerate(zip(bottoms, moments, strict=True)):
        ax.annotate(f"{total:,.0f}", (x, total), xytext=(0, 2 + 9 * (moment.count("\n") + 1) if moment else 1),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9, gid="total",
                    bbox=readable)
        if moment:
            ax.annotate(moment, (x, total), xytext=(0, 1), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7.5, color="#555555", style="italic", gid="moment", bbox=readable)
    ax.set_ylabel(unit_name)
    ax.set_title(title)
    ax.set_ylim(0, max(bottoms) * (1.25 if any(moments) else 1.12) if bottoms else 1)
    ax.tick_params(axis="x", labelsize=9)
    if legend:
        legend_below(ax)
    ax.figure.tight_layout()
    return ax


def legend_below(ax, ncol: int = 4, **options):
    """The legend under the plot and its axis labels, in ``ncol`` columns, so that it takes no width from the plot."""
    from matplotlib.transforms import ScaledTranslation

    fig = ax.figure
    lines = max((str(t.get_text()).count("\n") + 1 for t in ax.get_xticklabels()), default=1)
    below = ax.transAxes + ScaledTranslation(0, -(12 + 11 * lines + (12 if ax.get_xlabel() else 0)) / 72,
                                             fig.dpi_scale_trans)
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=ncol, frameon=False,
                     fontsize=8, handlelength=1.2, columnspacing=1.2, **options)


PHASE_SHADES = ("#f2f2f2", "#ffffff")  # alternate phases on a light background, so the categories keep their colours


def timeline(report, title: str = "", ax=None, unit: int = MiB, unit_name: str = "MiB", window=None, bottom=0.0):
    """Live bytes by category over one measured block (``measure(..., timeline=True)``), stacked, with the phases
    shaded and named along the top and the peak marked. ``report`` is a ``MemoryReport`` or its ``Timeline``.
    The x axis counts allocations and frees, not seconds: each step of it is one tensor made or freed.
    ``window=(first, last)`` zooms on those events; ``bottom`` (in ``unit``) starts the y axis above 0."""
    import matplotlib.pyplot as plt

    tl = getattr(report, "timeline", report)
    if tl is None:
        raise ValueError("this report has no timeline: measure it with measure(..., timeline=True)")
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 3.6))
    x = range(tl.events)
    ax.stackplot(x, *[[b / unit for b in tl.bytes[c]] for c in CATEGORIES],
                 colors=[COLOURS[c] for c in CATEGORIES], labels=[LABELS[c] for c in CATEGORIES], linewidth=0)
    top = max(tl.total(i) for i in x) / unit
    # Room above the highest point for the phase names; axes that share y with other timelines keep the tallest.
    low, high = ax.get_ylim()
    ax.set_ylim(bottom, max(bottom + (top - bottom) * 1.22, high if ax.has_data() and high > 1 else 0))
    names_at = ax.get_xaxis_transform()  # x in events, y as a fraction of the axes' height
    start, end = window or (0, max(tl.events - 1, 1))
    named = 0
    for k, (first, last, name) in enumerate(tl.phases):
        ax.axvspan(first - 0.5, last + 0.5, color=PHASE_SHADES[k % 2], zorder=0)
        first, last = max(first, start), min(last, end)  # the part in view
        if last - first >= 0.06 * (end - start):  # name the spans wide enough to hold a label
            at_end = last >= end
            row = 0.97 - 0.07 * (named % 2) if len(tl.phases) > 4 else 0.97  # many phases: two rows, no overlap
            ax.text(last if at_end else (first + last) / 2, row, name, ha="right" if at_end else "center",
                    va="top", fontsize=8, transform=names_at)
            named += 1
    peak = tl.peak_event
    ax.axvline(peak, color="black", linestyle="--", linewidth=1)
    right_half = peak > (start + end) / 2  # write the label on the side with room
    ax.annotate(f"peak {tl.total(peak) / unit:,.1f} {unit_name}\n({tl.phase_of(peak)})", (peak, tl.total(peak) / unit),
                xytext=(-6 if right_half else 6, -4), textcoords="offset points", fontsize=8, va="top",
                ha="right" if right_half else "left")
    ax.set_xlim(start, end)
    ax.set_xlabel("allocations and frees, in order")
    ax.set_ylabel(unit_name)
    ax.set_title(title)
    legend_below(ax)
    ax.figure.tight_layout()
    return ax


# GPU budget lines, one colour per GPU in a chart: none of them is a category colour (COLOURS).
BUDGET_COLOURS = ("#222222", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")


def plan_bars(plans: dict, ax=None, title: str = ""):
    """Stacked bars by category for ``{"label": helpers.planner.Plan}``. Over each bar, its GPU's budget as a
    dashed line in that GPU's own colour, labelled in place ("T4: 13.4 GiB usable"); a peak's value label moves
    above the line's label rather than touch it. The category legend sits below the plot, in two rows."""
    ax = stacked_bars({k: p.report for k, p in plans.items()}, title=title, ax=ax, unit=GiB, unit_name="GiB",
                      legend=False)
    fig, plans = ax.figure, list(plans.values())
    legend_below(ax, ncol=2)
    fig.tight_layout()
    values = [t for t in ax.texts if t.get_gid() == "total"]  # stacked_bars' totals, in whole units: too coarse here
    moments = {round(t.xy[0]): t for t in ax.texts if t.get_gid() == "moment"}
    colours = {gpu: BUDGET_COLOURS[i % len(BUDGET_COLOURS)]
               for i, gpu in enumerate(dict.fromkeys(p.gpu for p in plans))}
    peaks, budgets = [p.peak / GiB for p in plans], [p.gpu.budget / GiB for p in plans]
    height_pt = ax.get_position().height * fig.get_figheight() * 72
    top = max(peaks + budgets) * 1.1
    for _ in range(4):  # a line of text is a fixed height in points: its height in GiB depends on the top
        h = top * 14 / height_pt  # one 8-9 pt line, 2 pt above its line, with a little air
        tall = [h * (2 + moments[x].get_text().count("\n") if x in moments else 1)  # the value, the moment's lines
                for x in range(len(plans))]
        at = [b + h if peak + t > b - 0.2 * h and peak < b + 1.2 * h else peak  # clear of the line's label
              for peak, b, t in zip(peaks, budgets, tall, strict=True)]
        top = max([top] + [a + t + 0.3 * h for a, t in zip(at, tall, strict=True)] + [b + 1.3 * h for b in budgets])
    ax.set_ylim(0, top)
    for x, (p, value, peak, budget, y) in enumerate(zip(plans, values, peaks, budgets, at, strict=True)):
        value.set_text(f"{peak:,.1f}")
        value.xy = (x, y)
        if x in moments:
            moments[x].xy = (x, y)
        colour = colours[p.gpu]
        ax.plot([x - 0.45, x + 0.45], [budget, budget], color=colour, linestyle="--", linewidth=2, zorder=3)
        ax.annotate(f"{p.gpu.name}: {budget:,.1f} GiB usable", (x, budget), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8, color=colour, zorder=4,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": colour, "lw": 0.6, "alpha": 0.9})
    return ax


# --- the course report's plots (helpers.tools.course_report): plain data in, a matplotlib Figure out ---------------

# The report's own colours: greys and one accent, none of them a category colour (COLOURS) nor a GPU's (BUDGET_COLOURS),
# so that in the report a colour means a memory category only where it shows one.
REPORT_COLOURS = {"measured": "#4D4D4D", "predicted": "#BDBDBD", "bar": "#9E9E9E", "flag": "#7B3294",
                  "band": "#EEEEEE", "line": "#000000"}
LABEL_CHARS = 22  # a bar's label wraps at word boundaries to lines of about this many characters
TOGETHER = r"(?<=\w) (x|×|=) (?=\w)"  # "2 x 128", "K = 6": one unit, never split over lines


def _figure(size):
    from matplotlib.figure import Figure  # no pyplot: the report draws without a GUI or global state

    return Figure(figsize=size)


def wrap_label(label: str, width: int = LABEL_CHARS) -> str:
    """A label over lines of about ``width`` characters, broken between words (a long word stays whole)."""
    import re

    joined = re.sub(TOGETHER, "\u00a0\\1\u00a0", label)  # textwrap breaks at ASCII spaces only, not at these
    lines = textwrap.wrap(joined, width, break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines).replace("\u00a0", " ") or label


def measured_bars(parts_by_label: dict, title: str = "", ax=None, moments: dict | None = None):
    """Stacked bars by category from plain data, ``{"label": {"weights": bytes, ...}}``, under each bar its label as
    given, wrapped over lines; ``moments``: label -> the moment of that peak ("backward start"), written over its
    bar. The figure widens with the number of bars and the length of their labels; only past 14 inches do the labels
    turn. Returns the axes."""
    from .memory_report import MemoryReport

    moments = moments or {}
    bars = {wrap_label(label): MemoryReport(**parts, moment=moments.get(label))
            for label, parts in parts_by_label.items()}
    longest = max((len(line) for label in bars for line in label.split("\n")), default=0)
    per_bar = max(1.7, 0.075 * longest + 0.4)  # inches: the widest line of a label at 9 pt, or the moment's words
    width = max(5.0, 1.2 + per_bar * len(bars))
    turn = width > 14
    if ax is None:
        lines = max((label.count("\n") + 1 for label in bars), default=1)
        ax = _figure((min(width, 14), 3.9 + 0.15 * lines)).subplots()
    stacked_bars(bars, title=title, ax=ax, legend=False)
    ax.set_ylabel("MiB at the peak")
    if turn:
        ax.tick_params(axis="x", labelrotation=30)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    legend_below(ax, ncol=4 if min(width, 14) >= 6 else 2)
    ax.figure.tight_layout()
    return ax


def prediction_errors(rows: list, fig=None):
    """Predicted against measured: ``[(label, predicted bytes, measured bytes), ...]``, both totals side by side and
    the error in percent, (predicted - measured) / measured: positive when the prediction is above the measurement.
    Returns the figure."""
    c = REPORT_COLOURS
    fig = fig or _figure((11, 1.9 + 0.3 * len(rows)))
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))[::-1]
    errors = [100 * (p - m) / m if m else 0.0 for _, p, m in rows]
    left.barh([v + 0.2 for v in y], [m / MiB for _, _, m in rows], height=0.4, color=c["measured"], label="measured")
    left.barh([v - 0.2 for v in y], [p / MiB for _, p, _ in rows], height=0.4, color=c["predicted"],
              label="predicted")
    left.set_xlim(0, 1.05 * max(max(p, m) for _, p, m in rows) / MiB)
    left.set_yticks(y, [label for label, _, _ in rows], fontsize=8)
    left.set_xlabel("peak MiB")
    left.set_title("Predicted and measured")
    limit = max(12.0, 1.3 * max(abs(e) for e in errors))
    right.axvspan(-10, 10, color=c["band"], label="within ±10 %")
    right.axvline(0, color=c["line"], lw=0.8)
    inside = [abs(e) <= 10 for e in errors]
    for keep, marker, colour, name in ((True, "o", c["measured"], "error within ±10 %"),
                                       (False, "D", c["flag"], "error outside ±10 %")):
        points = [(e, v) for e, v, ok in zip(errors, y, inside, strict=True) if ok == keep]
        if points:
            right.scatter(*zip(*points, strict=True), color=colour, marker=marker, zorder=3, label=name)
    for e, v in zip(errors, y, strict=True):
        right.annotate(f"{round(e, 2) + 0.0:+.2f} %", (e, v), textcoords="offset points", xytext=(6, 3), fontsize=8)
    right.set_xlim(-limit, limit)
    right.set_xlabel("error % = (predicted − measured) / measured")
    right.set_title("Error (+: prediction above measurement)")
    for ax in (left, right):
        legend_below(ax, ncol=3)
    fig.tight_layout()
    return fig


def run_times(rows: list, ax=None, slow: float = 1.5):
    """Minutes per lesson beside the minutes the course map advertises: ``[(name, seconds, passed, advertised
    minutes or None), ...]`` (the fourth item may be left out). A lesson over ``slow`` times its advertised minutes is
    drawn in the accent colour, a failed one hatched; the advertised time is a black tick. Returns the axes."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .headline import as_duration

    c = REPORT_COLOURS
    rows = [(*row, None)[:4] for row in rows]
    if ax is None:
        ax = _figure((8.5, 1.9 + 0.35 * len(rows))).subplots()
    y = list(range(len(rows)))[::-1]
    over = [bool(adv) and s / 60 > slow * adv for _, s, _, adv in rows]
    ax.barh(y, [s / 60 for _, s, _, _ in rows], color=[c["flag"] if o else c["bar"] for o in over],
            hatch=[None if ok else "//" for _, _, ok, _ in rows], edgecolor="white")
    advertised = [(adv, yy) for (_, _, _, adv), yy in zip(rows, y, strict=True) if adv]
    if advertised:
        ax.scatter(*zip(*advertised, strict=True), marker="|", s=300, linewidths=2, color=c["line"], zorder=3)
    for yy, (_, s, ok, adv), o in zip(y, rows, over, strict=True):
        note = f" ({s / 60 / adv:.1f}× advertised)" if o else ""
        ax.text(max(s / 60, adv or 0), yy, f"  {as_duration(s)}{note}" + ("" if ok else " (failed)"), va="center",
                fontsize=8)
    ax.set_yticks(y, [name for name, _, _, _ in rows], fontsize=8)
    ax.set_xlabel("minutes on this machine")
    ax.set_title("Run time per lesson, against the course map's advertised minutes")
    ax.set_xlim(0, max(max(s / 60, adv or 0) for _, s, _, adv in rows) * 1.45 or 1)
    handles = ([Patch(color=c["bar"], label="run time")] * (not all(over))  # only what the chart shows
               + [Patch(color=c["flag"], label=f"over {slow:g}× the advertised time")] * any(over))
    if advertised:
        handles.append(Line2D([], [], marker="|", markersize=12, markeredgewidth=2, linestyle="", color=c["line"],
                              label="advertised (README course map, 2-core CPU)"))
    if not all(ok for _, _, ok, _ in rows):
        handles.append(Patch(facecolor=c["bar"], hatch="//", edgecolor="white", label="failed"))
    legend_below(ax, ncol=len(handles), handles=handles)
    ax.figure.tight_layout()
    return ax


def saving_bars(rows: list, ax=None):
    """Every lesson's saving on one scale: ``[(label, before bytes, after bytes), ...]``, one bar per lesson, its
    last measured configuration's peak ("after") as a percentage of its first ("before", its own baseline = 100 %),
    labelled with both peaks in MiB. Returns the axes."""
    from .headline import as_mib

    c = REPORT_COLOURS
    labels = [wrap_label(label, 44) for label, _, _ in rows]
    lines = sum(label.count("\n") + 1 for label in labels)
    if ax is None:
        ax = _figure((10, 1.9 + 0.2 * lines + 0.2 * len(rows))).subplots()
    y = list(range(len(rows)))[::-1]
    percent = [100 * after / before if before else 0.0 for _, before, after in rows]
    ax.barh(y, percent, color=c["bar"], height=0.6)
    ax.axvline(100, color=c["line"], lw=1, linestyle="--")
    ax.text(100, 1.0, " baseline = 100 %", transform=ax.get_xaxis_transform(), fontsize=8, va="bottom")
    for yy, p, (_, before, after) in zip(y, percent, rows, strict=True):
        above = ", more than before" if p > 100.5 else ""
        ax.text(max(p, 100), yy, f"  {p:.0f} %: {as_mib(before)} → {as_mib(after)} MiB{above}", va="center",
                fontsize=8)  # after the bar, or after the baseline's line when the bar is shorter
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, max(percent + [100]) * 1.8)  # room for the words after the longest bar
    ax.set_xlabel("peak of the lesson's last measured configuration (after), as % of its first "
                  "(before: its baseline = 100 %)")
    ax.set_title("Each lesson's saving on its own baseline: after as % of before (100 % = no saving)", pad=14)
    ax.figure.tight_layout()
    return ax
