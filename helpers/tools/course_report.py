"""The course report: run every solution notebook on this machine and say what each technique measured.

    python -m helpers.tools.course_report                 # every lesson -> report/report.md, PNG plots, report.json
    python -m helpers.tools.course_report --lessons 00 03 # a subset
    python -m helpers.tools.course_report --out /tmp/r --timeout 900

Each lesson runs top to bottom in a fresh kernel, on an in-memory copy of its solution notebook (the file is
never written), with the notebook's folder as the working directory, as JupyterLab and the tests run it, and
with ``COURSE_STRICT_CHECKS=1`` (unless set otherwise), so a failing exercise check fails the lesson as it
does in the test suite. A lesson that fails is reported with the failing cell and the first line of its
error, and the report carries on with the next lesson.

After a lesson's cells have run, its *headline* is read in the same kernel: ``SPECS`` below maps each
lesson to expressions over variables the lesson already defines (its measured ``MemoryReport`` objects,
its ``predict(...)`` results, its perplexities and timings). A test checks that every name those
expressions use is bound at the top level of the solution notebook, so renaming a lesson's variable fails
the test rather than the report. A lesson without a spec, or whose spec cannot be evaluated, still gets
its run time and result, with a note.

The report is rewritten after every lesson, marked *partial* until the last one is done, so a run that
stops early leaves a report that says how far it got. Every file is written to a temporary name and
renamed into place. The exit status is 0 when every lesson passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import datetime
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..constants import ROOT, MiB
from ..memory_report import CATEGORIES, LABELS

DEFAULT_OUT = ROOT / "report"  # ignored by git (.gitignore: /report/)
MARK = "@@course-report-headline@@"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Headline:
    """What to read out of a lesson's kernel once it has run: expressions over the lesson's own variables.

    configs    (label, memory expression): the configurations the lesson measures on one workload; the
               first is the baseline ("before"), the last the headline "after". A memory expression gives a
               ``MemoryReport`` (or anything with the four category attributes), a dict with category keys
               (bytes), or a number of bytes (a total without breakdown).
    predicted  (label, predicted memory expression, measured memory expression): compared on their totals.
    quality    (label, number expression): held-out perplexity or loss.
    time       (label, seconds expression).
    extra      (label, number expression): any other number the lesson is about (the label gives the unit).
    """

    technique: str
    configs: tuple[tuple[str, str], ...] = ()
    predicted: tuple[tuple[str, str, str], ...] = ()
    quality: tuple[tuple[str, str], ...] = ()
    time: tuple[tuple[str, str], ...] = ()
    extra: tuple[tuple[str, str], ...] = ()

    def expressions(self) -> list[str]:
        return [e for group in (self.configs, self.predicted, self.quality, self.time, self.extra)
                for item in group for e in item[1:]]

    def for_kernel(self) -> dict:
        return {"configs": [list(c) for c in self.configs], "predicted": [list(p) for p in self.predicted],
                "quality": [list(q) for q in self.quality], "time": [list(t) for t in self.time],
                "extra": [list(x) for x in self.extra]}


# One entry per lesson, keyed by the lesson's number (the first two characters of its file name).
SPECS: dict[str, Headline] = {
    "00": Headline(
        technique="the baseline: inference against one fp32 AdamW training step, batch 4 x 128",
        configs=(("inference, 4 x 128", "inference"), ("training step, fp32 AdamW, 4 x 128", "training")),
        predicted=(("inference, 4 x 128", "predicted_inference", "inference"),
                   ("training step, 4 x 128", "predicted_training", "training"),
                   ("training step, 8 x 128", "predicted_big", "report")),
        quality=(("held-out perplexity (16 chunks)", "baseline_ppl"),),
        time=(("forward pass 4 x 128, median of 3", "plain['median']"),
              ("the same forward pass, metered", "metered['median']")),
    ),
    "01": Headline(
        technique="loading the weights in 16, 8 and 4 bits (bitsandbytes)",
        configs=(("fp32", "{'weights': results['fp32']['bytes']}"),
                 ("bf16", "{'weights': results['bf16']['bytes']}"),
                 ("int8", "{'weights': results['int8']['bytes']}"),
                 ("nf4", "{'weights': results['nf4']['bytes']}"),
                 ("nf4 + double quant", "{'weights': results['nf4 + double quant']['bytes']}")),
        predicted=(("bf16 weights", "results['bf16']['predicted MiB'] * MiB", "results['bf16']['bytes']"),
                   ("int8 weights", "results['int8']['predicted MiB'] * MiB", "results['int8']['bytes']"),
                   ("nf4 weights", "results['nf4']['predicted MiB'] * MiB", "results['nf4']['bytes']"),
                   ("nf4 + double quant weights", "results['nf4 + double quant']['predicted MiB'] * MiB",
                    "results['nf4 + double quant']['bytes']")),
        quality=(("held-out perplexity, fp32", "results['fp32']['perplexity']"),
                 ("held-out perplexity, int8", "results['int8']['perplexity']"),
                 ("held-out perplexity, nf4", "results['nf4']['perplexity']"),
                 ("held-out perplexity, fp4", "results['fp4']['perplexity']")),
        time=(("forward 1 x 32, fp32", "results['fp32']['forward s']"),
              ("forward 1 x 32, int8", "results['int8']['forward s']"),
              ("forward 1 x 32, nf4", "results['nf4']['forward s']")),
    ),
    "02": Headline(
        technique="freezing all but the last K blocks (AdamW step, batch 1 x 16)",
        configs=(("train everything", "sweep['everything']"), ("train the last K blocks + norm", "sweep[f'last {K}']")),
        predicted=(("train everything, 1 x 16", "sweep_predicted['everything']", "sweep['everything']"),
                   ("last K blocks, 1 x 16", "sweep_predicted[f'last {K}']", "sweep[f'last {K}']"),
                   ("freeze the bottom, plain SGD, 2 x 128",
                    "acts_predicted[f'freeze the bottom (train last {K})']",
                    "acts[f'freeze the bottom (train last {K})']")),
        quality=(("held-out perplexity before", "baseline_ppl"),
                 ("after 8 steps, full fine-tune", "full['after']"),
                 ("after 8 steps, last K blocks", "partial['after']")),
        time=(("s per step, full fine-tune", "full['s / step (median of 7)']"),
              ("s per step, last K blocks", "partial['s / step (median of 7)']")),
        extra=(("trainable share, last K blocks", "partial['trainable share']"),),
    ),
    "03": Headline(
        technique="gradient checkpointing (fp32 AdamW step, batch 8 x 128)",
        configs=(("no checkpointing, 8 x 128", "measured[8, False]"), ("checkpointing, 8 x 128", "measured[8, True]")),
        predicted=(("no checkpointing, 8 x 128", "predict(dims, recipe(8, False))", "measured[8, False]"),
                   ("checkpointing, 8 x 128", "predict(dims, recipe(8, True))", "measured[8, True]"),
                   ("largest batch in 2.5 GiB, checkpointing", "predict(dims, recipe(plan[True], True))",
                    "measured[plan[True], True]")),
        time=(("training step without checkpointing (first batch where it pays)", "times[False]['median']"),
              ("the same step with checkpointing", "times[True]['median']")),
        extra=(("largest batch in 2.5 GiB, no checkpointing", "plan[False]"),
               ("largest batch in 2.5 GiB, checkpointing", "plan[True]")),
    ),
    "04": Headline(
        technique="LoRA r=16 on every linear layer against full fine-tuning (AdamW step, 2 x 128)",
        configs=(("full fine-tune", "full_report"), ("LoRA r=16, all linear", "lora_report")),
        predicted=(("full fine-tune", "full_predicted", "full_report"),
                   ("LoRA r=16, all linear", "lora_predicted", "lora_report")),
        quality=(("held-out perplexity before", "ppl_base"),
                 ("after 8 steps, full fine-tune", "full['ppl_after']"),
                 ("after 8 steps, LoRA", "lora['ppl_after']")),
        time=(("s per step, full fine-tune", "full['seconds_per_step']"),
              ("s per step, LoRA", "lora['seconds_per_step']")),
    ),
    "05": Headline(
        technique="QLoRA: nf4 base with double quantization + LoRA, checkpointing, paged AdamW 8-bit (2 x 128)",
        configs=(("full fine-tune, fp32", "full_report"), ("LoRA r=16, fp32 base", "lora_report"),
                 ("QLoRA r=16, nf4 base", "qlora_report")),
        predicted=(("full fine-tune", "predict(dims, Recipe(batch_size=BATCH, seq_len=SEQ))", "full_report"),
                   ("LoRA r=16",
                    "predict(dims, Recipe(batch_size=BATCH, seq_len=SEQ, lora_rank=16, lora_targets='all-linear'))",
                    "lora_report"),
                   ("QLoRA r=16",
                    "predict(dims, qlora_recipe.but(gradient_checkpointing=True, optimizer='paged_adamw8bit'))",
                    "qlora_report")),
        quality=(("held-out perplexity, fp32 model", "full['ppl_before']"),
                 ("after 8 steps, full fine-tune", "full['ppl_after']"),
                 ("after 8 steps, LoRA", "lora['ppl_after']"),
                 ("nf4 base before training", "qlora['ppl_before']"),
                 ("after 8 steps, QLoRA", "qlora['ppl_after']")),
        time=(("s per step, full fine-tune", "full['seconds_per_step']"),
              ("s per step, LoRA", "lora['seconds_per_step']"),
              ("s per step, QLoRA", "qlora['seconds_per_step']")),
        extra=(("LLaMA 65B, QLoRA r=64, predicted peak GiB",
                "scale.loc['QLoRA r=64, paged AdamW 32-bit', 'llama-65b']"),),
    ),
    "06": Headline(
        technique="mixed precision: bf16 autocast with fp32 master weights, and pure bf16 (AdamW step, 1 x 64)",
        configs=(("fp32", "reports['fp32']"),
                 ("bf16 autocast, fp32 weights", "reports['bf16 autocast (fp32 weights)']"),
                 ("bf16 weights", "reports['bf16 weights']")),
        predicted=(("fp32", "predict(dims, recipes['fp32'])", "reports['fp32']"),
                   ("bf16 autocast", "predict(dims, recipes['bf16 autocast (fp32 weights)'])",
                    "reports['bf16 autocast (fp32 weights)']"),
                   ("bf16 weights", "predict(dims, recipes['bf16 weights'])", "reports['bf16 weights']")),
        quality=(("held-out perplexity, fp32", "quality['fp32']"),
                 ("held-out perplexity, bf16 autocast", "quality['bf16 autocast']"),
                 ("held-out perplexity, bf16 weights", "quality['bf16 weights']")),
        time=(("one metered step, fp32", "reports['fp32'].seconds"),
              ("one metered step, bf16 autocast", "reports['bf16 autocast (fp32 weights)'].seconds"),
              ("one metered step, bf16 weights", "reports['bf16 weights'].seconds")),
    ),
    "07": Headline(
        technique="gradient accumulation: one optimizer step of 4 x 64 tokens in k micro-batches (LoRA r=16)",
        configs=(("4 x 64, k = 1", "reports[1]"), ("2 x 64, k = 2", "reports[2]"), ("1 x 64, k = 4", "reports[4]")),
        predicted=(("4 x 64, k = 1",
                    "predict(dims, lora_recipe.but(batch_size=EFFECTIVE, gradient_accumulation_steps=1))",
                    "reports[1]"),
                   ("1 x 64, k = 4",
                    "predict(dims, lora_recipe.but(batch_size=EFFECTIVE // 4, gradient_accumulation_steps=4))",
                    "reports[4]")),
        quality=(("held-out loss after 3 steps, k = 1", "heldout[1]"),
                 ("held-out loss after 3 steps, k = 4", "heldout[4]")),
        time=(("s per optimizer step, k = 1", "timings[1]['median']"),
              ("s per optimizer step, k = 4", "timings[4]['median']")),
    ),
    "08": Headline(
        technique="optimizers with less state: SGD, AdamW 8-bit, Adafactor against AdamW (full fine-tune, 2 x 64)",
        configs=(("AdamW", "reports['adamw']"), ("SGD, momentum", "reports['sgd']"),
                 ("AdamW8bit", "reports['adamw8bit']"), ("Adafactor", "reports['adafactor']")),
        predicted=tuple((name,
                         f"predict(dims, Recipe(batch_size=BATCH, seq_len=SEQ, optimizer='{key}', device=DEVICE))",
                         f"reports['{key}']")
                        for name, key in (("AdamW", "adamw"), ("SGD", "sgd"), ("AdamW8bit", "adamw8bit"),
                                          ("Adafactor", "adafactor"))),
        quality=(("held-out perplexity before", "ppl_before"),
                 ("after 4 steps, AdamW", "runs['adamw']['ppl_after']"),
                 ("after 4 steps, SGD", "runs['sgd']['ppl_after']"),
                 ("after 4 steps, AdamW8bit", "runs['adamw8bit']['ppl_after']"),
                 ("after 4 steps, Adafactor", "runs['adafactor']['ppl_after']")),
        time=(("s per step, AdamW", "runs['adamw']['seconds_per_step']"),
              ("s per step, AdamW8bit", "runs['adamw8bit']['seconds_per_step']"),
              ("s per step, Adafactor", "runs['adafactor']['seconds_per_step']")),
    ),
    "09": Headline(
        technique="sharding over two processes: DDP, FSDP2, ZeRO-2, ZeRO-3 (the rank holding the most of 2, "
                  "mid-size model, fp32)",
        configs=(("DDP", "peaks['ddp']"), ("FSDP2", "peaks['fsdp']"), ("ZeRO-2", "peaks['zero2']"),
                 ("ZeRO-3", "peaks['zero3']")),
        predicted=tuple((name, f"predict(config, recipe_for('{key}'))", f"peaks['{key}']")
                        for name, key in (("DDP", "ddp"), ("FSDP2", "fsdp"), ("ZeRO-2", "zero2"), ("ZeRO-3", "zero3"))),
        time=(("step s, rank 0, DDP", "reports['ddp'][0]['step_seconds'][-1]"),
              ("step s, rank 0, FSDP2", "reports['fsdp'][0]['step_seconds'][-1]"),
              ("step s, rank 0, ZeRO-3", "reports['zero3'][0]['step_seconds'][-1]")),
        extra=(("disk offload, 200 MiB budget: forward peak MiB", "off.peak / MiB"),
               ("in memory: forward peak MiB", "full.peak / MiB")),
    ),
    "10": Headline(
        technique="the loss without the whole logits: logits_to_keep, and cross-entropy in chunks of 32 positions "
                  "recomputed in backward (LoRA r=8 on q/v, checkpointing, 2 x 128)",
        configs=(("plain loss", "plain_report"), ("loss in chunks of 32", "chunked_report")),
        predicted=(("plain loss", "plain_predicted", "plain_report"),
                   ("loss in chunks of 32", "chunked_predicted", "chunked_report")),
        quality=(("|loss, plain - chunked|", "loss_gap"),),
        time=(("s per step, plain loss", "times[None]['median']"),
              ("s per step, chunks of 32", "times[CHUNK]['median']")),
        extra=(("inference 4 x 128, every position's logits: activations MiB", "keep[0].activations / MiB"),
               ("logits_to_keep=1: activations MiB", "keep[1].activations / MiB")),
    ),
    "11": Headline(
        technique="the KV cache when generating: layers x 2 x kv heads x head dim x bytes a token, measured with "
                  "generate; grouped-query attention, a static cache, sdpa against eager, a quantized cache",
        configs=(("generate, 256-token prompts x 4, DynamicCache", "reports['256 tokens x 4']"),),
        predicted=(("KV cache, 3 x 100-token prompts + 20 new (bytes)", "kv_cache_bytes(dims, 119, 3)",
                    "sweep.loc['100 tokens x 3, 20 new', 'cache MiB (measured)'] * MiB"),
                   ("generate peak, 256 x 4", "generation_peak(dims, 256, NEW, 4)['peak']",
                    "reports['256 tokens x 4'].peak"),
                   ("4-bit quanto cache (MiB)", "quantized.loc['quanto, 4 bits', 'cache MiB (formula)']",
                    "quantized.loc['quanto, 4 bits', 'cache MiB (measured)']")),
        time=(("generate s, DynamicCache", "speed['DynamicCache']"),
              ("generate s, StaticCache", "speed['StaticCache (default length)']")),
        extra=(("Llama-3-8B bf16 on an L4: concurrent 8k-token requests", "serving.requests"),),
    ),
    "12": Headline(
        technique="the capstone: every technique at once on one fine-tune, 8 x 128 tokens a step, in 500, 220 and "
                  "170 MiB",
        configs=(("naive: fp32 full fine-tune, AdamW", "naive.report"),
                 ("170 MiB tier: nf4 + bf16 embedding, LoRA r=8, 1-row micro-batches, 8-bit AdamW, loss in chunks "
                  "of 32", "best.report")),
        predicted=(("naive", "naive_predicted", "naive.report"), ("170 MiB tier", "best_predicted", "best.report")),
        quality=(("held-out perplexity, pretrained", "naive.ppl_start"),
                 ("after the naive fine-tune", "naive.ppl_end"), ("after the 170 MiB tier", "best.ppl_end")),
        time=(("s per step, naive", "naive.seconds_per_step"), ("s per step, 170 MiB tier", "best.seconds_per_step")),
        extra=(("peak ratio, naive / 170 MiB tier (x)", "ratio"),
               ("perplexity ratio, 170 MiB tier / naive (x)", "quality")),
    ),
}


# --- in the kernel -------------------------------------------------------------------------------------

def _headline_values(spec, namespace):
    """Evaluate a spec (``Headline.for_kernel()``) in a lesson's namespace; runs inside the lesson's kernel.

    Self-contained on purpose: its source is sent to the kernel, so it may use builtins only.
    """
    categories = ("weights", "gradients", "optimizer", "activations")

    def memory(value):
        if all(hasattr(value, c) for c in categories):
            parts = {c: int(getattr(value, c)) for c in categories}
        elif isinstance(value, dict) and any(c in value for c in categories):
            parts = {c: int(value.get(c, 0)) for c in categories}
        else:
            return {"total": float(value), "parts": None}
        return {"total": sum(parts.values()), "parts": parts}

    out = {}
    for group, items in spec.items():
        rows = []
        for label, *expressions in items:
            try:
                values = [eval(e, namespace) for e in expressions]  # the course's own table, never user input
                if group == "configs":
                    row = memory(values[0])
                elif group == "predicted":
                    row = {"predicted": memory(values[0])["total"], "measured": memory(values[1])["total"]}
                else:
                    row = {"value": float(values[0])}
            except Exception as err:  # reported beside the row, never fatal
                row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            row["label"] = label
            rows.append(row)
        out[group] = rows
    return out


def _headline_cell(spec: Headline) -> str:
    return (inspect.getsource(_headline_values)
            + f"\nprint({MARK!r} + __import__('json').dumps(_headline_values({spec.for_kernel()!r}, globals())))"
            + "\ndel _headline_values\n")


def _parse_headline(cell) -> dict | None:
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
    for line in text.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return None


# --- static check of the specs (used by the tests) -----------------------------------------------------

class _TopLevelNames(ast.NodeVisitor):
    """Names bound at the top level of a module, in order: assignments, loops, imports, defs; ``del`` unbinds.

    Function, class and lambda bodies and comprehensions have their own scope and are not entered.
    """

    def __init__(self):
        self.bound: set[str] = set()

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Store):
            self.bound.add(node.id)

    def visit_Delete(self, node):
        for target in node.targets:
            if isinstance(target, ast.Name):
                self.bound.discard(target.id)

    def _define(self, node):
        self.bound.add(node.name)
        for decorator in getattr(node, "decorator_list", []):
            self.visit(decorator)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _define

    def visit_Import(self, node):
        for alias in node.names:
            self.bound.add(alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_Lambda(self, node):
        pass

    def _comprehension(self, node):
        pass

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def visit_ExceptHandler(self, node):  # `except E as err`: err is unbound when the handler ends
        for statement in node.body:
            self.visit(statement)


def _code(source: str) -> str:
    """A cell's source without IPython magics and shell escapes, which are not Python."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n"))


