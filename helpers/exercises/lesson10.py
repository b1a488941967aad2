"""Lesson 10 — Capstone: fit the budget."""

from __future__ import annotations

from .. import capstone
from ..capstone import WORKLOAD, RecipeError, Workload, attempt, course_dims
from ..checks import as_number, exercise
from ..estimate import Recipe, predict
from ..memory import CATEGORIES, LABELS, MemoryReport, MiB

LESSON = "10_fit_the_budget"

# The plan the learner predicts in exercise 1: QLoRA with micro-batches (the lesson describes it in words).
PLAN = Recipe(batch_size=1, gradient_accumulation_steps=8, seq_len=128, weights="nf4", double_quant=True,
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
    (PLAN.but(unquantized="bf16"),
     "that keeps the embedding and norms in bf16, but prepare_model_for_kbit_training upcasts everything "
     "bitsandbytes left unquantized to fp32."),
    (PLAN.but(lora_rank=0, weights="fp32"),
     "that trains every parameter: in the plan the base is frozen and only the LoRA adapters train."),
]


def _categories(answer) -> dict[str, float]:
    """The answer as bytes per category: a MemoryReport, or a dict of MiB by category name."""
    if isinstance(answer, MemoryReport):
        return {c: getattr(answer, c) for c in CATEGORIES}
    if not isinstance(answer, dict):
        raise ValueError("give a dict of MiB per category (or the MemoryReport that predict returns)")
    names = {**{c: c for c in CATEGORIES}, **{LABELS[c]: c for c in CATEGORIES}}
    unknown = [k for k in answer if k not in names]
    if unknown:
        raise ValueError(f"unknown categories {unknown}: use {list(CATEGORIES)}")
    got = {names[k]: as_number(v, f"MiB of {k}") * MiB for k, v in answer.items()}
    missing = [c for c in CATEGORIES if c not in got]
    if missing:
        raise ValueError(f"give a number for every category; missing {missing}")
    return got


def _close(a: float, b: float) -> bool:
    """Within 10 % or 2 MiB (small categories are hard to hit in percent)."""
    return abs(a - b) <= max(0.10 * b, 2 * MiB)


# ------------------------------------------------------------------------------------------------
# Exercise 1: predict the plan's peak, category by category, before measuring anything
# ------------------------------------------------------------------------------------------------
@exercise("capstone_prediction", lesson=LESSON)
def capstone_prediction(answer, dims=None):
    """MiB by category at the peak of one step of ``PLAN`` on the course model, each within 10 % (or 2 MiB)."""
    want = predict(dims or course_dims(), PLAN)
    got = _categories(answer)
    wrong = [c for c in CATEGORIES if not _close(got[c], getattr(want, c))]
    if not wrong:
        return True, (f"peak {sum(got.values()) / MiB:,.1f} MiB predicted; the estimator says {want.peak / MiB:,.1f} "
                      f"({', '.join(f'{LABELS[c]} {getattr(want, c) / MiB:,.1f}' for c in CATEGORIES)}). "
                      "Now measure it: the capstone's check runs your recipe.")
    for recipe, hint in SLIPS:
        slip = predict(dims or course_dims(), recipe)
        if all(_close(got[c], getattr(slip, c)) for c in wrong):
            return False, f"{', '.join(LABELS[c] for c in wrong)}: {hint}"
    c = wrong[0]
    return False, (f"{LABELS[c]}: you said {got[c] / MiB:,.1f} MiB, which is not within 10 % of the plan's. "
                   f"Build the plan as a helpers.estimate.Recipe (micro-batch 1, 8 accumulation steps, nf4 with "
                   f"double quantization, LoRA r=16 on all linear layers, checkpointing) and read predict's "
                   f"categories, or redo that category by hand with the formulas of its lesson.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: the capstone — a recipe that fits the budget and still learns, proven by measurement
# ------------------------------------------------------------------------------------------------
@exercise("fit_the_budget", points=3, lesson=LESSON)
def fit_the_budget(answer, workload: Workload = WORKLOAD):
    """``answer`` builds (model, optimizer, step); the check runs and measures it (``helpers.capstone.attempt``)."""
    # The corpus and the reference perplexity are rebuilt, not taken from caches a notebook could have altered.
    capstone.course_corpus.cache_clear()
    capstone.pretrained_perplexity.cache_clear()
    try:
        result = attempt(answer, workload)
    except RecipeError as err:
        return False, str(err)
    return result.verdict()
