"""Lesson 12 — Capstone: fit the budget."""

from __future__ import annotations

import dataclasses

from ..capstone import (
    SMALLEST_WORKLOAD,
    TIERS,
    TIGHT_WORKLOAD,
    WORKLOAD,
    Attempt,
    SetupError,
    Workload,
    attempt,
    course_dims,
    judge,
    load_reference,
)
from ..checks import AnswerError, as_number, exercise
from ..estimate import Recipe, predict
from ..memory import CATEGORIES, LABELS, MiB

LESSON = "12_fit_the_budget"
BUDGET = WORKLOAD.budget  # the lesson's constants: the capstone's job (helpers.capstone.WORKLOAD) is the single source
TIGHT_BUDGET = TIGHT_WORKLOAD.budget
SMALLEST_BUDGET = SMALLEST_WORKLOAD.budget
BATCH, SEQ, STEPS = WORKLOAD.batch_size, WORKLOAD.seq_len, WORKLOAD.optimizer_steps

# The plan the learner predicts in exercise 1, which the lesson then measures: the original LoRA paper's choice of
# adapters (rank 8 on the attention's query and value projections) on a 4-bit base, with micro-batches of 2 rows.
# The ladder the lesson prints before it adapts every linear layer at rank 16 in micro-batches of 1 row: no rung
# shares its categories.
PLAN_RECIPE = Recipe(batch_size=BATCH, gradient_accumulation_steps=BATCH // 2, seq_len=SEQ, weights="nf4",
                     double_quant=True, lora_rank=8, lora_targets=("q_proj", "v_proj"), gradient_checkpointing=True)
# Each plausible slip, as the recipe it amounts to, and what to say about it.
SLIPS = [
    (PLAN_RECIPE.but(batch_size=BATCH, gradient_accumulation_steps=1),
     "that is the whole batch of 8 rows at once. With accumulation only one micro-batch of 2 x 128 is alive at a "
     "time: activations shrink 4-fold, and the gradients of the adapters stay between micro-batches."),
    (PLAN_RECIPE.but(gradient_accumulation_steps=BATCH),
     "that is micro-batches of 1 row (the ladder's); the plan splits the 8 rows into 4 micro-batches of 2."),
    (PLAN_RECIPE.but(gradient_checkpointing=False),
     "that is without gradient checkpointing: the plan keeps only each block's input and recomputes the rest."),
    (PLAN_RECIPE.but(lora_targets="all-linear"),
     "that adapts every linear layer of each block; the plan adapts only q_proj and v_proj (and v_proj is "
     "narrower than q_proj: 3 key-value heads of 64 give 192 outputs, not 576)."),
    (PLAN_RECIPE.but(lora_rank=16),
     "that is rank 16; the plan's adapters have rank 8."),
    (PLAN_RECIPE.but(weights="fp32"),
     "those weights are the fp32 model's: the plan stores the frozen linear layers in nf4."),
    (PLAN_RECIPE.but(double_quant=False),
     "that stores the nf4 blocks' absmax constants in fp32: with double quantization they are 8-bit, with a "
     "second level of fp32 constants per 256 of them (lesson 05)."),
    (PLAN_RECIPE.but(unquantized="bf16"),
     "that keeps the embedding and norms in bf16, but prepare_model_for_kbit_training upcasts everything "
     "bitsandbytes left unquantized to fp32."),
    (PLAN_RECIPE.but(lora_rank=0, weights="fp32"),
     "that trains every parameter: in the plan the base is frozen and only the LoRA adapters train."),
    (PLAN_RECIPE.but(optimizer="adamw8bit"),
     "that is 8-bit AdamW; the plan uses torch's AdamW, with two fp32 moments per adapter parameter."),
]
UNITS = {  # what an answer in another unit looks like, as a multiple of the MiB values
    MiB / 1e6: "these look like MB (10^6 bytes), not MiB: the course reports MiB, 2^20 = 1,048,576 bytes "
               "(bytes / 2**20). The two differ by 4.9 %.",
    MiB: "these look like bytes: give MiB (bytes / 2**20).",
    1 / 1024: "these look like GiB: give MiB (GiB x 1024).",
    MiB / 1e9: "these look like GB (10^9 bytes): give MiB (bytes / 2**20).",
}
# How far each category may be from the plan's, relative: 0.5 %. An honest answer is ``predict``'s (exact) or
# the lessons' formulas by hand, rounded to two decimals of a MiB (at most 0.3 % off the plan's smallest category,
# the 1.76 MiB of gradients). Every slip above moves some category by more: MB instead of MiB (4.9 %), the absmax
# constants kept in fp32 (+2.8 % of the weights) or left out (-1.1 %), all-linear targets (gradients x 5.3),
# rank 16 (x 2).
TOLERANCE = 0.005


