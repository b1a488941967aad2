"""helpers.headline: a lesson states its own headline, and every solution notebook ends with one.

The call runs for real in every solution notebook (nbval) and in tests/test_report.py (a synthetic lesson read
back by the course report); here: the checks of its arguments, what it emits, and its place in each lesson.
"""

import json

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from helpers import headline as hl
from helpers.constants import LESSON_PATTERN, ROOT, MiB
from helpers.memory_report import MemoryReport

SOLUTIONS = sorted((ROOT / "solutions").glob(LESSON_PATTERN))


def good(**changes):
    args = dict(measured={"fp32": MemoryReport(weights=4 * MiB, activations=MiB), "int8": {"weights": MiB},
                          "total only": 3 * MiB},
                predicted={"int8": (np.float64(1.1 * MiB), {"weights": MiB})},
                quality={"perplexity": 12.5}, time={"s per step": 0.5}, extra={"ratio (x)": np.int64(4)})
    return hl.build("a technique", **{**args, **changes})


def test_the_data_a_headline_carries():
    data = good()
    assert data["technique"] == "a technique" and data["version"] == hl.VERSION
    assert data["measured"] == [
        {"label": "fp32", "total": 5 * MiB, "parts": {"weights": 4 * MiB, "gradients": 0, "optimizer": 0,
                                                      "activations": MiB}},
        {"label": "int8", "total": MiB, "parts": {"weights": MiB, "gradients": 0, "optimizer": 0, "activations": 0}},
        {"label": "total only", "total": 3 * MiB, "parts": None}]
    assert data["predicted"] == [{"label": "int8", "predicted": 1.1 * MiB, "measured": MiB}]
    assert abs(hl.error_percent(data["predicted"][0]) - 10) < 1e-9
    assert [data[g][0]["value"] for g in ("quality", "time", "extra")] == [12.5, 0.5, 4.0]
    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert "| int8 | 1.1 | 1.0 | +10.0 |" in hl.markdown(data)
    assert "measured  fp32: peak 5.0 MiB (weights 4.0, activations and temporaries 1.0)" in hl.text(data)


@pytest.mark.parametrize("changes, error, message", [
    ({"measured": {"fp32": "5 MiB"}}, TypeError, "headline(measured=...)['fp32']: a str is not memory"),
    ({"measured": {"fp32": {"weight": 1}}}, ValueError, "takes the keys weights, gradients"),
    ({"measured": {"fp32": -1}}, ValueError, "at least 0"),
    ({"measured": [("fp32", 1)]}, TypeError, "headline(measured=...): expected a dict of label -> value"),
    ({"measured": {"": 1}}, TypeError, "every label is a non-empty string"),
    ({"predicted": {"int8": MiB}}, TypeError, "expected a pair (predicted, measured)"),
    ({"predicted": {"int8": ("1 GB", MiB)}}, TypeError, "['int8'][0] (predicted): a str is not memory"),
    ({"quality": {"perplexity": float("nan")}}, ValueError, "a finite number"),
    ({"quality": {"perplexity": True}}, TypeError, "expected a number, got bool"),
    ({"time": {"s": -0.1}}, ValueError, "headline(time=...)['s']: expected a number of at least 0"),
    ({"measured": None, "predicted": None}, ValueError, "say at least what the lesson measured"),
])
def test_a_bad_argument_is_named_in_the_error(changes, error, message):
    with pytest.raises(error) as raised:
        good(**changes)
    assert message in str(raised.value)


def test_the_technique_is_a_line_of_text():
    with pytest.raises(TypeError, match="says in one line what the lesson does"):
        hl.build("", measured={"a": 1})


def test_outside_a_notebook_it_prints_the_summary(capsys):
    assert hl.headline("t", measured={"a": MiB}) is None
    assert capsys.readouterr().out.startswith("Headline: t\n  measured  a: peak 1.0 MiB")


