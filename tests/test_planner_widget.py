"""The planner's chart (helpers.plots.plan_bars) and the widget's layout, without a browser (tests/test_browser.py
runs the widget in JupyterLab): each GPU's budget line in its own colour, never a category's, over its own bar
and labelled there; value labels clear of the lines; the legend under the plot; short descriptions, tooltips,
controls in a wrapping grid."""

from __future__ import annotations

import re

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from helpers.constants import GiB  # noqa: E402
from helpers.planner import cheapest_fit, plan  # noqa: E402
from helpers.plots import BUDGET_COLOURS, COLOURS, plan_bars  # noqa: E402

VALUE = re.compile(r"^[\d,]+\.\d$")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _lesson_12():
    """The lesson's example: full fine-tuning on an A100 80GB, the cheapest fit on a T4."""
    return {"full, A100 80GB": plan("llama-3-8b", "A100 80GB", batch_size=8, seq_len=1024),
            "cheapest on a T4": cheapest_fit("llama-3-8b", "T4", batch_size=8, seq_len=1024)}


def _close_to_the_line():
    """A peak just under its budget (18.7 of 20.1 GiB), with the same GPU twice: the widget's start."""
    return {"your recipe": plan("qwen2.5-7b", "L4", batch_size=4, seq_len=2048),
            "cheapest fit": cheapest_fit("qwen2.5-7b", "L4", batch_size=4, seq_len=2048)}


def _parts(ax):
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    values = [t for t in ax.texts if VALUE.match(t.get_text())]
    labels = [t for t in ax.texts if t.get_text().endswith("GiB usable")]
    lines = ax.lines  # one dashed budget line per bar
    return renderer, values, labels, lines


def test_the_budget_colours_are_not_category_colours():
    categories = {to_hex(c) for c in COLOURS.values()}
    assert not categories & {to_hex(c) for c in BUDGET_COLOURS}
    assert len(set(BUDGET_COLOURS)) == len(BUDGET_COLOURS)


@pytest.mark.parametrize("plans", [_lesson_12, _close_to_the_line], ids=["lesson 12", "close to the line"])
def test_each_bar_has_its_budget_line_labelled_in_place(plans):
    plans = plans()
    ax = plan_bars(plans, title="t")
    renderer, values, labels, lines = _parts(ax)
    assert len(values) == len(labels) == len(lines) == len(plans)
    for x, (p, value, label, line) in enumerate(zip(plans.values(), values, labels, lines, strict=True)):
        (x0, x1), (y0, y1) = line.get_xdata(), line.get_ydata()
        assert y0 == y1 == pytest.approx(p.gpu.budget / GiB) and x0 < x < x1 and x1 - x0 < 1  # over its own bar
        assert label.get_text() == f"{p.gpu.name}: {p.gpu.budget / GiB:,.1f} GiB usable"
        assert to_hex(line.get_color()) == to_hex(label.get_color())
        assert to_hex(label.get_color()) not in {to_hex(c) for c in COLOURS.values()}
        assert value.get_text() == f"{p.peak / GiB:,.1f}"
        # The value label touches neither the line nor the line's label.
        box = value.get_window_extent(renderer)
        line_y = ax.transData.transform((x, p.gpu.budget / GiB))[1]
        assert not box.y0 <= line_y <= box.y1, (value.get_text(), label.get_text())
        assert not any(box.overlaps(other.get_window_extent(renderer)) for other in labels)
        assert box.y1 <= ax.get_window_extent(renderer).y1  # inside the plot


def test_one_colour_per_gpu_and_the_legend_under_the_plot():
    plans = {"T4": plan("smollm2-135m", "T4", batch_size=8, seq_len=512),
             "L4": plan("smollm2-135m", "L4", batch_size=8, seq_len=512),
             "T4 again": plan("smollm2-135m", "T4", batch_size=4, seq_len=512)}
    ax = plan_bars(plans)
    renderer, _, labels, lines = _parts(ax)
    colours = [to_hex(line.get_color()) for line in lines]
    assert colours[0] == colours[2] != colours[1]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["weights", "gradients", "optimizer state",
                                                          "activations and temporaries"]
    below = legend.get_window_extent(renderer)
    assert below.y1 < ax.get_window_extent(renderer).y0  # under the plot, not beside it
    assert below.x1 <= ax.figure.bbox.x1 and below.x0 >= 0  # inside the figure


def test_the_widget_lays_its_controls_out_in_a_grid_with_short_descriptions():
    ipywidgets = pytest.importorskip("ipywidgets")
    from helpers.planner_widget import PlannerApp

    app = PlannerApp(model="qwen2.5-7b", gpu="L4", batch_size=4, seq_len=2048)
    grid, switches, results = app.widget.children
    assert isinstance(grid, ipywidgets.GridBox) and "auto-fill" in grid.layout.grid_template_columns
    assert switches.layout.flex_flow == results.layout.flex_flow == "row wrap"
    for name, control in app.controls.items():
        assert control.tooltip, name  # the long explanation, on hover
        assert len(control.description) <= 22, (name, control.description)  # none cut at 220 pixels
    assert app.chart.layout.max_width == "100%"
    width, height = _png_size(app.chart.value)
    assert 450 <= width <= 560 and height <= 400  # beside the verdict in a 1,000-pixel notebook
    assert "on <b>L4" in app.verdict.value and "batch 4 " in app.verdict.value


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
