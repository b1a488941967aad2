"""Plots the lessons share: stacked bars of memory by category."""

from __future__ import annotations

from .memory import CATEGORIES, LABELS, MiB

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
