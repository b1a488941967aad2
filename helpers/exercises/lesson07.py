"""Lesson 07 — Gradient accumulation.

Targets come from the lesson's fixed inputs: the course model's config (``course_dims``), a shipped reference
config (``OOM_MODEL``, exercise 4: a run the lesson does not make), the constants below (the notebook uses the
same values; tests/test_checks_lesson07.py holds them together) and ``helpers.estimate.predict``.
"""

from __future__ import annotations

from ..checks import AnswerError, as_number, choice, close, exercise, human_bytes, ratio_hint
from ..constants import GiB, MiB
from ..estimate import Dims, Recipe, loss_bytes, predict
from ..planner import USABLE

LESSON = "07_gradient_accumulation"

# Exercise 1: four padded rows of SHORT tokens, one row per micro-batch; LENGTHS are their real tokens (every row
# padded, and no count equal to one of the lesson's other numbers).
SHORT = 32
LENGTHS = (30, 17, 9, 6)
# Exercise 2: LoRA r=16 on every linear layer, a batch of EFFECTIVE rows of SEQ tokens per optimizer step, as K
# micro-batches of EFFECTIVE // K rows.
SEQ, EFFECTIVE, K, LORA_RANK = 64, 4, 4, 16
PEAK_RECIPE = Recipe(batch_size=EFFECTIVE, seq_len=SEQ, gradient_accumulation_steps=K, lora_rank=LORA_RANK,
                     lora_targets="all-linear")
# Exercise 3: full fine-tuning of 512-token rows, EFFECTIVE_ROWS rows per optimizer step, on a GPU sold as 8 GB:
# the budget for tensors is USABLE (90 %) of its label, the rest left to the CUDA context, cuBLAS workspaces and the
# caching allocator's slack (helpers.planner's rule).
BUDGET_CARD_GB = 8
BUDGET_RECIPE, EFFECTIVE_ROWS, BUDGET = Recipe(seq_len=512), 32, int(BUDGET_CARD_GB * 1e9 * USABLE)
# Exercise 4 (diagnose): a full fine-tune of OOM_MODEL (fp32, AdamW) at OOM_RECIPE does not fit a GPU sold as
# OOM_CARD_GB; which one change makes it fit? Each option changes the recipe as given; exactly one fits, with a
# clear margin (tests/test_checks_lesson07.py holds the margins: the fix at most 90 % of the budget, every other
# option at least 110 %).
OOM_MODEL = "smollm2-360m"
OOM_RECIPE = Recipe(batch_size=16, seq_len=1024)
OOM_CARD_GB = 12
OOM_BUDGET = int(OOM_CARD_GB * 1e9 * USABLE)
OOM_OPTIONS = {
    "a": ("gradient accumulation: 16 micro-batches of 1 row (still 16 rows per optimizer step)",
          {"gradient_accumulation_steps": 16}),
    "b": ("gradient checkpointing, same batch", {"gradient_checkpointing": True}),
    "c": ("8-bit AdamW", {"optimizer": "adamw8bit"}),
    "d": ("freeze every block but the top 4 (and the embedding)", {"trainable_blocks": 4}),
    "e": ("LoRA, rank 16 on every linear layer, base frozen", {"lora_rank": 16, "lora_targets": "all-linear"}),
    "f": ("bf16 mixed precision (autocast, fp32 master weights)", {"autocast": "bf16"}),
}

# Exercise 2's honest answers: predict(...) itself, or the lesson's measured baseline recombined (weights +
# optimizer state + the adapters' gradients + activations / k), which the notebook shows within 0.01 % of the
# predictor, or either read off the tables in MiB (rounded to one decimal, or to whole MiB: 0.07 % at ~700 MiB).
# 0.5 % allows those and fails the plausible slips: forgetting the gradients (2.7 % here), MB for MiB (4.9 %).
PEAK_TOLERANCE = 0.005


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


def _whole(value: float) -> int | None:
    return int(value) if float(value).is_integer() else None


# ------------------------------------------------------------------------------------------------
# Exercise 1: the token count Trainer passes as num_items_in_batch (predict)
# ------------------------------------------------------------------------------------------------
def _micro_batches(lengths) -> list[list[int]]:
    """``lengths`` as a list of micro-batches, each a list of real (unpadded) tokens per row."""
    return [list(m) if isinstance(m, (list, tuple)) else [m] for m in lengths]


@exercise("num_items_in_batch", lesson=LESSON, context=lambda: {"lengths": LENGTHS, "seq_len": SHORT},
          kind="predict", tolerance=0.0)
