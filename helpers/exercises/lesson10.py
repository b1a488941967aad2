"""Lesson 10 — Capstone: fit the budget."""

from __future__ import annotations

from ..capstone import WORKLOAD, RecipeError, Workload, attempt, course_dims, judge
from ..checks import AnswerError, as_number, exercise
from ..estimate import Recipe, predict
from ..memory import CATEGORIES, LABELS, MiB

LESSON = "10_fit_the_budget"
BUDGET = WORKLOAD.budget  # the lesson's constants: the capstone's job (helpers.capstone.WORKLOAD) is the single source
BATCH, SEQ, STEPS = WORKLOAD.batch_size, WORKLOAD.seq_len, WORKLOAD.steps

# The plan the learner predicts in exercise 1: QLoRA with micro-batches (the lesson describes it in words).
PLAN = Recipe(batch_size=1, gradient_accumulation_steps=BATCH, seq_len=SEQ, weights="nf4", double_quant=True,
              lora_rank=16, lora_targets="all-linear", gradient_checkpointing=True)
# Each plausible slip, as the recipe it amounts to, and what to say about it.
SLIPS = [
    (PLAN.but(batch_size=8, gradient_accumulation_steps=1),
     "that is the whole batch of 8 rows at once. With accumulation only one micro-batch of 1 x 128 is alive at a "
     "time: activations shrink 8-fold, and the gradients of the adapters stay between micro-batches."),
    (PLAN.but(gradient_checkpointing=False),
     "that is without gradient checkpointing: the plan keeps only each block's input and recomputes the rest."),
    (PLAN.but(weights="fp32"),
     "those weights are the fp32 model's: the plan stores the frozen linear layers in nf4."),
    (PLAN.but(double_quant=False),
     "that stores the nf4 blocks' absmax constants in fp32: with double quantization they are 8-bit, with a "
     "second level of fp32 constants per 256 of them (lesson 05)."),
    (PLAN.but(unquantized="bf16"),
     "that keeps the embedding and norms in bf16, but prepare_model_for_kbit_training upcasts everything "
     "bitsandbytes left unquantized to fp32."),
    (PLAN.but(lora_rank=0, weights="fp32"),
     "that trains every parameter: in the plan the base is frozen and only the LoRA adapters train."),
    (PLAN.but(optimizer="adamw8bit"),
     "that is 8-bit AdamW; the plan uses torch's AdamW, with two fp32 moments per adapter parameter."),
]
UNITS = {  # what an answer in another unit looks like, as a multiple of the MiB values
    MiB / 1e6: "these look like MB (10^6 bytes), not MiB: the course reports MiB, 2^20 = 1,048,576 bytes "
               "(bytes / 2**20). The two differ by 4.9 %.",
    MiB: "these look like bytes: give MiB (bytes / 2**20).",
    1 / 1024: "these look like GiB: give MiB (GiB x 1024).",
    MiB / 1e9: "these look like GB (10^9 bytes): give MiB (bytes / 2**20).",
}


