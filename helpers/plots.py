"""Plots the lessons share: stacked bars of memory by category, and a step's memory over time."""

from __future__ import annotations

from .constants import GiB, MiB
from .memory_report import CATEGORIES, LABELS

COLOURS = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "activations": "#C44E52"}


def stacked_bars(reports: dict, title: str = "", ax=None, unit: int = MiB, unit_name: str = "MiB"):
    """One bar per report (``{"label": MemoryReport}``), stacked by category, totals on top."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(2.2 + 1.6 * len(reports), 3.8))
    labels = list(reports)
    bottoms = [0.0] * len(labels)
    for c in CATEGORIES:
        values = [getattr(reports[k], c) / unit for k in labels]
        ax.bar(labels, values, bottom=bottoms, color=COLOURS[c], label=LABELS[c], width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=False)]
    for x, total in enumerate(bottoms):
        ax.text(x, total, f"{total:,.0f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(unit_name)
    ax.set_title(title)
    ax.set_ylim(0, max(bottoms) * 1.12 if bottoms else 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.tick_params(axis="x", labelsize=9)
    ax.figure.tight_layout()
    return ax


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
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    ax.figure.tight_layout()
    return ax


# GPU budget lines, one colour per GPU in a chart: none of them is a category colour (COLOURS).
BUDGET_COLOURS = ("#222222", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")


def plan_bars(plans: dict, ax=None, title: str = ""):
    """Stacked bars by category for ``{"label": helpers.planner.Plan}``. Over each bar, its GPU's budget as a
    dashed line in that GPU's own colour, labelled in place ("T4: 13.4 GiB usable"); a peak's value label moves
    above the line's label rather than touch it. The category legend sits below the plot, in two rows."""
    from matplotlib.transforms import ScaledTranslation

    ax = stacked_bars({k: p.report for k, p in plans.items()}, title=title, ax=ax, unit=GiB, unit_name="GiB")
    fig, plans = ax.figure, list(plans.values())
    values = ax.texts[-len(plans):]  # stacked_bars' totals, in whole units: too coarse here
    below = ax.transAxes + ScaledTranslation(0, -24 / 72, fig.dpi_scale_trans)  # under the bar names
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=2, frameon=False,
              fontsize=8, handlelength=1.2, columnspacing=1.2)
    fig.tight_layout()
    colours = {gpu: BUDGET_COLOURS[i % len(BUDGET_COLOURS)]
               for i, gpu in enumerate(dict.fromkeys(p.gpu for p in plans))}
    peaks, budgets = [p.peak / GiB for p in plans], [p.gpu.budget / GiB for p in plans]
    height_pt = ax.get_position().height * fig.get_figheight() * 72
    top = max(peaks + budgets) * 1.1
    for _ in range(4):  # a line of text is a fixed height in points: its height in GiB depends on the top
        h = top * 14 / height_pt  # one 8-9 pt line, 2 pt above its line, with a little air
        at = [b + h if peak + h > b - 0.2 * h and peak < b + 1.2 * h else peak  # clear of the line's label
              for peak, b in zip(peaks, budgets, strict=True)]
        top = max([top] + [a + 1.3 * h for a in at] + [b + 1.3 * h for b in budgets])
    ax.set_ylim(0, top)
    for x, (p, value, peak, budget, y) in enumerate(zip(plans, values, peaks, budgets, at, strict=True)):
        value.set_text(f"{peak:,.1f}")
        value.set_position((x, y))
        colour = colours[p.gpu]
        ax.plot([x - 0.45, x + 0.45], [budget, budget], color=colour, linestyle="--", linewidth=2, zorder=3)
        ax.annotate(f"{p.gpu.name}: {budget:,.1f} GiB usable", (x, budget), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8, color=colour, zorder=4,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": colour, "lw": 0.6, "alpha": 0.9})
    return ax


# --- the course report's plots (helpers.tools.course_report): plain data in, a matplotlib Figure out ---------------

def _figure(size):
    from matplotlib.figure import Figure  # no pyplot: the report draws without a GUI or global state

    return Figure(figsize=size)


def measured_bars(parts_by_label: dict, title: str = "", ax=None):
    """Stacked bars by category from plain data, ``{"label": {"weights": bytes, ...}}``; returns the axes."""
    from .memory_report import MemoryReport

    bars = {(label if len(label) <= 18 else label.replace(", ", ",\n", 1)): MemoryReport(**parts)
            for label, parts in parts_by_label.items()}
    if ax is None:
        ax = _figure((2.6 + 1.7 * len(bars), 4.0)).subplots()
    return stacked_bars(bars, title=title, ax=ax)


def prediction_errors(rows: list, fig=None):
    """Predicted against measured: ``[(label, predicted bytes, measured bytes), ...]``, both totals side by side and
    the error in percent; returns the figure."""
    fig = fig or _figure((11, 1.4 + 0.3 * len(rows)))
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))[::-1]
    errors = [100 * (p - m) / m if m else 0.0 for _, p, m in rows]
    left.barh([v + 0.2 for v in y], [m / MiB for _, _, m in rows], height=0.4, color="#4C72B0", label="measured")
    left.barh([v - 0.2 for v in y], [p / MiB for _, p, _ in rows], height=0.4, color="#AAAAAA", label="predicted")
    left.set_xlim(0, 1.3 * max(max(p, m) for _, p, m in rows) / MiB)  # room for the legend
    left.set_yticks(y, [label for label, _, _ in rows], fontsize=8)
    left.set_xlabel("peak MiB")
    left.set_title("Predicted and measured")
    left.legend(frameon=False, fontsize=8, loc="lower right")
    limit = max(12.0, 1.25 * max(abs(e) for e in errors))
    right.axvspan(-10, 10, color="#EEEEEE", label="within ±10 %")
    right.axvline(0, color="black", lw=0.8)
    right.scatter(errors, y, color=["#4C72B0" if abs(e) <= 10 else "#C44E52" for e in errors], zorder=3)
    for e, v in zip(errors, y, strict=True):
        right.annotate(f"{e:+.2f} %", (e, v), textcoords="offset points", xytext=(6, 3), fontsize=8)
    right.set_xlim(-limit, limit)
    right.set_xlabel("error %, (predicted - measured) / measured")
    right.set_title("Error of the prediction")
    right.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def run_times(rows: list, ax=None):
    """Minutes per lesson, ``[(name, seconds, passed), ...]``, failed ones in red; returns the axes."""
    def said(s):
        return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(round(s % 60)):02d} s"

    if ax is None:
        ax = _figure((8, 1.2 + 0.35 * len(rows))).subplots()
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [s / 60 for _, s, _ in rows], color=["#55A868" if ok else "#C44E52" for _, _, ok in rows])
    for yy, (_, s, ok) in zip(y, rows, strict=True):
        ax.text(s / 60, yy, f" {said(s)}" + ("" if ok else " (failed)"), va="center", fontsize=8)
    ax.set_yticks(y, [name for name, _, _ in rows], fontsize=8)
    ax.set_xlabel("minutes on this machine")
    ax.set_title("Run time per lesson")
    ax.set_xlim(0, max(s for _, s, _ in rows) / 60 * 1.3 or 1)
    ax.figure.tight_layout()
    return ax