def num_items_in_batch(answer, lengths, seq_len: int | None = None):
    """The number of predicted tokens in one optimizer step: over every micro-batch, each row of ``L`` real
    tokens (padding after them, labelled -100) has ``L - 1`` targets, because a causal LM predicts token t+1.
    Exact: a count."""
    micro = _micro_batches(lengths)
    rows = [n for m in micro for n in m]
    value = as_number(answer, "a number of tokens")
    want = sum(max(n - 1, 0) for n in rows)
    if value == want:
        return True, (f"{want} targets: {len(rows)} rows with {sum(rows)} real tokens, minus one per row (the first "
                      f"token of a row is never predicted). Trainer divides the summed loss of each of the "
                      f"{len(micro)} micro-batches by this one number.")
    wrong = [(sum(rows), "the model shifts the labels: a row of L real tokens has L - 1 targets (token 1 predicts "
                         "token 2, ...), so subtract one per row."),
             (sum(max(n - 1, 0) for n in micro[0]), "that is the first micro-batch only: the count runs over every "
                                                    "micro-batch of the optimizer step."),
             (sum(max(n - 1, 0) for n in micro[-1]), "that is the last micro-batch only: the count runs over every "
                                                     "micro-batch of the optimizer step."),
             (len(micro), "that counts micro-batches; num_items_in_batch counts tokens the loss is computed on."),
             (len(rows), "that counts rows; num_items_in_batch counts tokens the loss is computed on."),
             (sum(rows) - len(micro), "subtract one per row, not one per micro-batch: every row is shifted."),
             (sum(rows) - 1, "subtract one per row, not once for the whole step: every row is shifted.")]
    if seq_len is not None:
        wrong += [(len(rows) * seq_len, "that counts the padding too: labels of -100 are ignored by the loss."),
                  (len(rows) * (seq_len - 1), "that counts the padding too: labels of -100 are ignored by the loss.")]
    for other, hint in wrong:
        if other != want and value == other:
            return False, f"you said {value:,.0f}: {hint}"
    if len(micro) > 1 and close(value, want / len(micro), 1e-9):
        return False, (f"you said {value:,.0f}: that is an average per micro-batch; Trainer passes the *sum* over "
                       "all micro-batches of the step.")
    return False, (f"you said {value:,.0f}. Count, for every row of every micro-batch, the real tokens minus one "
                   "(labels[:, 1:] != -100), and add them up.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: the peak of a step with k micro-batches (predict before measuring)
# ------------------------------------------------------------------------------------------------
@exercise("accumulation_peak", lesson=LESSON, context=lambda: {**_course_context(), "recipe": PEAK_RECIPE},
          kind="predict", tolerance=PEAK_TOLERANCE)
def accumulation_peak(answer, dims, recipe: Recipe):
    """Peak bytes of one optimizer step of ``recipe`` (k micro-batches, AdamW, fp32; LoRA adapters if the recipe
    has them), within ``PEAK_TOLERANCE`` of ``helpers.estimate.predict``."""
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    steps = recipe.gradient_accumulation_steps
    right = predict(d, recipe)
    want = right.peak
    if close(value, want, PEAK_TOLERANCE):
        return True, (f"{human_bytes(want)} ({want / MiB:,.1f} MiB): weights {right.weights / MiB:,.1f} MiB and "
                      f"optimizer state {right.optimizer / MiB:,.1f} MiB as before, the gradients "
                      f"({right.gradients / MiB:,.1f} MiB) kept alive from the first micro-batch, and one "
                      f"micro-batch's activations ({right.activations / MiB:,.1f} MiB).")
    whole = predict(d, recipe.but(gradient_accumulation_steps=1))  # the whole batch in one forward and backward
    no_grads = predict(d, recipe.but(batch_size=recipe.micro_batch_size, gradient_accumulation_steps=1))
    all_divided = whole.peak / steps
    floor_kept = whole.weights + whole.optimizer + whole.activations / steps  # activations / k, gradients forgotten
    for other, hint in (
            (whole.peak, "that is the peak without accumulation, the whole batch in one pass: with k micro-batches "
                         "only one micro-batch's activations are alive at a time."),
            (all_divided, "only the activations shrink with the micro-batch: weights and optimizer state stay "
                          "the same size, whatever k is."),
            (no_grads.peak, "that is one micro-batch step *without* accumulation: from the second micro-batch on, "
                            "the first one's gradients stay alive through the whole forward and backward pass."),
            (floor_kept, "close, but from the second micro-batch on the gradients of the first are alive too: "
                         "add them."),
            (want / MiB * 1e6, "that looks like MiB multiplied by 10^6: a MiB is 2^20 bytes (MB and MiB differ "
                               "by 4.9 %)."),
            (want / 1e6 * MiB, "that looks like MB multiplied by 2^20: a MB is 10^6 bytes (MB and MiB differ "
                               "by 4.9 %).")):
        if not close(other, want, PEAK_TOLERANCE) and close(value, other, PEAK_TOLERANCE):
            return False, f"you said {human_bytes(value)}: {hint}"
    hint = ratio_hint(value, want, {2**-20: "that looks like MiB; give bytes.", 1e-6: "that looks like MB; give bytes.",
                                    2**-30: "that looks like GiB; give bytes.", 8: "that looks like bits; give bytes."},
                      rel=0.02)
    return False, f"you said {human_bytes(value)}. " + (
        hint or "start from the baseline's breakdown: weights and optimizer state unchanged, activations divided "
                "by k (they scale with the micro-batch), plus the gradients, alive from the second micro-batch on.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: the largest micro-batch that fits a budget at a fixed batch (rows per optimizer step)
# ------------------------------------------------------------------------------------------------
def split_for_budget(dims, recipe: Recipe, batch_size: int, budget: int) -> tuple[int, int] | None:
    """(micro_batch_size, gradient_accumulation_steps) whose product is ``batch_size``, the largest micro-batch
    whose predicted peak fits ``budget`` bytes; None if not even micro-batches of one row fit."""
    for micro in sorted((b for b in range(1, batch_size + 1) if batch_size % b == 0), reverse=True):
        k = batch_size // micro
        if predict(dims, recipe.but(batch_size=batch_size, gradient_accumulation_steps=k)).peak <= budget:
            return micro, k
    return None


def _split(answer) -> tuple[float, float]:
    if isinstance(answer, dict):
        keys = {k.strip().lower(): v for k, v in answer.items()}
        micro = next((keys[k] for k in ("micro_batch_size", "micro_batch", "micro") if k in keys), None)
        k = next((keys[k] for k in ("gradient_accumulation_steps", "k") if k in keys), None)
        if micro is not None and k is not None:
            answer = [micro, k]
    if not isinstance(answer, list) or len(answer) != 2:
        raise AnswerError("give two numbers, `(micro_batch_size, gradient_accumulation_steps)`: rows per micro-batch "
                          "and micro-batches per optimizer step.")
    return as_number(answer[0], "a micro-batch size"), as_number(answer[1], "a number of micro-batches")


@exercise("micro_batch_for_budget", lesson=LESSON,
          context=lambda: {**_course_context(), "recipe": BUDGET_RECIPE, "batch_size": EFFECTIVE_ROWS,
                           "budget": BUDGET}, kind="calculate", tolerance=0.0)
def micro_batch_for_budget(answer, dims, recipe: Recipe, batch_size: int, budget: int):
    """``(micro_batch_size, gradient_accumulation_steps)``: the largest micro-batch whose predicted peak fits
    ``budget`` with k micro-batches making up ``batch_size`` rows per optimizer step."""
    d = Dims.of(dims)
    micro_value, k_value = _split(answer)
    micro, k = _whole(micro_value), _whole(k_value)
    if micro is None or k is None or micro < 1 or k < 1:
        return False, f"you said ({micro_value:g}, {k_value:g}): both must be whole numbers of at least 1."
    if micro * k != batch_size:
        return False, (f"({micro}, {k}) makes an optimizer step of {micro * k} rows; the batch must stay "
                       f"{batch_size} rows per optimizer step (micro-batch x k), or the training changes.")
    best = split_for_budget(d, recipe, batch_size, budget)
    peak = predict(d, recipe.but(batch_size=batch_size, gradient_accumulation_steps=k)).peak
    if peak > budget:
        return False, (f"micro-batches of {micro} with k={k} are predicted to peak at {peak / GiB:.2f} GiB, over "
                       f"the {budget / GiB:.2f} GiB budget: try a smaller micro-batch (and a larger k).")
    if best is not None and micro < best[0]:
        return False, (f"({micro}, {k}) fits ({peak / GiB:.2f} GiB), but a larger micro-batch fits too: larger "
                       "micro-batches mean fewer, bigger matmuls per step and so less time. Find the largest.")
    return True, (f"micro-batches of {micro}, k={k}: predicted peak {peak / GiB:.2f} GiB of {budget / GiB:.2f}. "
                  "The optimizer sees the same batch of "
                  f"{batch_size} rows as without accumulation, so training is unchanged; each step just takes "
                  "longer.")


# ------------------------------------------------------------------------------------------------
# Exercise 4: a run that does not fit: which one change makes it fit? (diagnose)
# ------------------------------------------------------------------------------------------------
def _oom_context() -> dict:
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(OOM_MODEL)), "recipe": OOM_RECIPE, "budget": OOM_BUDGET,
            "options": {letter: changes for letter, (_, changes) in OOM_OPTIONS.items()}}


