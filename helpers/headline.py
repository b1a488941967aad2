"""A lesson's headline: the few numbers it is about, stated once, in its last cell.

    from helpers.headline import headline

    headline("LoRA r=16 on every linear layer against full fine-tuning (AdamW step, 2 x 128)",
             measured={"full fine-tune": full_report, "LoRA r=16, all linear": lora_report},
             predicted={"full fine-tune": (full_predicted, full_report), "LoRA r=16": (lora_predicted, lora_report)},
             quality={"held-out perplexity before": ppl_base, "after 8 steps, LoRA": lora["ppl_after"]},
             time={"s per step, full": full["seconds_per_step"], "s per step, LoRA": lora["seconds_per_step"]},
             extra={"trainable share": share})

- ``technique``: one line, what the lesson does to what workload.
- ``measured``: the configurations the lesson measured on one workload, in order; the first is the baseline
  ("before"), the last the headline ("after"). Each is *memory*: a ``MemoryReport`` (what ``measure`` and
  ``predict`` return), a dict of bytes by category (``{"weights": n}``), or a number of bytes (a total without
  breakdown). A ``MemoryReport`` that knows the moment of its peak ("backward start") carries it along.
- ``predicted``: label -> (predicted memory, measured memory), compared on their totals.
- ``quality`` (held-out perplexity or loss), ``time`` (seconds), ``extra`` (any other number the lesson is about;
  the label says the unit): label -> number.

Every argument is checked, with a message that names the one at fault. The learner sees a short summary; the
output also carries the numbers as JSON under ``MIMETYPE``, which ``python -m helpers.tools.course_report`` reads
from the executed notebook (``read``), so the report knows no lesson's variable names.
"""

from __future__ import annotations

import ast
import builtins
import math
import numbers

from .constants import MiB
from .memory_report import CATEGORIES, LABELS, moment_words

MIMETYPE = "application/vnd.course.headline+json"
VERSION = 1
GROUPS = ("measured", "predicted", "quality", "time", "extra")
MEMORY = ("give a MemoryReport (what measure() and predict() return), a dict of bytes by category "
          f"({', '.join(CATEGORIES)}), or a number of bytes")


def _where(group: str, label=None) -> str:
    return f"headline({group}=...)" if label is None else f"headline({group}=...)[{label!r}]"


def _number(value, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        item = getattr(value, "item", None)  # a 0-d numpy array or torch tensor
        try:
            value = item() if callable(item) else value
        except (ValueError, RuntimeError, TypeError):
            pass
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where}: expected a number, got {type(value).__name__} ({value!r:.60})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: expected a number of at least {minimum:g}, got {value:g}")
    return value


def memory(value, where: str = "memory") -> dict:
    """{"total": bytes, "parts": {category: bytes} or None} for a MemoryReport, a dict by category or a number; a
    MemoryReport that knows the moment of its peak ("backward start", ...) adds {"moment": moment}, since its parts
    are what was alive at that moment (a step whose peak is at the start of backward shows no gradients)."""
    if all(hasattr(value, c) for c in CATEGORIES):
        parts = {c: int(_number(getattr(value, c), f"{where}.{c}", 0)) for c in CATEGORIES}
        moment = getattr(value, "moment", None)
        return {"total": sum(parts.values()), "parts": parts, **({"moment": str(moment)} if moment else {})}
    if isinstance(value, dict):
        unknown = [k for k in value if k not in CATEGORIES]
        if unknown or not value:
            raise ValueError(f"{where}: a dict of bytes by category takes the keys {', '.join(CATEGORIES)}; "
                             f"got {', '.join(map(repr, unknown)) or 'none'}")
        parts = {c: int(_number(value.get(c, 0), f"{where}[{c!r}]", 0)) for c in CATEGORIES}
        return {"total": sum(parts.values()), "parts": parts}
    if isinstance(value, bool) or value is None or isinstance(value, str | bytes | list | tuple):
        raise TypeError(f"{where}: a {type(value).__name__} is not memory: {MEMORY}")
    try:
        return {"total": _number(value, where, 0), "parts": None}
    except TypeError:
        raise TypeError(f"{where}: a {type(value).__name__} is not memory: {MEMORY}") from None


def _missing(value) -> bool:
    """A value the lesson has not got in this run (an exercise not done yet): None, or a pair holding None."""
    return value is None or (isinstance(value, tuple | list) and None in value)


