"""Lesson 12's capstone: fit a real fine-tune of the course model into a memory budget, and prove it.

    def my_setup():                        # builds everything from scratch, trains nothing yet
        model = ...                        # the course model, loaded however you like
        optimizer = ...
        def step(batch):                   # one optimizer step on the whole 8 x 128 batch
            ...
        return model, optimizer, step

    result = attempt(my_setup)             # runs the workload; measures; evaluates
    result.verdict()                       # (passed, feedback)

``attempt`` is the referee. It builds the setup and checks that the model is the course model, built from
torch, transformers, peft and bitsandbytes modules running their own code, that some of it trains, and that
no 4-bit layer is packed for CPU inference (that layout has no backward: ``helpers.cpu_packing``). It
measures held-out perplexity, then runs ``WORKLOAD.optimizer_steps`` optimizer steps on the same fixed batches for
every setup and **measures every step** with ``helpers.memory``'s meter (exact tensor bytes by category):
the peak is the largest over all steps. The first step is measured like the others; with torch's optimizers
it usually peaks lower, because the optimizer state is created at its very end, when the activations are
gone (the lesson's QLoRA plan with AdamW: 279 MiB in step 1, 316 MiB from step 2 on), so the steady state
decides; a step that needs more memory on some calls than on others is caught on whichever call that is.
In every step the referee also checks that

- every row of the batch went through the whole model with gradients on and got a gradient back (per-row
  gradient norms at the input embedding's output, at every decoder block's output and at the output layer's
  input: a row seen only in a no-grad pass, or whose loss was multiplied away, does not count);
- the trainable weights moved (a fingerprint before and after), and in the end every trainable tensor got a
  non-zero gradient and moved;
- the model ran where the meter sees it: in the thread that called ``step``, with the meter switched on;
  no other Python thread and no child process ran during the step, and no tensor of the model or optimizer
  lives in shared memory (where another process could train it);
- the referee's own code (``helpers.memory``, ``helpers.capstone``...) is unchanged.

The first step that breaks a rule ends the run; the ``Attempt``'s ``problems`` say why. Held-out perplexity
is measured again after the last step. ``judge`` turns what was measured into the verdict: the peak must be
within ``budget`` (three tiers of the same job: ``WORKLOAD``, 500 MiB, ``TIGHT_WORKLOAD``, 220 MiB, and
``SMALLEST_WORKLOAD``, 170 MiB) and the
held-out perplexity after the job at most ``quality`` (1.05) times what naive full fine-tuning reaches after the
same steps on the same batches. That reference is measured once by the same referee (``compute_reference``,
fixed batches and seed) and shipped in ``capstone_reference.json``; ``python -m helpers.capstone --reference``
rewrites it and tests/test_capstone_reference.py (slow) recomputes it. Every setup the course tried beats the
pretrained model after six steps, so a bar relative to the pretrained model would test nothing; this one fails
a setup that fits but adapts too little of the model. The exercises' grader calls ``judge`` itself, with its
own workload and reference.

What an in-process referee cannot rule out: code written to attack it (reaching its private state, or the
report it returns, through the interpreter). The batch grader runs each setup in a separate short-lived
process, so that such code reaches neither the grader nor other submissions.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import statistics
import sys
import threading
import time
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .cpu_packing import PackedWeightsError, ensure_trainable, packed_layers
from .data import Corpus, heldout_perplexity
from .estimate import Dims
from .memory import CATEGORIES, LABELS, MemoryReport, Meter, MiB, _tensors_in, unmetered, weight_tensors
from .progress import progress

# What each category's fix is, in the course's words (shown when that category busts the budget).
ADVICE = {
    "weights": "store the frozen base in 4-bit (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
               "bnb_4bit_use_double_quant=True): lessons 01 and 05) and train adapters on it",
    "gradients": "train fewer parameters: freeze the base and train LoRA adapters (lessons 02 and 04)",
    "optimizer": "train fewer parameters (LoRA, lesson 04) or keep 8-bit optimizer state "
                 "(bnb.optim.AdamW8bit, lesson 08)",
    "activations": "turn on gradient checkpointing (lesson 03) and split the batch into micro-batches with "
                   "gradient accumulation (lesson 07): the optimizer step still sees all 8 x 128 tokens; what is "
                   "left at the start of backward is mostly the loss's logits: compute the loss in chunks "
                   "(helpers.loss, lesson 10)",
}
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")  # whose modules a model may hold
FAINT = 1e-3  # a row whose gradient is below this share of the step's largest row's did not contribute
POLL = 0.01  # seconds between the referee's looks for other threads and child processes during a step


@dataclass(frozen=True)
class Workload:
    """The fixed job every setup is judged on."""

    batch_size: int = 8  # rows per optimizer step (however the step splits them)
    seq_len: int = 128
    optimizer_steps: int = 6  # optimizer steps of the short fine-tune, every one measured
    budget: int = 500 * MiB  # peak tensor bytes of a training step (the largest over all steps)
    quality: float = 1.05  # held-out perplexity after <= quality x the full fine-tune's after the same steps
    eval_chunks: int = 16  # held-out chunks of 128 tokens for perplexity
    seed: int = 0  # torch's seed when the setup is built (LoRA's random init): the same run every time

    def __post_init__(self):
        if self.optimizer_steps < 2:
            raise ValueError(f"a workload needs at least 2 steps (the first creates the optimizer's state; the steady "
                             f"state shows from the second on), got {self.optimizer_steps}")

    def batches(self, corpus: Corpus) -> list[dict]:
        """The training batches, one per step: the same for every setup."""
        return [corpus.train_batch(self.batch_size, self.seq_len, step=i) for i in range(self.optimizer_steps)]

    def job(self) -> dict:
        """What decides the training run and its perplexities (not the budget nor the bar): the reference's key."""
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "optimizer_steps": self.optimizer_steps,
                "eval_chunks": self.eval_chunks, "seed": self.seed}

    def __str__(self) -> str:
        return (f"{self.optimizer_steps} optimizer steps of {self.batch_size} x {self.seq_len} tokens; budget "
                f"{self.budget / MiB:,.0f} MiB for the peak of every step; held-out perplexity after the steps at "
                f"most {self.quality:g} x the full fine-tune's after the same steps")