def oom_reports(dims, recipe: Recipe, options: dict) -> dict:
    """The predicted report of each option: ``recipe`` with that option's changes."""
    return {letter: predict(dims, recipe.but(**changes)) for letter, changes in options.items()}


def _what_changed(changes: dict, base, after, dims, recipe: Recipe) -> str:
    """What the option does to the breakdown, in this run's numbers (GiB)."""
    def g(x):
        return f"{x / GiB:,.2f}"

    logits = loss_bytes(dims, recipe.micro_batch_size, recipe.seq_len)  # fp32 log-softmax and two gradients
    if changes.get("gradient_accumulation_steps", 1) > 1:
        rows = recipe.but(**changes).micro_batch_size
        return (f"one micro-batch of {rows} row{'s' if rows != 1 else ''} is alive at a time: the "
                f"activations fall from {g(base.activations)} to {g(after.activations)} GiB, while the gradients "
                f"({g(after.gradients)} GiB) now stay alive across micro-batches")
    if changes.get("gradient_checkpointing"):
        return (f"the blocks keep only their inputs, but the logits are not checkpointed: at the start of the backward "
                f"pass the fp32 logits of {recipe.micro_batch_size * recipe.seq_len:,} tokens and their gradients take "
                f"{g(logits)} GiB (3 x tokens x {dims.vocab:,} x 4 bytes), so the activations only fall from "
                f"{g(base.activations)} to {g(after.activations)} GiB")
    if "optimizer" in changes:
        return (f"it shrinks the optimizer state from {g(base.optimizer)} to {g(after.optimizer)} GiB, but the "
                f"activations ({g(after.activations)} GiB, {after.activations / base.peak:.0%} of the run's peak) "
                "are what does not fit, and they do not change")
    if changes.get("trainable_blocks") is not None:
        return (f"the optimizer state falls from {g(base.optimizer)} to {g(after.optimizer)} GiB and the frozen blocks "
                f"keep less for backward, but the top blocks' activations and the logits ({g(logits)} GiB with their "
                f"gradients) remain: activations {g(after.activations)} GiB")
    if changes.get("lora_rank"):
        return (f"the optimizer state falls to {g(after.optimizer)} GiB, but backpropagation still runs through every "
                f"block to reach the adapters: the activations only fall from {g(base.activations)} to "
                f"{g(after.activations)} GiB")
    if changes.get("autocast"):
        return (f"the activations are stored partly in bf16 ({g(base.activations)} -> {g(after.activations)} GiB: the "
                "residual stream, the norms and the logits stay fp32) and autocast adds 16-bit weight copies")
    return (f"weights {g(after.weights)}, gradients {g(after.gradients)}, optimizer state {g(after.optimizer)}, "
            f"activations {g(after.activations)} GiB")


