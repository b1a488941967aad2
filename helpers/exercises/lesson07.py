"""Lesson 07 — Gradient accumulation.

Targets come from the lesson's fixed inputs: the course model's config (``course_dims``), the constants below
(the notebook uses the same values; tests/test_checks_lesson07.py holds them together) and
``helpers.estimate.predict``.
"""

from __future__ import annotations

from ..checks import AnswerError, as_number, close, exercise, human_bytes, ratio_hint
from ..estimate import Dims, Recipe, predict

LESSON = "07_gradient_accumulation"
MiB = 2**20
GiB = 2**30

# Exercise 1: four padded rows of SHORT tokens, one row per micro-batch; LENGTHS are their real tokens.
SHORT = 32
LENGTHS = (32, 24, 8, 4)
# Exercise 2: LoRA r=16 on every linear layer, an effective batch of EFFECTIVE rows of SEQ tokens, as K
# micro-batches of EFFECTIVE // K rows.
SEQ, EFFECTIVE, K, LORA_RANK = 64, 4, 4, 16
PEAK_RECIPE = Recipe(batch_size=EFFECTIVE // K, seq_len=SEQ, gradient_accumulation_steps=K, lora_rank=LORA_RANK,
                     lora_targets="all-linear")
# Exercise 3: full fine-tuning of 512-token rows, EFFECTIVE_ROWS rows per optimizer step, a BUDGET of 6 GiB.
BUDGET_RECIPE, EFFECTIVE_ROWS, BUDGET = Recipe(seq_len=512), 32, 6 * GiB

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


@exercise("num_items_in_batch", lesson=LESSON, context=lambda: {"lengths": LENGTHS, "seq_len": SHORT})
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
@exercise("accumulation_peak", lesson=LESSON, context=lambda: {**_course_context(), "recipe": PEAK_RECIPE})
def accumulation_peak(answer, dims, recipe: Recipe):
    """Peak bytes of one optimizer step of ``recipe`` (k micro-batches, AdamW, fp32; LoRA adapters if the recipe
    has them), within ``PEAK_TOLERANCE`` of ``helpers.estimate.predict``."""
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    steps, batch_size = recipe.gradient_accumulation_steps, recipe.batch_size
    right = predict(d, recipe)
    want = right.peak
    if close(value, want, PEAK_TOLERANCE):
        return True, (f"{human_bytes(want)} ({want / MiB:,.1f} MiB): weights {right.weights / MiB:,.1f} MiB and "
                      f"optimizer state {right.optimizer / MiB:,.1f} MiB as before, the gradients "
                      f"({right.gradients / MiB:,.1f} MiB) kept alive from the first micro-batch, and one "
                      f"micro-batch's activations ({right.activations / MiB:,.1f} MiB).")
    whole = predict(d, recipe.but(batch_size=batch_size * steps, gradient_accumulation_steps=1))
    no_grads = predict(d, recipe.but(gradient_accumulation_steps=1))
    all_divided = whole.peak / steps
    floor_kept = whole.weights + whole.optimizer + whole.activations / steps  # activations / k, gradients forgotten
    for other, hint in (
            (whole.peak, "that is the peak without accumulation, one batch of batch_size x k: with k micro-batches "
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
# Exercise 3: the largest micro-batch that fits a budget at a fixed effective batch
# ------------------------------------------------------------------------------------------------
def split_for_budget(dims, recipe: Recipe, effective_batch: int, budget: int) -> tuple[int, int] | None:
    """(micro_batch, k) with micro_batch x k = ``effective_batch``, the largest micro-batch whose predicted peak
    fits ``budget`` bytes; None if not even micro-batches of one fit."""
    for micro in sorted((b for b in range(1, effective_batch + 1) if effective_batch % b == 0), reverse=True):
        k = effective_batch // micro
        if predict(dims, recipe.but(batch_size=micro, gradient_accumulation_steps=k)).peak <= budget:
            return micro, k
    return None


def _split(answer) -> tuple[float, float]:
    if isinstance(answer, dict):
        keys = {k.strip().lower(): v for k, v in answer.items()}
        micro = next((keys[k] for k in ("micro_batch", "micro", "batch_size") if k in keys), None)
        k = next((keys[k] for k in ("k", "steps", "gradient_accumulation_steps") if k in keys), None)
        if micro is not None and k is not None:
            answer = [micro, k]
    if not isinstance(answer, list) or len(answer) != 2:
        raise AnswerError("give two numbers, `(micro_batch, k)`: rows per micro-batch and micro-batches per step.")
    return as_number(answer[0], "a micro-batch size"), as_number(answer[1], "a number of micro-batches")


@exercise("micro_batch_for_budget", lesson=LESSON,
          context=lambda: {**_course_context(), "recipe": BUDGET_RECIPE, "effective_batch": EFFECTIVE_ROWS,
                           "budget": BUDGET})
def micro_batch_for_budget(answer, dims, recipe: Recipe, effective_batch: int, budget: int):
    """``(micro_batch, k)``: the largest micro-batch whose predicted peak fits ``budget`` with k micro-batches
    making up ``effective_batch`` rows per optimizer step."""
    d = Dims.of(dims)
    micro_value, k_value = _split(answer)
    micro, k = _whole(micro_value), _whole(k_value)
    if micro is None or k is None or micro < 1 or k < 1:
        return False, f"you said ({micro_value:g}, {k_value:g}): both must be whole numbers of at least 1."
    if micro * k != effective_batch:
        return False, (f"({micro}, {k}) makes an optimizer step of {micro * k} rows; the effective batch must stay "
                       f"{effective_batch} rows (micro_batch x k), or the training changes.")
    best = split_for_budget(d, recipe, effective_batch, budget)
    peak = predict(d, recipe.but(batch_size=micro, gradient_accumulation_steps=k)).peak
    if peak > budget:
        return False, (f"micro-batches of {micro} with k={k} are predicted to peak at {peak / GiB:.2f} GiB, over "
                       f"the {budget / GiB:.2f} GiB budget: try a smaller micro-batch (and a larger k).")
    if best is not None and micro < best[0]:
        return False, (f"({micro}, {k}) fits ({peak / GiB:.2f} GiB), but a larger micro-batch fits too: larger "
                       "micro-batches mean fewer, bigger matmuls per step and so less time. Find the largest.")
    return True, (f"micro-batches of {micro}, k={k}: predicted peak {peak / GiB:.2f} GiB of {budget / GiB:.2f}. "
                  "The optimizer sees the same batch of "
                  f"{effective_batch} rows as without accumulation, so training is unchanged; each step just takes "
                  "longer.")