WORKLOAD = Workload()  # the capstone's first tier
TIGHT_WORKLOAD = replace(WORKLOAD, budget=220 * MiB)  # the second: the same job in 220 MiB
SMALLEST_WORKLOAD = replace(WORKLOAD, budget=170 * MiB)  # the third: in 170 MiB (the loss, lesson 10, included)
TIERS = {"fit_the_budget": WORKLOAD, "fit_the_tight_budget": TIGHT_WORKLOAD,
         "fit_the_smallest_budget": SMALLEST_WORKLOAD}  # lesson 12's exercises, by name

# The reference the quality bar is relative to: naive full fine-tuning (fp32 weights, every parameter, torch's
# AdamW at FULL_FINETUNE_LR, the whole batch in one pass) run by the referee on the same job, once, with the
# job's seed. Shipped in REFERENCE_PATH (``python -m helpers.capstone --reference`` rewrites it;
# tests/test_capstone_reference.py recomputes it, marked slow).
FULL_FINETUNE_LR = 5e-5
REFERENCE_PATH = Path(__file__).with_name("capstone_reference.json")


class SetupError(ValueError):
    """The setup could not be run as the capstone asks (the message says what to change)."""


@functools.lru_cache(maxsize=1)
def course_corpus() -> Corpus:
    from .models import load_tokenizer

    return Corpus(load_tokenizer())


@functools.lru_cache(maxsize=4)
def pretrained_perplexity(eval_chunks: int = WORKLOAD.eval_chunks) -> float:
    """Held-out perplexity of the pretrained course model in fp32: the quality the target is relative to."""
    from .models import load_model

    return heldout_perplexity(load_model(), course_corpus(), max_chunks=eval_chunks)


@functools.lru_cache(maxsize=1)
def course_config():
    from transformers import AutoConfig

    from .models import resolve

    return AutoConfig.from_pretrained(resolve())


@functools.lru_cache(maxsize=1)
def course_dims() -> Dims:
    return Dims.of(course_config())


# ------------------------------------------------------------------------------------------------
# The reference run: naive full fine-tuning on the same job, measured once and shipped
# ------------------------------------------------------------------------------------------------
def naive_setup():
    """Naive full fine-tuning: the fp32 course model, every parameter trained by torch's AdamW at
    ``FULL_FINETUNE_LR``, the whole batch in one forward and backward. What the quality bar is relative to,
    and what each tier's peak is compared with; over every budget (about 3.4 GiB)."""
    from .models import load_model
    from .train import make_train_step

    model = load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=FULL_FINETUNE_LR)

    def step(batch):
        return make_train_step(model, optimizer, batch)()
    return model, optimizer, step


def compute_reference(workload: Workload = WORKLOAD) -> dict:
    """Run ``naive_setup`` through the referee on ``workload``'s job and return what REFERENCE_PATH holds
    (deterministic: the job's fixed batches and seed, and nothing random in the setup; several minutes on a
    2-core CPU, and about 4 GiB of memory)."""
    import platform

    import transformers

    run = attempt(naive_setup, workload, name="naive full fine-tune", reference=False)
    if run.problems or run.ppl_end is None:
        raise RuntimeError(f"the reference run broke a rule: {run.problems}")
    return {
        "what": WHAT,
        "how": HOW,
        "provenance": f"measured by helpers.capstone.compute_reference on {platform.machine()}, "
                      f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
                      f"transformers {transformers.__version__}",
        "job": workload.job(),
        "setup": REFERENCE_SETUP,
        "ppl_pretrained": run.ppl_start,  # the naive setup's model is the pretrained fp32 course model
        "ppl_full_finetune": run.ppl_end,
        "naive_peak": run.peak,
        "naive_peak_step": {c: int(getattr(run.report, c)) for c in CATEGORIES},
        "seconds_per_step": run.seconds_per_step,
        "trainable": run.trainable,
        "steps": run.facts()["steps"],
    }


WHAT = ("held-out perplexity of the course model after the capstone's job done by naive full fine-tuning "
        "(helpers.capstone.naive_setup) and measured by helpers.capstone.attempt: ppl_pretrained before the first "
        "step, ppl_full_finetune after the last; the quality bar of every tier is relative to ppl_full_finetune. "
        "naive_peak (bytes) is the largest step's peak, naive_peak_step its breakdown, what each tier's peak is "
        "compared with.")