@exercise("diagnose_out_of_memory", lesson=LESSON, context=_oom_context, kind="diagnose", tolerance=0.0)
def diagnose_out_of_memory(answer, dims, recipe: Recipe, budget: int, options: dict):
    """One letter of ``options``: the change whose predicted peak fits ``budget`` bytes. Each wrong option's
    feedback says, with this run's numbers, what it shrinks and why that is not enough."""
    d = Dims.of(dims)
    letter = choice(answer, options)
    base = predict(d, recipe)
    reports = oom_reports(d, recipe, options)
    after = reports[letter]
    why = _what_changed(options[letter], base, after, d, recipe)
    fitting = [k for k, r in reports.items() if r.peak <= budget]
    where = f"predicted peak {after.peak / GiB:,.2f} GiB"
    if after.peak <= budget:
        others = ", ".join(f"{k} {r.peak / GiB:,.1f}" for k, r in reports.items() if k != letter)
        changes = options[letter]
        if changes.get("gradient_accumulation_steps", 1) > 1:
            cost = ("The optimizer still sees the same rows per step, so training is unchanged; each step takes "
                    "longer (smaller matmuls).")
        elif changes.get("gradient_checkpointing"):
            cost = "The gradients are unchanged; each step recomputes the forward pass (about 30 % more time)."
        else:
            cost = "This option changes what is trained or how: measure the quality it costs."
        return True, (f"({letter}) {where}, {(budget - after.peak) / GiB:,.2f} GiB under the {budget / GiB:,.2f} GiB "
                      f"budget: {why}. The report said where to look: activations were "
                      f"{base.activations / base.peak:.0%} of the peak. The other options peak at (GiB) {others}. "
                      + cost)
    hint = "" if fitting else " (none of the options fits: tell your instructor)"
    return False, (f"({letter}) {where}, still {(after.peak - budget) / GiB:,.2f} GiB over the {budget / GiB:,.2f} GiB "
                   f"budget: {why}. Look at which category of the report is too large, and which option shrinks "
                   f"that one enough{hint}.")