def _tolerance(target: float) -> float:
    """Bytes a category may be off: TOLERANCE of it."""
    return TOLERANCE * target


def _categories(answer) -> dict[str, float]:
    """The answer as bytes per category: MemoryReport data (bytes), or a dict of MiB by category name or label."""
    if isinstance(answer, dict) and answer.get("__class__") == "MemoryReport":
        return {c: as_number(answer.get(c), f"bytes of {c}") for c in CATEGORIES}
    if not isinstance(answer, dict):
        raise AnswerError("give a dict of MiB per category, {'weights': ..., 'gradients': ..., 'optimizer': ..., "
                          "'activations': ...} (or predict(...) itself, or its .mib()).")
    names = {**{c: c for c in CATEGORIES}, **{LABELS[c]: c for c in CATEGORIES}}
    unknown = [k for k in answer if k not in names and k != "peak"]
    if unknown:
        raise AnswerError(f"unknown categories {unknown}: use {list(CATEGORIES)} (or the labels of .mib()).")
    got = {names[k]: as_number(v, f"MiB of {k}") * MiB for k, v in answer.items() if k != "peak"}
    missing = [c for c in CATEGORIES if c not in got]
    if missing:
        raise AnswerError(f"give a number for every category; missing {missing}.")
    if "peak" in answer:  # predict(...).mib() has it: it must be the categories' sum
        peak = as_number(answer["peak"], "MiB of the peak") * MiB
        total = sum(got.values())
        if abs(peak - total) > max(0.5 * MiB, 0.001 * total):
            raise AnswerError(f"your peak, {peak / MiB:,.1f} MiB, is not the sum of your categories "
                              f"({total / MiB:,.1f} MiB): the peak of a step is what is alive at one moment, "
                              "category by category.")
    return got


# ------------------------------------------------------------------------------------------------
# Exercise 1: predict a plan's peak, category by category, before the lesson measures it
# ------------------------------------------------------------------------------------------------
@exercise("capstone_prediction", lesson=LESSON, context=lambda: {"dims": course_dims()}, kind="predict",
          tolerance=TOLERANCE)
def capstone_prediction(answer, dims):
    """MiB by category at the peak of one step of ``PLAN_RECIPE`` on the model of ``dims`` (each within TOLERANCE)."""
    want = predict(dims, PLAN_RECIPE)
    got = _categories(answer)

    def close(c, value) -> bool:  # within the plan's tolerance for that category
        return abs(value - getattr(want, c)) <= _tolerance(getattr(want, c))

    def near(c, value) -> bool:
        return abs(got[c] - value) <= _tolerance(getattr(want, c))

    wrong = [c for c in CATEGORIES if not close(c, got[c])]
    if not wrong:
        return True, (f"peak {sum(got.values()) / MiB:,.2f} MiB predicted; the estimator says {want.peak / MiB:,.2f} "
                      f"({', '.join(f'{LABELS[c]} {getattr(want, c) / MiB:,.2f}' for c in CATEGORIES)}). "
                      "The lesson measures it next.")
    for factor, hint in UNITS.items():
        if all(abs(got[c] - factor * getattr(want, c)) <= _tolerance(factor * getattr(want, c)) for c in CATEGORIES):
            return False, hint
    for recipe, hint in SLIPS:
        slip = predict(dims, recipe)
        if all(near(c, getattr(slip, c)) and not close(c, getattr(slip, c)) for c in wrong):
            return False, f"{', '.join(LABELS[c] for c in wrong)}: {hint}"
    c = wrong[0]
    return False, (f"{LABELS[c]}: you said {got[c] / MiB:,.2f} MiB, which is not within {TOLERANCE:.1%} of the plan's. "
                   f"Build the plan as a helpers.estimate.Recipe (micro-batches of 2 rows, {BATCH // 2} accumulation "
                   "steps, nf4 with double quantization, LoRA r=8 on q_proj and v_proj, checkpointing, AdamW) and "
                   "read predict's categories, or redo that category by hand with the formulas of its lesson.")


# ------------------------------------------------------------------------------------------------
# Exercises 2 and 3: the capstone's tiers — a setup that fits the budget and learns as much as full
# fine-tuning (within the bar), proven by measurement
# ------------------------------------------------------------------------------------------------
_MEASURED: dict[str, Attempt] = {}  # the last run each exercise's probe made in this process: shown, never judged