HOW = ("python -m helpers.capstone --reference rewrites this file; tests/test_capstone_reference.py recomputes it "
       "and compares (marked slow)")
REFERENCE_SETUP = {"weights": "fp32", "trainable": "every parameter", "optimizer": "torch.optim.AdamW",
                   "lr": FULL_FINETUNE_LR, "gradient_accumulation_steps": 1}


@functools.lru_cache(maxsize=4)
def _shipped(workload: Workload) -> dict:
    import json

    data = json.loads(REFERENCE_PATH.read_text())
    if data.get("job") != workload.job():
        raise ValueError(f"{REFERENCE_PATH.name} was measured on the job {data.get('job')}, not {workload.job()}: "
                         "run python -m helpers.capstone --reference to measure this one")
    return data


def load_reference(workload: Workload = WORKLOAD) -> dict:
    """The judge's reference for ``workload``'s job, from the shipped file: the pretrained model's held-out
    perplexity, the full fine-tune's after the same steps, and the naive run's peak (bytes)."""
    data = _shipped(workload)
    return {"ppl_pretrained": float(data["ppl_pretrained"]), "ppl_full_finetune": float(data["ppl_full_finetune"]),
            "naive_peak": int(data["naive_peak"])}


def reference_run(workload: Workload = WORKLOAD) -> Attempt:
    """The shipped reference run as an ``Attempt``, for tables: its largest step's peak by category, the
    perplexities before and after, the time per step (``reports`` holds that one step: the file keeps the peak
    step's breakdown)."""
    data = _shipped(workload)
    return Attempt("naive: fp32 full fine-tune, AdamW", workload,
                   [MemoryReport(**{c: int(data["naive_peak_step"][c]) for c in CATEGORIES})],
                   float(data["ppl_pretrained"]), float(data["ppl_full_finetune"]), load_reference(workload), [],
                   [float(data["seconds_per_step"])], int(data["trainable"]))


# ------------------------------------------------------------------------------------------------
# The verdict: from measured facts (plain data), a budget and a reference perplexity
# ------------------------------------------------------------------------------------------------
def step_peak(step: dict) -> int:
    return sum(step[c] for c in CATEGORIES)


def judge(facts: dict, workload: Workload, reference: dict) -> tuple[bool, str]:
    """(passed, feedback) for what ``attempt`` measured (``Attempt.facts()``): the rules first, then the budget
    (the largest peak of any step), then quality, with what to change. ``workload`` and ``reference`` (the
    pretrained model's perplexity, the full fine-tune's after the same steps, the naive run's peak: see
    ``load_reference``) are the judge's own: the grader passes the lesson's, never numbers the setup's process
    reported."""
    if facts.get("error"):
        return False, facts["error"]
    ppl_pretrained, full = reference["ppl_pretrained"], reference["ppl_full_finetune"]
    problems = list(facts["problems"])
    steps = facts["steps"]
    if facts["ppl_start"] < 0.97 * ppl_pretrained:
        problems.insert(0, f"your model scores a held-out perplexity of {facts['ppl_start']:.2f} before its first "
                           f"step, below the pretrained model's {ppl_pretrained:.2f}: the capstone starts from the "
                           "pretrained course model and trains only inside step(batch).")
    if not problems and (len(steps) != workload.optimizer_steps or facts["ppl_end"] is None):
        problems.append(f"the run ended after {len(steps)} of the job's {workload.optimizer_steps} steps.")
    if problems:
        return False, " ".join(problems)
    if not math.isfinite(facts["ppl_end"]):
        return False, (f"the held-out perplexity after the run is {facts['ppl_end']}: the training diverged. Lower the "
                       "learning rate (adapters take about 1e-3, full fine-tuning about 5e-5), or compute in fp32.")
    worst = max(range(len(steps)), key=lambda i: step_peak(steps[i]))
    report = MemoryReport(**{c: steps[worst][c] for c in CATEGORIES})
    target = workload.quality * full
    summary = (f"peak {report.peak / MiB:,.1f} MiB of the {workload.budget / MiB:,.0f} MiB budget "
               f"({reference['naive_peak'] / report.peak:.1f} x smaller than naive fp32 AdamW full fine-tuning's "
               f"{reference['naive_peak'] / MiB:,.0f} MiB), in step {worst + 1} of {len(steps)}, every step measured "
               f"({_breakdown(report)}); held-out perplexity {facts['ppl_start']:.2f} -> {facts['ppl_end']:.2f} after "
               f"{len(steps)} steps, {facts['ppl_end'] / full:.3f} x the full fine-tune's {full:.2f} after the same "
               f"steps (at most {workload.quality:g} x = {target:.2f}); {facts['seconds_per_step']:.1f} s per step.")
    if report.peak > workload.budget:
        over = (report.peak - workload.budget) / MiB
        return False, f"{summary} Over budget by {over:,.1f} MiB. {over_budget_advice(report, workload.budget)}"
    if facts["ppl_end"] > target:
        return False, (f"{summary} It fits, but it did not learn enough: give LoRA more of the model to adapt (more "
                       "target modules, or a higher rank), let the adapters learn faster (a larger lora_alpha: their "
                       "update is scaled by alpha / r, lesson 04; or a higher learning rate: adapters take about 1e-3 "
                       "to 4e-3, full fine-tuning about 5e-5), or keep more precision in the base (int8 loses less "
                       "than nf4).")
    return True, summary