def notebook_names(nb) -> set[str]:
    """Names bound at the top level of a notebook once all of its code cells have run."""
    visitor = _TopLevelNames()
    for cell in nb.cells:
        if cell.cell_type == "code":
            visitor.visit(ast.parse(_code(cell.source)))
    return visitor.bound


def free_names(expression: str) -> set[str]:
    """The names an expression reads from its namespace (not those its comprehensions or lambdas bind)."""
    tree = ast.parse(expression, mode="eval")
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    local = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    local |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.Lambda) for a in ast.walk(n.args)
              if isinstance(a, ast.arg)}
    return loaded - local - set(dir(builtins))


def unbound_names(spec: Headline, nb) -> dict[str, set[str]]:
    """{expression: names it uses that the notebook does not bind at top level}; empty when all is well."""
    bound = notebook_names(nb)
    problems = {}
    for expression in spec.expressions():
        missing = free_names(expression) - bound
        if missing:
            problems[expression] = missing
    return problems


# --- running a lesson ----------------------------------------------------------------------------------

@dataclass
class LessonResult:
    lesson: str  # "03"
    name: str  # "03_gradient_checkpointing"
    status: str = "not run"  # "passed" | "failed"
    seconds: float = 0.0  # kernel start to the end of the last cell (the headline is not timed)
    cells_run: int = 0
    cells_total: int = 0
    error: str | None = None  # first line of the error
    error_cell: int | None = None  # index in the notebook's cells, as helpers.tools.notebooks counts them
    slowest_cell: tuple[int, float] | None = None
    technique: str | None = None
    headline: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _first_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def kernel_env() -> dict:
    """The environment the lessons' kernels get: this one, with helpers importable and strict checks."""
    env = dict(os.environ)
    env.setdefault("COURSE_STRICT_CHECKS", "1")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    return env