def _tolerance(target: float, peak: float) -> float:
    """Bytes a category may be off: 0.5 % of it, or 0.3 % of the peak for small ones (about 1 MiB here).

    An honest answer is ``predict``'s (exact) or the lesson's formulas by hand, possibly rounded, truncated or
    rounded up to whole MiB (the plan's categories then move by at most 0.8 MiB). Every slip the plan names
    is larger: MB instead of MiB (4.9 %), the absmax
    constants left out (1.8 MiB of the weights) or kept in fp32 without double quantization (+4.5 MiB), the
    adapters' own weights left out (18.6 MiB), the checkpointed block inputs left out (8.4 MiB).
    """
    return max(0.005 * target, 0.003 * peak)


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
# Exercise 1: predict the plan's peak, category by category, before measuring anything
# ------------------------------------------------------------------------------------------------
@exercise("capstone_prediction", lesson=LESSON, context=lambda: {"dims": course_dims()})
def capstone_prediction(answer, dims):
    """MiB by category at the peak of one step of ``PLAN`` on the course model (see ``_tolerance``)."""
    want = predict(dims, PLAN)
    got = _categories(answer)

    def close(c, value) -> bool:  # within the plan's tolerance for that category
        return abs(value - getattr(want, c)) <= _tolerance(getattr(want, c), want.peak)

    def near(c, value) -> bool:
        return abs(got[c] - value) <= _tolerance(getattr(want, c), want.peak)

    wrong = [c for c in CATEGORIES if not close(c, got[c])]
    if not wrong:
        return True, (f"peak {sum(got.values()) / MiB:,.1f} MiB predicted; the estimator says {want.peak / MiB:,.1f} "
                      f"({', '.join(f'{LABELS[c]} {getattr(want, c) / MiB:,.1f}' for c in CATEGORIES)}). "
                      "Now measure it: the capstone's check runs your recipe.")
    for factor, hint in UNITS.items():
        if all(abs(got[c] - factor * getattr(want, c)) <= _tolerance(factor * getattr(want, c), factor * want.peak)
               for c in CATEGORIES):
            return False, hint
    for recipe, hint in SLIPS:
        slip = predict(dims, recipe)
        if all(near(c, getattr(slip, c)) and not close(c, getattr(slip, c)) for c in wrong):
            return False, f"{', '.join(LABELS[c] for c in wrong)}: {hint}"
    c = wrong[0]
    return False, (f"{LABELS[c]}: you said {got[c] / MiB:,.2f} MiB, which is not within "
                   f"{_tolerance(getattr(want, c), want.peak) / MiB:,.2f} MiB of the plan's. Build the plan as a "
                   f"helpers.estimate.Recipe (micro-batch 1, {BATCH} accumulation steps, nf4 with double "
                   "quantization, LoRA r=16 on all linear layers, checkpointing) and read predict's categories, or "
                   "redo that category by hand with the formulas of its lesson.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: the capstone — a recipe that fits the budget and still learns, proven by measurement
# ------------------------------------------------------------------------------------------------
def probe_recipe(recipe, workload: Workload = WORKLOAD) -> dict:
    """Run the referee (``helpers.capstone.attempt``) on ``recipe`` and return what it measured, as plain data:
    every step's peak by category (bytes) and time, perplexities, the referee's findings, or the error."""
    from .. import capstone

    capstone.course_corpus.cache_clear()  # a corpus read afresh: nothing a notebook altered
    try:
        return attempt(recipe, workload, reference=False).facts()
    except RecipeError as err:
        return {"error": str(err)}
    except BaseException as err:  # noqa: BLE001 (whatever the recipe's code raised: feedback, not an escape)
        return {"error": f"your recipe could not be run ({type(err).__name__}: {str(err)[:300]})."}


def _reference() -> dict:
    """The judge's own inputs: the lesson's job, and the pretrained model's perplexity measured here afresh."""
    from ..data import Corpus, heldout_perplexity
    from ..models import load_model, load_tokenizer

    corpus = Corpus(load_tokenizer())
    return {"workload": WORKLOAD,
            "ppl_pretrained": heldout_perplexity(load_model(), corpus, max_chunks=WORKLOAD.eval_chunks)}


def _facts(data) -> dict:
    """The probe's data, checked for shape (AnswerError when it is not what the referee reports)."""
    if not isinstance(data, dict):
        raise AnswerError("the check's run of your recipe reported nothing it could read.")
    if data.get("error") is not None:
        return {"error": str(data["error"])}
    steps = data.get("steps")
    problems = data.get("problems")
    if not isinstance(steps, list) or not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
        raise AnswerError("the check's run of your recipe reported nothing it could read.")
    checked = []
    for step in steps:
        if not isinstance(step, dict):
            raise AnswerError("the check's run of your recipe reported nothing it could read.")
        row = {c: as_number(step.get(c), f"bytes of {c}") for c in CATEGORIES}
        if min(row.values()) < 0:
            raise AnswerError("the check's run of your recipe reported negative memory.")
        checked.append(row)
    ppl_end = data.get("ppl_end")
    if ppl_end is not None and type(ppl_end) not in (int, float):  # nan or inf: a run that diverged (judge says so)
        raise AnswerError("the check's run of your recipe reported no perplexity it could read.")
    return {"steps": checked, "problems": problems, "ppl_start": as_number(data.get("ppl_start"), "a perplexity"),
            "ppl_end": None if ppl_end is None else float(ppl_end),
            "seconds_per_step": as_number(data.get("seconds_per_step", 0.0), "seconds")}


@exercise("fit_the_budget", points=3, lesson=LESSON, context=_reference, probe=probe_recipe)
def fit_the_budget(data, workload: Workload, ppl_pretrained: float):
    """What the referee measured, judged against the lesson's budget and the pretrained model's perplexity."""
    return judge(_facts(data), workload, as_number(ppl_pretrained, "the pretrained perplexity"))