@dataclass
class Attempt:
    """What ``attempt`` measured for one setup."""

    name: str
    workload: Workload
    reports: list[MemoryReport]  # every step's peak by category, in order (the run stops at a broken rule)
    ppl_start: float  # held-out perplexity of the built model, before any step
    ppl_end: float | None  # ... after the last step (None when a broken rule ended the run)
    reference: dict | None  # the judge's reference (``load_reference``; None when not loaded: the grader has its own)
    losses: list[float]
    seconds: list[float]  # wall time of every step, the meter's bookkeeping included
    trainable: int  # trainable parameters
    problems: list[str] = field(default_factory=list)  # why the run does not count, if it does not

    @property
    def report(self) -> MemoryReport:
        """The step with the largest peak (its breakdown): what the budget is compared with."""
        return max(self.reports, key=lambda r: r.peak, default=MemoryReport())

    @property
    def peak(self) -> int:
        return self.report.peak

    @property
    def seconds_per_step(self) -> float:
        """Median wall time of the steps after the first (the first also allocates the optimizer's state)."""
        later = self.seconds[1:] or self.seconds
        return statistics.median(later) if later else math.nan

    @property
    def fits(self) -> bool:
        return self.peak <= self.workload.budget

    @property
    def target(self) -> float:
        return self.workload.quality * self.reference["ppl_full_finetune"]

    def facts(self) -> dict:
        """What was measured, as plain data (what the exercise's grader judges)."""
        return {"steps": [{**{c: int(getattr(r, c)) for c in CATEGORIES}, "seconds": float(s)}
                          for r, s in zip(self.reports, self.seconds, strict=False)],
                "ppl_start": float(self.ppl_start),
                "ppl_end": None if self.ppl_end is None else float(self.ppl_end),
                "seconds_per_step": float(self.seconds_per_step) if self.seconds else 0.0,
                "losses": [float(x) if math.isfinite(x) else None for x in self.losses],
                "trainable": int(self.trainable),
                "problems": [str(p) for p in self.problems]}

    def verdict(self) -> tuple[bool, str]:
        """(passed, feedback): the rules first, then the budget, then quality, with what to change."""
        if self.reference is None:
            raise ValueError("this attempt did not load the reference: use judge(facts, workload, reference)")
        return judge(self.facts(), self.workload, self.reference)

    def tier_row(self) -> dict:
        """Peak, the ratio to naive full fine-tuning's, perplexity against the bar, time: one row per tier."""
        naive, full = self.reference["naive_peak"], self.reference["ppl_full_finetune"]
        return {"peak MiB": self.peak / MiB, "naive / peak (x)": naive / self.peak,
                "perplexity after": self.ppl_end, "/ full fine-tune's (x)": (self.ppl_end or math.nan) / full,
                "/ pretrained (x)": (self.ppl_end or math.nan) / self.reference["ppl_pretrained"],
                "s per step": self.seconds_per_step}


def _breakdown(report: MemoryReport) -> str:
    return ", ".join(f"{LABELS[c]} {getattr(report, c) / MiB:,.1f}" for c in CATEGORIES)


def over_budget_advice(report: MemoryReport, budget: int) -> str:
    """Which categories bust ``budget`` and what to do about each, largest first.

    A category is named when it is at least a tenth of the budget; one that alone is larger than the
    budget, or larger than the overshoot (removing it would fit), is said to be so.
    """
    over = report.peak - budget
    lines = []
    for c in sorted(CATEGORIES, key=lambda c: -getattr(report, c)):
        size = getattr(report, c)
        if size < budget / 10:
            continue
        why = ("on its own more than the whole budget" if size > budget else
               "larger than the overshoot" if size >= over else "a large share")
        lines.append(f"{LABELS[c]} {size / MiB:,.1f} MiB ({why}): {ADVICE[c]}")
    return "Where it goes: " + "; ".join(lines) + "."


# ------------------------------------------------------------------------------------------------
# The referee's checks
# ------------------------------------------------------------------------------------------------
def _root(module_name) -> str:
    return str(module_name or "").partition(".")[0]


def _library_function(fn) -> bool:
    """Is ``fn`` (a function, bound method or partial) defined in one of the LIBRARIES?"""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return _root(getattr(fn, "__module__", None)) in LIBRARIES


def _foreign_code(model: torch.nn.Module, referee=()) -> str | None:
    """What in ``model`` is not the libraries' own code (a module class, a forward, a hook), or None.
    ``referee``: the referee's own hooks."""
    ours = {id(h) for h in referee}
    hook_tables = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    for name, m in torch.nn.Module.named_modules(model):
        where = f"`{name or 'the model'}`"
        kind = type(m)
        if _root(kind.__module__) not in LIBRARIES:
            return f"{where} is a {kind.__qualname__} of your own"
        if not _library_function(getattr(kind, "forward", None)):
            return f"{where}'s class {kind.__qualname__} has a forward of your own"
        attrs = vars(m)
        if "forward" in attrs and not _library_function(attrs["forward"]):
            return f"{where} has a forward of your own"
        for table in hook_tables:
            for hook in (attrs.get(table) or {}).values():
                if id(hook) not in ours and not _library_function(hook):
                    return f"{where} has a hook of your own ({getattr(hook, '__name__', type(hook).__name__)})"
    for table in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                  "_global_backward_pre_hooks"):
        for hook in getattr(torch.nn.modules.module, table, {}).values():
            if not _library_function(hook):
                return f"a global module hook of your own ({getattr(hook, '__name__', type(hook).__name__)})"
    return None