def run_lesson(path, timeout: int = 900, spec: Headline | None = None, cell_bar=None) -> LessonResult:
    """Run one solution notebook in a fresh kernel (an in-memory copy), then read its headline."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    result = LessonResult(lesson=path.stem[:2], name=path.stem, technique=spec.technique if spec else None)
    nb = nbformat.read(path, as_version=4)
    code = [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    result.cells_total = len(code)
    if cell_bar is not None:
        cell_bar.reset(total=len(code))
        cell_bar.set_description(path.stem[:32])
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        with client.setup_kernel(env=kernel_env()):
            for index, cell in code:
                began = time.perf_counter()
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as err:
                    result.error_cell, result.error = index, _first_line(f"{err.ename}: {err.evalue}")
                except CellTimeoutError:
                    result.error_cell, result.error = index, f"timed out: the cell ran longer than {timeout} s"
                except DeadKernelError as err:
                    result.error_cell, result.error = index, _first_line(f"the kernel died: {err}")
                took = time.perf_counter() - began
                if result.slowest_cell is None or took > result.slowest_cell[1]:
                    result.slowest_cell = (index, took)
                result.cells_run += 1
                if cell_bar is not None:
                    cell_bar.update()
                if result.error is not None:
                    break
            result.seconds = time.perf_counter() - start
            if spec is None:
                result.notes.append("no headline spec for this lesson (course_report.SPECS): run time and result only")
            elif not (result.error or "").startswith(("the kernel died", "timed out")):
                headline = nbformat.v4.new_code_cell(_headline_cell(spec))
                nb.cells.append(headline)
                try:
                    client.execute_cell(headline, len(nb.cells) - 1)
                    result.headline = _parse_headline(headline)
                except Exception as err:
                    result.notes.append(f"the headline could not be read: {_first_line(err)}")
                if result.headline is None and not result.notes:
                    result.notes.append("the headline could not be read: no output")
    except Exception as err:  # the kernel did not start, or died between cells
        result.error = result.error or _first_line(f"{type(err).__name__}: {err}")
        result.seconds = result.seconds or time.perf_counter() - start
    result.status = "failed" if result.error else "passed"
    if result.error and result.headline:
        result.notes.append("the lesson failed: the numbers below are what it had measured before the failure")
    if result.headline:
        broken = [f"{row['label']} ({row['error']})" for rows in result.headline.values() for row in rows
                  if "error" in row]
        if broken:
            result.notes.append("could not evaluate: " + "; ".join(broken))
    return result


# --- the report ----------------------------------------------------------------------------------------

def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def _mib(b: float) -> str:
    return f"{b / MiB:,.1f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ok(rows):
    return [r for r in rows if "error" not in r]


def error_percent(row: dict) -> float:
    m, p = row["measured"], row["predicted"]
    return 100 * (p - m) / m if m else (0.0 if p == 0 else float("inf"))


def _before_after(result: LessonResult) -> str:
    configs = _ok((result.headline or {}).get("configs", []))
    if len(configs) < 2:
        return ""
    before, after = configs[0], configs[-1]
    ratio = after["total"] / before["total"] if before["total"] else float("nan")
    return f"{_mib(before['total'])} → {_mib(after['total'])} MiB ({ratio:.2f}x)"


def _prediction_summary(result: LessonResult) -> str:
    rows = _ok((result.headline or {}).get("predicted", []))
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
    """Stacked bars by category of the lesson's configurations; False if it has none with a breakdown."""
    from matplotlib.figure import Figure

    from helpers.memory import MemoryReport
    from helpers.plots import stacked_bars

    configs = [r for r in _ok((result.headline or {}).get("configs", [])) if r.get("parts")]
    if not configs:
        return False
    bars = {}
    for row in configs:
        label = row["label"] if len(row["label"]) <= 18 else row["label"].replace(", ", ",\n", 1)
        bars[label] = MemoryReport(**row["parts"])
    fig = Figure(figsize=(2.6 + 1.7 * len(bars), 4.0))
    stacked_bars(bars, title=f"Lesson {result.lesson}: measured peak by category", ax=fig.subplots())
    _save(fig, path)
    return True