def _probe(key: str, setup, workload: Workload) -> dict:
    from .. import capstone

    capstone.course_corpus.cache_clear()  # a corpus read afresh: nothing a notebook altered
    _MEASURED.pop(key, None)
    try:
        run = attempt(setup, workload, reference=False)
    except SetupError as err:
        return {"error": str(err)}
    except BaseException as err:  # noqa: BLE001 (whatever the setup's code raised: feedback, not an escape)
        return {"error": f"your setup could not be run ({type(err).__name__}: {str(err)[:300]})."}
    _MEASURED[key] = run
    return run.facts()


def probe_setup(setup, workload: Workload = WORKLOAD) -> dict:
    """Run the referee (``helpers.capstone.attempt``) on ``setup`` and return what it measured, as plain data:
    every step's peak by category (bytes) and time, perplexities, the referee's findings, or the error."""
    return _probe("fit_the_budget", setup, workload)


def probe_tight_setup(setup, workload: Workload = TIGHT_WORKLOAD) -> dict:
    """The same run as ``probe_setup`` (the tiers share the job; only the judge's budget differs)."""
    return _probe("fit_the_tight_budget", setup, workload)


def probe_smallest_setup(setup, workload: Workload = SMALLEST_WORKLOAD) -> dict:
    """The same run again, for the third tier."""
    return _probe("fit_the_smallest_budget", setup, workload)


def measured(name: str) -> Attempt | None:
    """The run the check of exercise ``name`` last made in this notebook (None before any, or when the setup could
    not be run), with the lesson's reference attached: for the lesson's tables. Grading never reads it."""
    run = _MEASURED.get(name)
    if run is None:
        return None
    tier = TIERS[name]
    return dataclasses.replace(run, workload=tier, reference=load_reference(tier))


def _reference(workload: Workload):
    """The judge's own inputs: the tier's job and budget, and the shipped reference run of that job."""
    return lambda: {"workload": workload, "reference": load_reference(workload)}


def _facts(data) -> dict:
    """The probe's data, checked for shape (AnswerError when it is not what the referee reports)."""
    if not isinstance(data, dict):
        raise AnswerError("the check's run of your setup reported nothing it could read.")
    if data.get("error") is not None:
        return {"error": str(data["error"])}
    steps = data.get("steps")
    problems = data.get("problems")
    if not isinstance(steps, list) or not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
        raise AnswerError("the check's run of your setup reported nothing it could read.")
    checked = []
    for step in steps:
        if not isinstance(step, dict):
            raise AnswerError("the check's run of your setup reported nothing it could read.")
        row = {c: as_number(step.get(c), f"bytes of {c}") for c in CATEGORIES}
        if min(row.values()) < 0:
            raise AnswerError("the check's run of your setup reported negative memory.")
        checked.append(row)
    ppl_end = data.get("ppl_end")
    if ppl_end is not None and type(ppl_end) not in (int, float):  # nan or inf: a run that diverged (judge says so)
        raise AnswerError("the check's run of your setup reported no perplexity it could read.")
    return {"steps": checked, "problems": problems, "ppl_start": as_number(data.get("ppl_start"), "a perplexity"),
            "ppl_end": None if ppl_end is None else float(ppl_end),
            "seconds_per_step": as_number(data.get("seconds_per_step", 0.0), "seconds")}


def _reference_of(reference) -> dict:
    if not isinstance(reference, dict):
        raise AnswerError("the check has no reference run to judge against.")
    return {"ppl_pretrained": as_number(reference.get("ppl_pretrained"), "the pretrained perplexity"),
            "ppl_full_finetune": as_number(reference.get("ppl_full_finetune"), "the full fine-tune's perplexity"),
            "naive_peak": as_number(reference.get("naive_peak"), "the naive run's peak")}


@exercise("fit_the_budget", points=3, lesson=LESSON, context=_reference(WORKLOAD), probe=probe_setup, kind="code")
def fit_the_budget(data, workload: Workload, reference: dict):
    """What the referee measured, judged against the first tier's budget (500 MiB) and the quality bar."""
    return judge(_facts(data), workload, _reference_of(reference))


@exercise("fit_the_tight_budget", points=2, lesson=LESSON, context=_reference(TIGHT_WORKLOAD),
          probe=probe_tight_setup, kind="code")
def fit_the_tight_budget(data, workload: Workload, reference: dict):
    """The same, against the second tier's budget (220 MiB) and the same quality bar."""
    return judge(_facts(data), workload, _reference_of(reference))


@exercise("fit_the_smallest_budget", points=2, lesson=LESSON, context=_reference(SMALLEST_WORKLOAD),
          probe=probe_smallest_setup, kind="code")
def fit_the_smallest_budget(data, workload: Workload, reference: dict):
    """The same, against the third tier's budget (170 MiB) and the same quality bar."""
    return judge(_facts(data), workload, _reference_of(reference))