def _course_parts(model: torch.nn.Module, dims: Dims):
    """(embedding, decoder blocks, output layer) of the course model inside ``model``, or SetupError."""
    from transformers import PreTrainedModel

    base = next((m for m in torch.nn.Module.modules(model) if isinstance(m, PreTrainedModel)), None)
    config = vars(base).get("config") if base is not None else None
    if config is None or type(config) is not type(course_config()) or Dims.of(config) != dims:
        raise SetupError("the model is not the course model (its config differs): load it with "
                         "helpers.models.load_model(...), quantized or not.")
    blocks = next((m for m in torch.nn.Module.modules(base)
                   if type(m) is torch.nn.ModuleList and len(m) == dims.layers), None)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    shape = tuple(getattr(getattr(embedding, "weight", None), "shape", ()))
    if blocks is None or not isinstance(head, torch.nn.Module) or shape != (dims.vocab, dims.hidden):
        raise SetupError("the model is not the course model (its embedding or its decoder blocks differ): load "
                         "it with helpers.models.load_model(...), quantized or not.")
    return embedding, list(blocks), head


def _same_parts(model, dims: Dims, parts) -> bool:
    try:
        now = _course_parts(model, dims)
    except SetupError:
        return False
    return (now[0] is parts[0] and now[2] is parts[2] and len(now[1]) == len(parts[1])
            and all(a is b for a, b in zip(now[1], parts[1], strict=True)))


def _fingerprint(params: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """A cheap summary of every trainable tensor (sum and norm, in float64): it changes when the tensor does."""
    out = {}
    with torch.no_grad(), unmetered():
        for name, p in params.items():
            t = torch.Tensor.detach(p)
            out[name] = (float(t.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(t.float())))
    return out


def _shared_tensors(model, optimizer) -> list[str]:
    """Tensors of the model or optimizer in shared memory (another process could change them)."""
    found = []
    for kind, tensors in (("weights", weight_tensors(model)), ("optimizer state", _state_tensors(optimizer))):
        for t in tensors:
            storage = t.untyped_storage()
            if storage.device.type == "cpu" and storage.is_shared():
                found.append(kind)
                break
    return found


def _state_tensors(optimizer):
    state = vars(optimizer).get("state")
    return _tensors_in(list(dict.values(state))) if isinstance(state, dict) else []


def _code_snapshot() -> dict:
    """The referee's functions and classes, their code and their members: the setup must leave them as they are."""
    snap = {}
    for mod_name in ("helpers.memory", "helpers.capstone", "helpers.cpu_packing", "helpers.data",
                     "torch.utils._python_dispatch"):
        mod = sys.modules.get(mod_name)
        for attr, value in list(vars(mod).items()) if mod else []:
            if isinstance(value, types.FunctionType):
                snap[(mod_name, attr)] = ((value, value.__code__), ())
            elif isinstance(value, type) and value.__module__ == mod_name:
                members = dict(vars(value))
                snap[(mod_name, attr)] = ((value, *members.values()), tuple(members))
                for key, member in members.items():
                    fn = getattr(member, "__func__", getattr(member, "fget", member))
                    if isinstance(fn, types.FunctionType):
                        snap[(mod_name, attr, key)] = ((fn, fn.__code__), ())
            elif callable(value):
                snap[(mod_name, attr)] = ((value,), ())
    return snap


def _changed(snapshot: dict) -> str | None:
    """The first of the referee's names whose object, code or members differ from ``snapshot``'s, or None."""
    now = _code_snapshot()
    for key, (objects, names) in snapshot.items():
        after = now.get(key)
        if (after is None or after[1] != names or len(after[0]) != len(objects)
                or any(a is not b for a, b in zip(after[0], objects, strict=True))):
            return ".".join(key)
    return None


def _number(x) -> float:
    """A loss as a float, without calling the setup's code (anything else: nan)."""
    if type(x) in (int, float):
        return float(x)
    if type(x) in (torch.Tensor, torch.nn.Parameter) and torch._C.TensorBase.numel(x) == 1:
        return float(torch._C.TensorBase.item(torch._C.TensorBase.detach(x)))
    return math.nan


def _children() -> set[int]:
    """Child processes of this process (all its threads'), read from /proc."""
    found = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                found.update(int(pid) for pid in f.read().split())
    except OSError:
        pass
    return found


def _descendants() -> set[int]:
    try:
        import psutil

        return {p.pid for p in psutil.Process().children(recursive=True)}
    except Exception:  # psutil missing, or a process vanished while it was read
        return _children()


_WATCH: list = []  # the watch of the step now running (os.register_at_fork reports forks to it)


def _on_fork() -> None:
    for watch in _WATCH:
        watch.forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_on_fork)


