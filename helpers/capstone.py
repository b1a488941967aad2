"""Lesson 10's capstone: fit a real fine-tune of the course model into a memory budget, and prove it.

    def my_recipe():                       # builds everything from scratch, trains nothing yet
        model = ...                        # the course model, loaded however you like
        optimizer = ...
        def step(batch):                   # one optimizer step on the whole 8 x 128 batch
            ...
        return model, optimizer, step

    result = attempt(my_recipe)            # runs the workload; measures; evaluates
    result.verdict()                       # (passed, feedback)

``attempt`` is the referee. It builds the recipe, checks the model is the course model, starts
untrained, and has no 4-bit layer packed for CPU inference (that layout has no backward:
``helpers.cpu_packing``), then runs ``WORKLOAD.steps`` optimizer steps on the same fixed batches for
every recipe: the first is a warm-up (it allocates the optimizer state), the second is measured with
``helpers.memory.measure`` (exact tensor bytes by category), a hook on the input embedding checks that
every row of every batch really went through the model, and a hook on every trainable tensor checks
that it got a non-zero gradient in some step. Held-out perplexity is measured before the first step
and after the last one.

A recipe passes when the measured peak is within ``budget`` and the held-out perplexity after the
fine-tune is at most ``quality`` times the pretrained fp32 model's (so the fine-tune must learn
something real, and a 4-bit base must more than make up what quantization cost).
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field

import torch

from .cpu_packing import PackedWeightsError, ensure_trainable, packed_layers
from .data import Corpus, heldout_perplexity
from .estimate import Dims
from .memory import CATEGORIES, LABELS, MemoryReport, MiB, measure, unmetered

# What each category's fix is, in the course's words (shown when that category busts the budget).
ADVICE = {
    "weights": "store the frozen base in 4-bit (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
               "bnb_4bit_use_double_quant=True): lessons 01 and 05) and train adapters on it",
    "gradients": "train fewer parameters: freeze the base and train LoRA adapters (lessons 02 and 04)",
    "optimizer": "train fewer parameters (LoRA, lesson 04) or keep 8-bit optimizer state "
                 "(bnb.optim.AdamW8bit, lesson 08)",
    "activations": "turn on gradient checkpointing (lesson 03) and split the batch into micro-batches with "
                   "gradient accumulation (lesson 07): the optimizer step still sees all 8 x 128 tokens",
}


@dataclass(frozen=True)
class Workload:
    """The fixed job every recipe is judged on."""

    batch_size: int = 8  # rows per optimizer step (however the step splits them)
    seq_len: int = 128
    steps: int = 6  # optimizer steps of the short fine-tune
    budget: int = 500 * MiB  # peak tensor bytes of one training step
    quality: float = 0.9  # held-out perplexity after <= quality x the pretrained fp32 model's
    eval_chunks: int = 16  # held-out chunks of 128 tokens for perplexity

    def __post_init__(self):
        if self.steps < 2:
            raise ValueError(f"a workload needs at least 2 steps (a warm-up, then the measured one), got {self.steps}")

    def batches(self, corpus: Corpus) -> list[dict]:
        """The training batches, one per step: the same for every recipe."""
        return [corpus.train_batch(self.batch_size, self.seq_len, step=i) for i in range(self.steps)]

    def __str__(self) -> str:
        return (f"{self.steps} optimizer steps of {self.batch_size} x {self.seq_len} tokens; budget "
                f"{self.budget / MiB:,.0f} MiB for one step's peak; held-out perplexity at most {self.quality:g} x "
                f"the pretrained model's")


WORKLOAD = Workload()


class RecipeError(ValueError):
    """The recipe could not be run as the capstone asks (the message says what to change)."""


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
def course_dims() -> Dims:
    from transformers import AutoConfig

    from .models import resolve

    return Dims.of(AutoConfig.from_pretrained(resolve()))


@dataclass
class Attempt:
    """What ``attempt`` measured for one recipe."""

    name: str
    workload: Workload
    report: MemoryReport  # the measured step's peak by category
    ppl_start: float  # held-out perplexity of the built model, before any step
    ppl_end: float  # ... after the last step
    ppl_pretrained: float  # the pretrained fp32 course model's (the target is relative to it)
    losses: list[float]
    seconds_per_step: float  # median of the unmeasured steps after the warm-up
    trainable: int  # trainable parameters
    problems: list[str] = field(default_factory=list)  # why the run does not count, if it does not

    @property
    def peak(self) -> int:
        return self.report.peak

    @property
    def fits(self) -> bool:
        return self.peak <= self.workload.budget

    @property
    def target(self) -> float:
        return self.workload.quality * self.ppl_pretrained

    @property
    def good_enough(self) -> bool:
        return self.ppl_end <= self.target

    def verdict(self) -> tuple[bool, str]:
        """(passed, feedback): the budget first, then quality, with what to change."""
        if self.problems:
            return False, " ".join(self.problems)
        w, r = self.workload, self.report
        summary = (f"peak {r.peak / MiB:,.1f} MiB of the {w.budget / MiB:,.0f} MiB budget ({_breakdown(r)}); "
                   f"held-out perplexity {self.ppl_start:.2f} -> {self.ppl_end:.2f} after {w.steps} steps "
                   f"(target {self.target:.2f} = {w.quality:g} x the pretrained model's {self.ppl_pretrained:.2f}); "
                   f"{self.seconds_per_step:.1f} s per step.")
        if not self.fits:
            over = (r.peak - w.budget) / MiB
            return False, f"{summary} Over budget by {over:,.1f} MiB. {over_budget_advice(r, w.budget)}"
        if not self.good_enough:
            return False, (f"{summary} It fits, but the model did not learn enough: raise the learning rate (adapters "
                           "take about 1e-3, full fine-tuning about 5e-5), give LoRA more targets or rank, or keep "
                           "more precision in the base (int8 loses less than nf4).")
        return True, summary

    def row(self) -> dict:
        """One row of a comparison table (MiB, perplexity, seconds)."""
        return {**{f"{LABELS[c]} MiB": getattr(self.report, c) / MiB for c in CATEGORIES},
                "peak MiB": self.peak / MiB, "trainable parameters": self.trainable,
                "perplexity before": self.ppl_start, "perplexity after": self.ppl_end,
                "s per step": self.seconds_per_step, "fits": self.fits, "quality met": self.good_enough}


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


def attempt(recipe, workload: Workload = WORKLOAD, name: str | None = None) -> Attempt:
    """Build ``recipe()`` -> (model, optimizer, step), run the workload, and measure it (see the module text).

    Raises ``RecipeError`` when the recipe cannot be run as asked (wrong return value, not the course
    model, no trainable parameter, 4-bit layers already packed for CPU inference); a run that breaks a rule
    (rows skipped, a model trained before its first step, a trainable tensor that never got a gradient,
    layers packed during the run) returns an ``Attempt`` whose ``problems`` say why it does not count.
    """
    if not callable(recipe):
        raise RecipeError(f"the answer must be a function that builds (model, optimizer, step); got "
                          f"{type(recipe).__name__}.")
    built = recipe()
    if not (isinstance(built, tuple) and len(built) == 3 and callable(built[2])):
        raise RecipeError("your function must return three things: (model, optimizer, step), where step(batch) "
                          "runs one optimizer step on the whole batch.")
    model, optimizer, step = built
    if not isinstance(model, torch.nn.Module):
        raise RecipeError("the first thing returned must be the model (a torch.nn.Module); got "
                          f"{type(model).__name__}.")
    dims = Dims.of(model.config) if hasattr(model, "config") else None
    if dims != course_dims():
        raise RecipeError("the model is not the course model (its config differs): load it with "
                          "helpers.models.load_model(...), quantized or not.")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise RecipeError("no parameter of the model requires grad: nothing can learn. Did you forget "
                          "get_peft_model, or freeze everything?")
    try:
        ensure_trainable(model)  # and the referee's own evaluation below must not pack it either
    except PackedWeightsError as err:
        raise RecipeError(f"the run cannot count: {err}") from None
    corpus = course_corpus()
    reference = pretrained_perplexity(workload.eval_chunks)
    problems = []
    ppl_start = heldout_perplexity(model, corpus, max_chunks=workload.eval_chunks)
    if ppl_start < 0.97 * reference:
        problems.append(f"your model scores a held-out perplexity of {ppl_start:.2f} before its first step, below "
                        f"the pretrained model's {reference:.2f}: the capstone starts from the pretrained course model "
                        "and trains only inside step(batch).")
    seen: list[torch.Tensor] = []

    def record(_module, args, kwargs):  # every row the model reads, in whichever micro-batch it comes
        ids = args[0] if args else kwargs.get("input")
        if isinstance(ids, torch.Tensor) and ids.dtype == torch.long:
            seen.append(ids.detach().reshape(-1, ids.shape[-1]).cpu())

    learned: set[str] = set()  # trainable tensors that got a non-zero gradient at least once

    def got_gradient(name):
        def hook(p):
            if name not in learned and p.grad is not None:
                with unmetered():  # the referee's check is not part of the learner's peak
                    if p.grad.any():
                        learned.add(name)
        return hook

    hooks = [model.get_input_embeddings().register_forward_pre_hook(record, with_kwargs=True)]
    hooks += [p.register_post_accumulate_grad_hook(got_gradient(name)) for name, p in trainable.items()]
    losses, times, report = [], [], None
    try:
        for i, batch in enumerate(workload.batches(corpus)):
            seen.clear()
            start = time.perf_counter()
            if i == 1:
                report = measure(lambda b=batch: step(b), model=model, optimizer=optimizer)
                loss = report.result
            else:
                loss = step(batch)
            elapsed = time.perf_counter() - start
            if i >= 2:
                times.append(elapsed)
            losses.append(float(loss) if isinstance(loss, (int, float, torch.Tensor)) else float("nan"))
            missing = _missing_rows(batch["input_ids"], seen)
            if missing and not problems:
                problems.append(f"step {i} fed the model {sum(t.numel() for t in seen):,} tokens but skipped "
                                f"{missing} of the batch's {len(batch['input_ids'])} rows: the workload is fixed at "
                                f"{workload.batch_size} x {workload.seq_len} tokens per optimizer step (split it into "
                                "micro-batches with gradient accumulation instead of dropping rows).")
    except PackedWeightsError as err:  # helpers.train refuses to train a packed model
        raise RecipeError(f"the run cannot count: {err}") from None
    finally:
        for hook in hooks:
            hook.remove()
    silent = [name for name in trainable if name not in learned]
    if silent:
        problems.append(f"{len(silent)} of the model's {len(trainable)} trainable tensors (e.g. {silent[0]}) got no "
                        f"gradient, or only zeros, in all {workload.steps} steps: they cannot learn. Look for 4-bit "
                        "weights packed for CPU inference (no backward; helpers.cpu_packing), parameters the forward "
                        "never uses, or a learning rate of 0 (LoRA's B then stays zero, and so does A's gradient); "
                        "freeze what should not train.")
    packed = packed_layers(model)
    if packed:
        problems.append(f"{len(packed)} 4-bit layers (e.g. {packed[0]}) were packed for CPU inference during the run "
                        "(an eval-mode forward without gradients with support_avx512bf16_for_cpu switched back on): "
                        "that layout has no backward, so nothing below them learns.")
    ppl_end = heldout_perplexity(model, corpus, max_chunks=workload.eval_chunks)
    return Attempt(name or getattr(recipe, "__name__", "recipe"), workload, report, ppl_start, ppl_end, reference,
                   losses, statistics.median(times) if times else report.seconds,
                   sum(p.numel() for p in trainable.values()), problems)


def _missing_rows(rows: torch.Tensor, seen: list[torch.Tensor]) -> int:
    """How many rows of ``rows`` never appeared in any input the model read."""
    read = {tuple(r.tolist()) for t in seen for r in t}
    return sum(tuple(r.tolist()) not in read for r in rows)