def _items(group: str, given, skipped: list | None = None) -> list:
    """(label, value) pairs; labels whose value is missing go to ``skipped`` instead."""
    if given is None:
        return []
    if not isinstance(given, dict):
        raise TypeError(f"{_where(group)}: expected a dict of label -> value, got {type(given).__name__}")
    for label in given:
        if not isinstance(label, str) or not label.strip():
            raise TypeError(f"{_where(group)}: every label is a non-empty string; got {label!r}")
    if skipped is not None:
        skipped += [label for label, value in given.items() if _missing(value) and label not in skipped]
    return [(label, value) for label, value in given.items() if skipped is None or not _missing(value)]


def build(technique: str, *, measured: dict | None = None, predicted: dict | None = None,
          quality: dict | None = None, time: dict | None = None, extra: dict | None = None) -> dict:
    """The headline as plain data (what ``headline`` shows and emits); raises on a bad argument."""
    if not isinstance(technique, str) or not technique.strip():
        raise TypeError("headline(technique, ...): the first argument says in one line what the lesson does "
                        f"(a non-empty string); got {technique!r:.60}")
    data = {"version": VERSION, "technique": " ".join(technique.split())}
    skipped = []  # labels whose value is None: not measured in this run (e.g. an exercise not done yet)
    data["measured"] = [{"label": label, **memory(value, _where("measured", label))}
                        for label, value in _items("measured", measured, skipped)]
    rows = []
    for label, pair in _items("predicted", predicted, skipped):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise TypeError(f"{_where('predicted', label)}: expected a pair (predicted, measured), got "
                            f"{type(pair).__name__}")
        where = _where("predicted", label)
        rows.append({"label": label, "predicted": memory(pair[0], where + "[0] (predicted)")["total"],
                     "measured": memory(pair[1], where + "[1] (measured)")["total"]})
    data["predicted"] = rows
    for group, given, minimum in (("quality", quality, None), ("time", time, 0), ("extra", extra, None)):
        data[group] = [{"label": label, "value": _number(value, _where(group, label), minimum)}
                       for label, value in _items(group, given, skipped)]
    data["not_measured"] = skipped
    if not data["measured"] and not data["predicted"]:
        raise ValueError("headline(...): say at least what the lesson measured (measured=...) or predicted against "
                         "a measurement (predicted=...)")
    return data


def error_percent(row: dict) -> float:
    """(predicted - measured) / measured, in percent, of one ``predicted`` row."""
    m, p = row["measured"], row["predicted"]
    return 100 * (p - m) / m if m else (0.0 if p == 0 else float("inf"))


def as_mib(b: float) -> str:
    """Bytes as MiB with one decimal, thousands separated (the tables' unit)."""
    return f"{b / MiB:,.1f}"


def as_duration(seconds: float) -> str:
    """Seconds as a reader says them: "41.2 s", "3 min 05 s"."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def md_cell(text) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(data: dict) -> str:
    """The summary the learner reads: small tables, MiB and seconds."""
    out = [f"**Headline:** {md_cell(data['technique'])}", ""]
    if data["measured"]:
        base = data["measured"][0]["total"]
        moments = any(r.get("moment") for r in data["measured"])  # a column only when some peak's moment is known
        out += ["| measured | peak MiB | " + ("moment of the peak | " if moments else "") + "vs first |",
                "|---|---:|" + ("---|" if moments else "") + "---:|"]
        out += [f"| {md_cell(r['label'])} | {as_mib(r['total'])} | "
                + (f"{moment_words(r.get('moment')) or '—'} | " if moments else "")
                + (f"{r['total'] / base:.2f}x |" if base else " |")
                for r in data["measured"]]
        out.append("")
    if data["predicted"]:
        out += ["| predicted vs measured | predicted MiB | measured MiB | error % |", "|---|---:|---:|---:|"]
        out += [(f"| {md_cell(r['label'])} | {as_mib(r['predicted'])} | {as_mib(r['measured'])} | "
                 f"{error_percent(r):+.1f} |")
                for r in data["predicted"]]
        out.append("")
    for group, unit in (("quality", "value"), ("time", "seconds"), ("extra", "value")):
        if data[group]:
            out += [f"| {group} | {unit} |", "|---|---:|"]
            out += [f"| {md_cell(r['label'])} | {r['value']:,.4g} |" for r in data[group]]
            out.append("")
    if data.get("not_measured"):
        out.append("Not measured in this run: " + ", ".join(md_cell(label) for label in data["not_measured"]) + ".")
    return "\n".join(out).rstrip() + "\n"


def text(data: dict) -> str:
    """The same summary as plain text (terminals, and front ends that show no Markdown)."""
    lines = [f"Headline: {data['technique']}"]
    for r in data["measured"]:
        parts = r["parts"] or {}
        detail = ", ".join(f"{LABELS[c]} {as_mib(parts[c])}" for c in CATEGORIES if parts.get(c))
        at = f" at {moment_words(r['moment'])}" if r.get("moment") else ""
        detail = f" ({detail})" if detail else ""
        lines.append(f"  measured  {r['label']}: peak {as_mib(r['total'])} MiB{at}{detail}")
    for r in data["predicted"]:
        lines.append(f"  predicted {r['label']}: {as_mib(r['predicted'])} MiB against {as_mib(r['measured'])} MiB "
                     f"measured ({error_percent(r):+.1f} %)")
    for group in ("quality", "time", "extra"):
        lines += [f"  {group:9} {r['label']}: {r['value']:,.4g}" for r in data[group]]
    if data.get("not_measured"):
        lines.append("  not measured in this run: " + ", ".join(data["not_measured"]))
    return "\n".join(lines)


def headline(technique: str, *, measured: dict | None = None, predicted: dict | None = None,
             quality: dict | None = None, time: dict | None = None, extra: dict | None = None) -> None:
    """Check the lesson's headline numbers and show them: a summary for the learner, and the numbers as JSON
    (``MIMETYPE``) for the course report. See the module's docstring for the arguments."""
    data = build(technique, measured=measured, predicted=predicted, quality=quality, time=time, extra=extra)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # plain Python: the text is all there is
        print(text(data))
        return
    if get_ipython() is None:
        print(text(data))
        return
    display({MIMETYPE: data, "text/markdown": markdown(data), "text/plain": text(data)}, raw=True)