class _Watch:
    """During one step, looks every POLL seconds for Python threads and child processes that are not the
    referee's, and counts forks; ``allowed``: thread ids alive before the setup was built."""

    def __init__(self, allowed: set[int], children: set[int]):
        self.allowed, self.old_children = set(allowed), set(children)
        self.threads: dict[int, str] = {}
        self.processes: set[int] = set()
        self.forks = 0
        self.engine: set[int] = set()  # autograd's own device threads (they run the referee's hooks on a GPU)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capstone-referee", daemon=True)

    def _look(self) -> None:
        names = {t.ident: t for t in threading.enumerate()}
        for ident in sys._current_frames():
            if ident not in self.allowed and ident != self._thread.ident:
                thread = names.get(ident)
                if type(thread).__module__ == "tqdm._monitor":  # tqdm's own progress-bar monitor
                    continue
                self.threads.setdefault(ident, thread.name if thread is not None else f"thread {ident}")
        self.processes |= _children() - self.old_children

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            self._look()

    def __enter__(self):
        _WATCH.append(self)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        _WATCH.remove(self)
        self._look()
        self.processes |= _descendants() - self.old_children
        return False

    def problems(self, i: int) -> list[str]:
        out = []
        others = [name for ident, name in self.threads.items() if ident not in self.engine]
        if others:
            out.append(f"step {i} ran Python code in {len(others)} other thread(s) ({others[0]}): the referee "
                       "measures only the thread that calls step(batch), so a step must do all its work there.")
        if self.processes or self.forks:
            out.append(f"step {i} started other processes ({len(self.processes)} seen, {self.forks} fork(s)): "
                       "the referee measures only this process, so a step must do all its work in it.")
        return out


class _Rows:
    """Which rows of a step's batch went through the whole model with gradients on, and got one back.

    A *pass* starts at the input embedding (its input ids are the rows); the referee hooks the embedding's
    output, every decoder block's output and the output layer's input, and records each row's gradient norm
    there. A row counts when, in some pass of the step, every one of those points that required grad gave it
    a gradient of at least ``FAINT`` times the step's largest, the output layer's input among them, and every
    decoder block ran.
    """

    def __init__(self, embedding, blocks, head, meter_on, main: int, watch_engine):
        self.passes: list[dict] = []
        self.current: dict | None = None
        self.active = False
        self.hidden: list[str] = []  # where the model ran out of the meter's sight
        self.meter_on, self.main, self.engine = meter_on, main, watch_engine
        self.hooks = [self._embedded, *(functools.partial(self._block, k) for k in range(len(blocks))), self._head]
        self.handles = [embedding.register_forward_hook(self.hooks[0], with_kwargs=True)]
        self.handles += [b.register_forward_hook(h) for b, h in zip(blocks, self.hooks[1:-1], strict=True)]
        self.handles.append(head.register_forward_pre_hook(self.hooks[-1]))
        self.blocks = len(blocks)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def start(self) -> None:
        self.passes, self.current, self.active, self.hidden = [], None, True, []

    def _sighted(self, where: str, backward: bool) -> None:
        if not self.meter_on():
            self.hidden.append(f"{where} ran with the memory meter switched off (torch's dispatch modes disabled, "
                               "or another thread)")
        elif not backward and threading.get_ident() != self.main:
            self.hidden.append(f"{where} ran in another thread")
        elif backward and threading.get_ident() != self.main:
            self.engine(threading.get_ident())

    def _watch(self, tensor, slot, record) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled():
            record["required"].add(slot)
            tensor.register_hook(functools.partial(self._gradient, slot, record))

    def _gradient(self, slot, record, grad) -> None:
        self._sighted("the backward pass", backward=True)
        with unmetered(), torch.no_grad():
            rows = grad.shape[0] if grad.dim() > 1 else 0
            if rows != record["rows"]:
                return
            norms = torch.linalg.vector_norm(grad.detach().reshape(rows, -1).float(), dim=1).cpu()
            old = record["norms"].get(slot)
            record["norms"][slot] = norms if old is None else torch.maximum(old, norms)

    def _embedded(self, _module, args, kwargs, output) -> None:
        if not self.active:
            return
        ids = args[0] if args else kwargs.get("input")
        if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.dim() == 2):
            return
        self._sighted("the model's forward", backward=torch._C._current_graph_task_id() != -1)
        with unmetered():
            record = {"ids": ids.detach().cpu().clone(), "rows": ids.shape[0], "seen": set(), "required": set(),
                      "norms": {}}
        self.passes.append(record)
        self.current = record
        self._watch(output, "embedding", record)

    def _block(self, k, _module, _args, output) -> None:
        if self.active and self.current is not None:
            self.current["seen"].add(k)
            self._watch(output[0] if isinstance(output, tuple) else output, f"block {k}", self.current)

    def _head(self, _module, args) -> None:
        if self.active and self.current is not None and args:
            self.current["seen"].add("head")
            self._watch(args[0], "head", self.current)

    def verdict(self, i: int, batch_ids: torch.Tensor, batch_size: int, seq_len: int) -> list[str]:
        self.active = False
        if self.hidden:
            return [f"in step {i} {self.hidden[0]}: the referee measures only what runs in the thread that calls "
                    "step(batch), with its meter on, so the step's memory could not be measured."]
        largest = {}
        for record in self.passes:
            for slot, norms in record["norms"].items():
                finite = norms[torch.isfinite(norms)]
                if len(finite):
                    largest[slot] = max(largest.get(slot, 0.0), float(finite.max()))
        read, counted = set(), set()
        for record in self.passes:
            full = set(range(self.blocks)) <= record["seen"] and "head" in record["required"]
            for j, row in enumerate(record["ids"].tolist()):
                key = tuple(row)
                read.add(key)
                if full and all(slot in record["norms"] and not float(record["norms"][slot][j])
                                <= FAINT * largest.get(slot, 0.0) for slot in record["required"]):
                    counted.add(key)
        rows = [tuple(r) for r in batch_ids.tolist()]
        skipped = sum(r not in read for r in rows)
        if skipped:
            tokens = sum(r["ids"].numel() for r in self.passes)
            return [f"step {i} fed the model {tokens:,} tokens but skipped {skipped} of the batch's {len(rows)} rows: "
                    f"the workload is fixed at {batch_size} x {seq_len} tokens per optimizer step (split it into "
                    "micro-batches with gradient accumulation instead of dropping rows)."]
        silent = sum(r not in counted for r in rows)
        if silent:
            return [f"in step {i}, {silent} of the batch's {len(rows)} rows went through the model but did not "
                    "contribute to the gradients (read without gradients, e.g. in a no-grad or eval pass, or with "
                    "their loss multiplied away): every row of every batch must be trained on, through the whole "
                    "model's forward and backward."]
        return []