def plot_predictions(results: list[LessonResult], path: Path) -> bool:
    """Predicted against measured, every lesson: both totals side by side, and the error in percent."""
    from matplotlib.figure import Figure

    rows = [(f"{r.lesson} {row['label']}", row)
            for r in results for row in _ok((r.headline or {}).get("predicted", []))]
    if not rows:
        return False
    fig = Figure(figsize=(11, 1.4 + 0.3 * len(rows)))
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))[::-1]
    errors = [error_percent(row) for _, row in rows]
    left.barh([v + 0.2 for v in y], [row["measured"] / MiB for _, row in rows], height=0.4, color="#4C72B0",
              label="measured")
    left.barh([v - 0.2 for v in y], [row["predicted"] / MiB for _, row in rows], height=0.4, color="#AAAAAA",
              label="predicted")
    left.set_xlim(0, 1.3 * max(max(row["measured"], row["predicted"]) for _, row in rows) / MiB)  # room: legend
    left.set_yticks(y, [label for label, _ in rows], fontsize=8)
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
    _save(fig, path)
    return True


def plot_run_time(results: list[LessonResult], path: Path) -> bool:
    from matplotlib.figure import Figure

    done = [r for r in results if r.status != "not run"]
    if not done:
        return False
    fig = Figure(figsize=(8, 1.2 + 0.35 * len(done)))
    ax = fig.subplots()
    y = range(len(done))[::-1]
    ax.barh(list(y), [r.seconds / 60 for r in done], color=["#55A868" if r.passed else "#C44E52" for r in done])
    for yy, r in zip(y, done, strict=True):
        ax.text(r.seconds / 60, yy, f" {_seconds(r.seconds)}" + ("" if r.passed else " (failed)"), va="center",
                fontsize=8)
    ax.set_yticks(list(y), [r.name for r in done], fontsize=8)
    ax.set_xlabel("minutes on this machine")
    ax.set_title("Run time per lesson")
    ax.set_xlim(0, max(r.seconds for r in done) / 60 * 1.3 or 1)
    fig.tight_layout()
    _save(fig, path)
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
        where = f"cell {result.error_cell}: " if result.error_cell is not None else ""
        out += [f"Error in {where}`{_cell(result.error)}`", ""]
    if result.technique:
        out += [f"Technique: {result.technique}.", ""]
    out += [f"*Note: {_cell(note)}.*" if not note.endswith(".") else f"*Note: {_cell(note)}*"
            for note in result.notes]
    if result.notes:
        out.append("")
    h = result.headline or {}
    configs = _ok(h.get("configs", []))
    if configs:
        base = configs[0]["total"]
        out += ["| configuration (measured) | " + " | ".join(LABELS[c] for c in CATEGORIES)
                + " | peak MiB | vs first |", "|---|" + "---:|" * (len(CATEGORIES) + 2)]
        for row in configs:
            parts = row.get("parts") or {}
            cells = [_mib(parts[c]) if c in parts else "" for c in CATEGORIES]
            ratio = f"{row['total'] / base:.2f}x" if base else ""
            out.append(f"| {_cell(row['label'])} | " + " | ".join(cells) + f" | {_mib(row['total'])} | {ratio} |")
        out.append("")
    predicted = _ok(h.get("predicted", []))
    if predicted:
        out += ["| predicted vs measured | predicted MiB | measured MiB | error % |", "|---|---:|---:|---:|"]
        out += [f"| {_cell(r['label'])} | {_mib(r['predicted'])} | {_mib(r['measured'])} | {error_percent(r):+.2f} |"
                for r in predicted]
        out.append("")
    for group, heading in (("quality", "value"), ("time", "seconds"), ("extra", "value")):
        rows = _ok(h.get(group, []))
        if rows:
            out += [f"| {group} | {heading} |", "|---|---:|"]
            out += [f"| {_cell(r['label'])} | {r['value']:,.4g} |" for r in rows]
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
    out += [f"- {_cell(line)}" for line in machine] + [""]
    passed = sum(r.passed for r in results)
    total = sum(r.seconds for r in results)
    out += ["## Summary", "",
            "| lesson | result | run time | before → after (peak) | predicted vs measured |",
            "|---|---|---:|---|---|"]
    for r in results:
        out.append(f"| {r.name} | {_status(r)} | {_seconds(r.seconds)} | {_before_after(r)} | "
                   f"{_prediction_summary(r)} |")
    predictions = [error_percent(row) for r in results for row in _ok((r.headline or {}).get("predicted", []))]
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
    """Write report.md, report.json and the plots into out_dir (each file atomically); return report.md."""
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
    _atomic_write(out_dir / "report.json", json.dumps(data, indent=1).encode())
    path = out_dir / "report.md"
    _atomic_write(path, render(results, machine, plots, list(pending), interrupted, command).encode())
    return path


def run(solutions_dir=None, lessons=(), out=DEFAULT_OUT, timeout: int = 900, specs=None,
        progress: bool = True, command: str = "") -> list[LessonResult]:
    """Run the chosen lessons one by one, rewriting the report after each; return their results."""
    from tqdm import tqdm

    from helpers.tools.notebooks import _select

    solutions_dir = Path(solutions_dir or ROOT / "solutions")
    specs = SPECS if specs is None else specs
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
            result = run_lesson(path, timeout=timeout, spec=specs.get(path.stem[:2]), cell_bar=cell_bar)
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
        print(f"interrupted: partial report in {Path(args.out) / 'report.md'}", file=sys.stderr)
        return 130
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} lessons passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"\nreport: {Path(args.out) / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