def test_it_is_read_back_from_an_executed_notebooks_outputs():
    data = good()
    cell = new_code_cell("headline(...)")
    cell.outputs = [new_output("stream", name="stdout", text="x"),
                    new_output("display_data", data={hl.MIMETYPE: data, "text/plain": hl.text(data)})]
    nb = new_notebook(cells=[new_markdown_cell("# x"), new_code_cell("1"), cell])
    assert hl.read(nb) == data and hl.read_all(nb) == [data]
    assert hl.read(new_notebook(cells=[new_code_cell("1")])) is None


def lesson(*sources):
    return new_notebook(cells=[new_code_cell(s) for s in sources])


IMPORT = "from helpers.headline import headline\n"


def test_the_source_check_wants_one_call_at_the_end_over_the_lessons_own_objects():
    right = IMPORT + ('headline("t", measured={"a": report, "b": results["x"]["bytes"]}, '
                      'predicted={"a": (predict(dims, recipe), report)}, time={"s": times[None]["median"]}, '
                      'extra={"MiB": keep[1].activations / MiB})')
    assert hl.source_problems(lesson("report = 1", right)) == []
    assert hl.source_problems(lesson("x = 1")) == ["0 headline(...) calls; a lesson ends with exactly one"]
    assert hl.source_problems(lesson(right, "x = 1")) == ["the headline(...) call is not in the last code cell"]
    assert hl.source_problems(lesson(right, right))[0].startswith("2 headline(...) calls")
    literal = IMPORT + 'headline("t", measured={"a": 512 * 2**20}, quality={"ppl": 12.5}, time={"s": float(3)})'
    assert hl.source_problems(lesson(literal)) == [
        "measured['a']: 512 * 2 ** 20 is not one of the lesson's own objects",
        "quality['ppl']: 12.5 is not one of the lesson's own objects",
        "time['s']: float(3) is not one of the lesson's own objects"]
    odd = 'headline(name, measured=reports, predicted={"a": report}, **more)'
    assert hl.source_problems(lesson(odd)) == [
        "the headline cell does not import it (from helpers.headline import headline)",
        "the first argument is not the technique, a string", "unknown or ** arguments: ['None']",
        "measured= is not a dict written in the call ({'label': value, ...})",
        "predicted['a']: expected a pair (predicted, measured)"]


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_every_lesson_ends_with_its_own_headline(path):
    """The last code cell of every solution: ``headline(...)`` over the lesson's own measured and predicted objects."""
    assert hl.source_problems(nbformat.read(path, as_version=4)) == []


def test_a_value_not_measured_in_this_run_is_named_not_shown():
    # Lesson 12's third tier is an exercise: before the learner does it, its values are None.
    data = hl.build("x", measured={"before": 3 * MiB, "after": None}, predicted={"after": (2 * MiB, None)},
                          quality={"after": None}, extra={"ratio": 2.0})
    assert [r["label"] for r in data["measured"]] == ["before"] and data["predicted"] == []
    assert data["not_measured"] == ["after"] and data["extra"][0]["value"] == 2.0
    assert "Not measured in this run: after." in hl.markdown(data)


def test_a_reports_moment_of_the_peak_goes_into_the_headline():
    step = MemoryReport(weights=4 * MiB, optimizer=8 * MiB, activations=2 * MiB, moment="backward start")
    data = hl.build("t", measured={"inference": MemoryReport(weights=4 * MiB), "step": step, "dict": {"weights": 1},
                                   "number": MiB})
    assert [r.get("moment") for r in data["measured"]] == [None, "backward start", None, None]
    assert "moment" not in data["measured"][0]  # only a report that knows its moment carries one
    assert "| measured | peak MiB | moment of the peak | vs first |" in hl.markdown(data)
    assert "| step | 14.0 | start of backward | 3.50x |" in hl.markdown(data)
    assert "measured  step: peak 14.0 MiB at start of backward (weights 4.0," in hl.text(data)
    assert "moment" not in hl.markdown(hl.build("t", measured={"a": MiB}))  # no column when no moment is known
    assert json.loads(json.dumps(data)) == data


def test_durations_read_as_a_person_says_them():
    assert [hl.as_duration(s) for s in (41.24, 59.96, 60, 185, 3599.6)] == [
        "41.2 s", "1 min 00 s", "1 min 00 s", "3 min 05 s", "60 min 00 s"]