# ------------------------------------------------------------------------------------------------
# The referee
# ------------------------------------------------------------------------------------------------
def _learner(what: str, fn, *args):
    """Call the setup's code; anything it raises (SystemExit included) becomes a SetupError that says so."""
    try:
        return fn(*args)
    except PackedWeightsError as err:  # helpers.train refuses to train a packed model
        raise SetupError(f"the run cannot count: {err}") from None
    except BaseException as err:  # noqa: BLE001 (SystemExit, KeyboardInterrupt...: feedback, not an escape)
        raise SetupError(f"{what} raised {type(err).__name__}: {str(err)[:300]}") from None


def _unpack(built):
    if isinstance(built, (tuple, list)):
        items = list(tuple.__iter__(built) if isinstance(built, tuple) else list.__iter__(built))
        if len(items) == 3 and callable(items[2]):
            return items
    raise SetupError("your function must return three things: (model, optimizer, step), where step(batch) "
                     "runs one optimizer step on the whole batch.")


def attempt(setup, workload: Workload = WORKLOAD, name: str | None = None, reference: bool = True) -> Attempt:
    """Build ``setup()`` -> (model, optimizer, step), run the workload, and measure it (see the module text).

    Raises ``SetupError`` when the setup cannot be run as asked (its code raised, wrong return value, not
    the course model, no trainable parameter, 4-bit layers already packed for CPU inference); a run that
    breaks a rule returns an ``Attempt`` whose ``problems`` say why it does not count (the run stops at the
    first step that broke one). ``reference=False`` skips measuring the pretrained model (``verdict`` then
    needs the grader's: ``judge``).
    """
    if not callable(setup):
        raise SetupError(f"the answer must be a function that builds (model, optimizer, step); got "
                         f"{type(setup).__name__}.")
    # Everything the referee needs is built before the setup runs, and kept where the setup does not reach it.
    corpus = copy.deepcopy(course_corpus())
    batches = workload.batches(corpus)
    expected = [b["input_ids"].clone() for b in batches]
    judged_against = load_reference(workload) if reference else None
    dims = course_dims()
    code = _code_snapshot()
    threads_before = set(sys._current_frames())
    children_before = _children()

    torch.manual_seed(workload.seed)  # LoRA's random init: the same run every time
    model, optimizer, step = _unpack(_learner("your function", setup))
    if not isinstance(model, torch.nn.Module):
        raise SetupError("the first thing returned must be the model (a torch.nn.Module); got "
                         f"{type(model).__name__}.")
    embedding, blocks, head = _course_parts(model, dims)
    foreign = _foreign_code(model)
    if foreign:
        raise SetupError(f"the model must be the course model as torch, transformers, peft and bitsandbytes build "
                         f"it, running their own code: {foreign}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SetupError("the second thing returned must be the optimizer (a torch.optim.Optimizer, such as "
                         f"torch.optim.AdamW or bnb.optim.AdamW8bit); got {type(optimizer).__name__}.")
    trainable = {n: p for n, p in torch.nn.Module.named_parameters(model) if p.requires_grad}
    if not trainable:
        raise SetupError("no parameter of the model requires grad: nothing can learn. Did you forget "
                         "get_peft_model, or freeze everything?")
    try:
        ensure_trainable(model)  # and the referee's own evaluation below must not pack it either
    except PackedWeightsError as err:
        raise SetupError(f"the run cannot count: {err}") from None
    shared = _shared_tensors(model, optimizer)
    if shared:
        raise SetupError(f"the model's {shared[0]} are in shared memory, where another process could train them: "
                         "keep the model in this process's own memory (no share_memory_()).")
    problems = []
    ppl_start = heldout_perplexity(model, corpus, max_chunks=workload.eval_chunks)

    learned: set[str] = set()  # trainable tensors that got a non-zero gradient at least once
    meter: list[Meter] = []  # the meter of the step now running
    main = threading.get_ident()

    def meter_on() -> bool:
        return bool(meter) and meter[0].tracker in _get_current_dispatch_mode_stack()

    engine: set[int] = set()
    rows = _Rows(embedding, blocks, head, meter_on, main, engine.add)

    def got_gradient(name):
        def hook(p):
            rows._sighted("the backward pass", backward=True)
            if name not in learned and p.grad is not None:
                with unmetered():  # the referee's check is not part of the learner's peak
                    if p.grad.any():
                        learned.add(name)
        return hook

    def before_optimizer_step(*_):
        if not meter_on():
            rows.hidden.append("the optimizer step ran with the memory meter switched off")
        elif threading.get_ident() != main:
            rows.hidden.append("the optimizer step ran in another thread")

    hooks = [p.register_post_accumulate_grad_hook(got_gradient(n)) for n, p in trainable.items()]
    hooks.append(torch.optim.Optimizer.register_step_pre_hook(optimizer, before_optimizer_step))
    start = _fingerprint(trainable)
    moved: set[str] = set()
    reports, losses, seconds = [], [], []
    # Steps done and time left in a live notebook (helpers.progress): the progress bar is drawn between steps,
    # never inside the measured block, and holds no tensor.
    bar = progress(total=workload.optimizer_steps, unit="step",
                   desc=name or (setup.__name__ if isinstance(setup, types.FunctionType) else "setup"))
    try:
        for i, (batch, ids) in enumerate(zip(batches, expected, strict=True), start=1):
            before = _fingerprint(trainable)
            rows.start()
            watch = _Watch(threads_before, children_before)
            with watch:
                meter[:] = [Meter(model, optimizer)]
                t0 = time.perf_counter()
                with meter[0]:
                    loss = _learner(f"step {i}", step, batch)
                seconds.append(time.perf_counter() - t0)
            reports.append(meter[0].report)
            meter.clear()
            losses.append(_number(loss))
            watch.engine |= engine
            after = _fingerprint(trainable)
            moved |= {n for n in trainable if after[n] != start[n]}
            packed = packed_layers(model)
            step_problems = [f"{len(packed)} 4-bit layers (e.g. {packed[0]}) were packed for CPU inference during the "
                             f"run (step {i}: an eval-mode forward without gradients with support_avx512bf16_for_cpu "
                             "switched back on): that layout has no backward, so nothing below them learns."
                             ] if packed else []
            if not step_problems and not _same_parts(model, dims, (embedding, blocks, head)):
                step_problems.append(f"after step {i} the model is no longer the one your function built: its "
                                     "embedding, decoder blocks or output layer were replaced or removed.")
            step_problems = step_problems or (rows.verdict(i, ids, workload.batch_size, workload.seq_len)
                                              + watch.problems(i))
            if not step_problems and after == before:
                step_problems.append(f"step {i} did not change the trainable weights: a step must end with the "
                                     "optimizer's update (optimizer.step()).")
            changed = _changed(code)
            if changed:
                step_problems.append(f"the setup changed the referee's own code ({changed}) during step {i}: the "
                                     "run cannot count.")
            foreign = _foreign_code(model, rows.hooks)
            if foreign:
                step_problems.append(f"after step {i} the model is no longer the libraries' own code: {foreign}.")
            shared = _shared_tensors(model, optimizer)
            if shared:
                step_problems.append(f"after step {i} the model's {shared[0]} are in shared memory, where another "
                                     "process could train them.")
            if step_problems:
                problems += step_problems
                break
            bar.update()
    finally:
        rows.remove()
        for hook in hooks:
            hook.remove()
        bar.close()
    if not problems:
        silent = [n for n in trainable if n not in learned]
        if silent:
            problems.append(f"{len(silent)} of the model's {len(trainable)} trainable tensors (e.g. {silent[0]}) got "
                            f"no gradient, or only zeros, in all {workload.optimizer_steps} steps: they cannot learn. "
                            "Look for 4-bit weights packed for CPU inference (no backward; helpers.cpu_packing), "
                            "parameters the forward never uses, or a learning rate of 0 (LoRA's B then stays zero, and "
                            "so does A's gradient); freeze what should not train.")
    if not problems:
        still = [n for n in trainable if n not in moved]
        if still:
            problems.append(f"{len(still)} of the model's {len(trainable)} trainable tensors (e.g. {still[0]}) got "
                            f"gradients but never changed in {workload.optimizer_steps} steps: give the optimizer "
                            "every trainable parameter, or freeze the ones it should not train.")
    ppl_end = None if problems else heldout_perplexity(model, corpus, max_chunks=workload.eval_chunks)
    name = name or (setup.__name__ if isinstance(setup, types.FunctionType) else "setup")
    return Attempt(name, workload, reports, ppl_start, ppl_end,
                   judged_against, losses, seconds, sum(p.numel() for p in trainable.values()), problems)


def main(argv=None) -> int:
    """``python -m helpers.capstone --reference``: measure the reference run and write REFERENCE_PATH."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m helpers.capstone", description=main.__doc__)
    parser.add_argument("--reference", action="store_true", help="measure the full fine-tune and write the file")
    parser.add_argument("--out", default=str(REFERENCE_PATH))
    args = parser.parse_args(argv)
    if not args.reference:
        parser.print_help()
        return 2
    data = compute_reference(WORKLOAD)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"{args.out}: full fine-tune held-out perplexity {data['ppl_pretrained']:.3f} -> "
          f"{data['ppl_full_finetune']:.3f}; naive peak {data['naive_peak'] / MiB:,.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
