"""Lesson 07 — Gradient accumulation."""

from __future__ import annotations

from ..checks import as_number, close, exercise, human_bytes, ratio_hint
from ..estimate import LINEAR_NAMES, Dims, Recipe, predict

LESSON = "07_gradient_accumulation"
MiB = 2**20


# ------------------------------------------------------------------------------------------------
# Exercise 1: the token count Trainer passes as num_items_in_batch (predict)
# ------------------------------------------------------------------------------------------------
def _micro_batches(lengths) -> list[list[int]]:
    """``lengths`` as a list of micro-batches, each a list of real (unpadded) tokens per row."""
    return [list(m) if isinstance(m, (list, tuple)) else [m] for m in lengths]


@exercise("num_items_in_batch", lesson=LESSON)
def num_items_in_batch(answer, lengths=None, seq_len: int | None = None):
    """The number of predicted tokens in one optimizer step: over every micro-batch, each row of ``L`` real
    tokens (padding after them, labelled -100) has ``L - 1`` targets, because a causal LM predicts token t+1."""
    if lengths is None:
        return False, "run the cells above first: the check needs the rows' real lengths (pass lengths=...)."
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
             (len(micro), "that counts micro-batches; num_items_in_batch counts tokens the loss is computed on."),
             (sum(rows) - len(micro), "subtract one per row, not one per micro-batch: every row is shifted.")]
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
@exercise("accumulation_peak", lesson=LESSON)
def accumulation_peak(answer, dims=None, batch_size: int = 1, seq_len: int = 64, steps: int = 4,
                      lora_rank: int = 0, lora_targets=LINEAR_NAMES):
    """Peak bytes of one optimizer step of ``steps`` micro-batches of ``batch_size`` x ``seq_len`` (AdamW, fp32;
    LoRA adapters if ``lora_rank``), within 1 % of ``helpers.estimate.predict``."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    recipe = Recipe(batch_size=batch_size, seq_len=seq_len, gradient_accumulation_steps=steps, lora_rank=lora_rank,
                    lora_targets=lora_targets)
    right = predict(d, recipe)
    want = right.peak
    if close(value, want, 0.01):
        return True, (f"{human_bytes(want)}: weights {right.weights / MiB:,.1f} MiB and optimizer state "
                      f"{right.optimizer / MiB:,.1f} MiB as before, the gradients ({right.gradients / MiB:,.1f} MiB) "
                      f"kept alive from the first micro-batch, and one micro-batch's activations "
                      f"({right.activations / MiB:,.1f} MiB).")
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
                         "add them.")):
        if not close(other, want, 0.01) and close(value, other, 0.01):
            return False, f"you said {human_bytes(value)}: {hint}"
    hint = ratio_hint(value, want, {2**-20: "that looks like MiB; give bytes.", 1e-6: "that looks like MB; give bytes.",
                                    2**-30: "that looks like GiB; give bytes."}, rel=0.02)
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


@exercise("micro_batch_for_budget", lesson=LESSON)
def micro_batch_for_budget(answer, dims=None, recipe: Recipe | None = None, effective_batch: int | None = None,
                           budget: int | None = None):
    """``(micro_batch, k)``: the largest micro-batch whose predicted peak fits ``budget`` with k micro-batches
    making up ``effective_batch`` rows per optimizer step."""
    if dims is None or recipe is None or effective_batch is None or budget is None:
        return False, "run the cells above first: the check needs dims=, recipe=, effective_batch= and budget=."
    d = Dims.of(dims)
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return False, "give two numbers, `(micro_batch, k)`: rows per micro-batch and micro-batches per step."
    micro, k = as_number(answer[0], "a micro-batch size"), as_number(answer[1], "a number of micro-batches")
    if micro != int(micro) or k != int(k) or micro < 1 or k < 1:
        return False, f"you said ({micro:g}, {k:g}): both must be whole numbers of at least 1."
    micro, k = int(micro), int(k)
    best = split_for_budget(d, recipe, effective_batch, budget)
    gib = 2**30
    if micro * k != effective_batch:
        return False, (f"({micro}, {k}) makes an optimizer step of {micro * k} rows; the effective batch must stay "
                       f"{effective_batch} rows (micro_batch x k), or the training changes.")
    peak = predict(d, recipe.but(batch_size=micro, gradient_accumulation_steps=k)).peak
    if peak > budget:
        return False, (f"micro-batches of {micro} with k={k} are predicted to peak at {peak / gib:.2f} GiB, over "
                       f"the {budget / gib:.2f} GiB budget: try a smaller micro-batch (and a larger k).")
    if best is not None and micro < best[0]:
        return False, (f"({micro}, {k}) fits ({peak / gib:.2f} GiB), but a larger micro-batch fits too: larger "
                       "micro-batches mean fewer, bigger matmuls per step and so less time. Find the largest.")
    return True, (f"micro-batches of {micro}, k={k}: predicted peak {peak / gib:.2f} GiB of {budget / gib:.2f}. "
                  "The optimizer sees the same batch of "
                  f"{effective_batch} rows as without accumulation, so training is unchanged; each step just takes "
                  "longer.")