# --- reading it back ------------------------------------------------------------------------------------

def read_all(nb) -> list[dict]:
    """Every headline an executed notebook's outputs hold, in order."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = output.get("data", {}) if output.get("output_type") in ("display_data", "execute_result") else {}
            if MIMETYPE in data:
                value = data[MIMETYPE]
                found.append(value if isinstance(value, dict) else __import__("json").loads(value))
    return found


def read(nb) -> dict | None:
    """The last headline in an executed notebook's outputs, or None."""
    found = read_all(nb)
    return found[-1] if found else None


# --- the source of a lesson's headline call (the tests check every solution notebook with it) ------------

def _calls(tree) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id == "headline"]


def _own(node) -> bool:
    """An expression over the lesson's own objects: it reads a name that is not a builtin, and is not a literal."""
    return (not isinstance(node, ast.Constant)
            and any(isinstance(n, ast.Name) and n.id not in dir(builtins) for n in ast.walk(node)))


def source_problems(nb) -> list[str]:
    """Why a notebook's headline call is not what a lesson's must be: exactly one ``headline(...)`` call, in the last
    code cell, with a literal technique and label, and every value an expression over the lesson's own objects
    (its measured reports, predictions, perplexities and timings), never a number written in."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    found = []
    for position, cell in enumerate(code):
        try:
            tree = ast.parse("\n".join("" if line.lstrip().startswith(("%", "!")) else line
                                       for line in cell.source.split("\n")))
        except SyntaxError:
            continue
        found += [(position, call) for call in _calls(tree)]
    if len(found) != 1:
        return [f"{len(found)} headline(...) calls; a lesson ends with exactly one"]
    position, call = found[0]
    problems = []
    if position != len(code) - 1:
        problems.append("the headline(...) call is not in the last code cell")
    if "from helpers.headline import headline" not in code[position].source:
        problems.append("the headline cell does not import it (from helpers.headline import headline)")
    if not (call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
        problems.append("the first argument is not the technique, a string")
    if len(call.args) > 1:
        problems.append("only the technique is positional")
    given = {k.arg: k.value for k in call.keywords}
    if None in given or set(given) - set(GROUPS):
        problems.append(f"unknown or ** arguments: {sorted(str(k) for k in given if k not in GROUPS)}")
    if not {"measured", "predicted"} & set(given):
        problems.append("neither measured= nor predicted=")
    for group, node in given.items():
        if group not in GROUPS:
            continue
        if not isinstance(node, ast.Dict):
            problems.append(f"{group}= is not a dict written in the call ({{'label': value, ...}})")
            continue
        for key, value in zip(node.keys, node.values, strict=True):
            label = key.value if isinstance(key, ast.Constant) else None
            if not isinstance(label, str):
                problems.append(f"{group}=: a label that is not a string: {ast.unparse(key) if key else '**'}")
            leaves = value.elts if group == "predicted" and isinstance(value, ast.Tuple) else [value]
            if group == "predicted" and len(leaves) != 2 or group != "predicted" and isinstance(value, ast.Tuple):
                problems.append(f"{group}[{label!r}]: expected " + ("a pair (predicted, measured)"
                                                                   if group == "predicted" else "one value"))
            problems += [f"{group}[{label!r}]: {ast.unparse(leaf)} is not one of the lesson's own objects"
                         for leaf in leaves if not _own(leaf)]
    return problems
