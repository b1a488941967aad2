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


def plan_bars(plans: dict, ax=None, title: str = ""):
    """Stacked bars by category for ``{"label": helpers.planner.Plan}``, with each GPU's budget as a line."""
    ax = stacked_bars({k: p.report for k, p in plans.items()}, title=title, ax=ax, unit=GiB, unit_name="GiB")
    for text, p in zip(ax.texts, plans.values(), strict=False):  # stacked_bars writes whole units: too coarse here
        text.set_text(f"{p.peak / GiB:,.1f}")
    for gpu in dict.fromkeys(p.gpu for p in plans.values()):
        ax.axhline(gpu.budget / GiB, color="black", linestyle="--", linewidth=1, label=f"{gpu.name} budget")
    top = max(max(p.peak, p.gpu.budget) for p in plans.values())
    ax.set_ylim(0, top / GiB * 1.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.figure.tight_layout()
    return ax
