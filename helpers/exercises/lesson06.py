"""Lesson 06 — Mixed precision: fp16 and bf16.

Targets come from the lesson's fixed inputs: the course model's config (``course_dims``), a shipped reference
config (``CROSSOVER_MODEL``, exercise 3: a model the lesson does not run), the constants below and
``helpers.estimate.predict``; exercise 1 judges against the lesson's own measured largest gradient.
"""

from __future__ import annotations

import math

from ..checks import as_number, exercise, human_bytes, ratio_hint
from ..estimate import Dims, Recipe, predict

LESSON = "06_mixed_precision"
FP16_MAX = 65504.0
MAX_BATCH = 4096  # how far the crossover search looks
SEQ_LEN = 128  # exercise 3: sequences of 128 tokens (the notebook's sweep and its exercise text)
# Exercise 3 asks about another model than the course model the notebook sweeps, so no printed row answers it.
CROSSOVER_MODEL = "smollm2-1.7b"


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


def _crossover_context() -> dict:
    from ..capstone import course_dims
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(CROSSOVER_MODEL)), "seq_len": SEQ_LEN, "course": course_dims()}


def _whole(value: float) -> int | None:
    return int(value) if float(value).is_integer() else None


# ------------------------------------------------------------------------------------------------
# Exercise 2: the 16-bit weight copies autocast keeps for backward
# ------------------------------------------------------------------------------------------------
@exercise("autocast_copy_bytes", lesson=LESSON, context=_course_context, kind="predict", tolerance=0.0)
def autocast_copy_bytes(answer, dims):
    """Bytes of the bf16 weight copies a forward under autocast leaves in the graph (every linear layer's
    weight, and the lm_head's). Exact: the answer is a product of whole numbers."""
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    blocks = d.layers * d.block_linear_params
    want = 2 * (blocks + d.embedding_params)
    if abs(value - want) < 0.5:  # a whole number of bytes; float arithmetic may leave a fraction
        return True, (f"{want:,} bytes ({human_bytes(want)}): 2 bytes for each of the {blocks:,} weights of the "
                      f"blocks' linear layers and the {d.embedding_params:,} of the lm_head. The fp32 weights stay "
                      "too: mixed precision adds this copy, it does not replace anything.")
    for wrong, hint in ((2 * blocks, "the lm_head is a linear layer too (its weight is the tied embedding): "
                                     "autocast copies it as well."),
                        (2 * d.params, "norm weights and the embedding lookup are not cast: count the linear "
                                       "layers (the blocks' seven and the lm_head)."),
                        (4 * (blocks + d.embedding_params), "that is the fp32 size; the copies are 16-bit, 2 bytes "
                                                            "a weight."),
                        (2 * (blocks + 2 * d.embedding_params), "the embedding lookup runs in fp32; only the lm_head "
                                                                "is a matmul autocast casts."),
                        (2 * d.block_linear_params, f"that is one block's copies: all {d.layers} blocks run their "
                                                    "linear layers under autocast, and the lm_head too."),
                        (2 * ((d.layers - 1) * d.block_linear_params + d.embedding_params),
                         f"one block short: all {d.layers} blocks (dims.layers) cast their seven linear layers.")):
        if wrong != want and abs(value - wrong) < 0.5:
            return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {1 / 8: "that looks like bits of something, or bytes / 8: give bytes.",
                                    1 / 2: "half of it: 2 bytes per weight, not 1.",
                                    8: "that looks like bits: give bytes.",
                                    2**-20: "that looks like MiB: give bytes.",
                                    1e-6: "that looks like MB: give bytes."}, rel=0.01)
    advice = ("count the weights of every linear layer (seven per block, dims.block_linear_params, and the lm_head: "
              "vocab x hidden) at 2 bytes.")
    return False, f"you said {value:,.0f}. " + (hint or advice)


# ------------------------------------------------------------------------------------------------
# Exercise 1: the largest loss scale that does not overflow
# ------------------------------------------------------------------------------------------------
def largest_safe_scale(largest_gradient: float) -> float:
    """The largest power of two S with largest_gradient x S <= 65504 (what GradScaler's halving finds)."""
    return 2.0 ** math.floor(math.log2(FP16_MAX / largest_gradient))


@exercise("largest_loss_scale", lesson=LESSON, measured=("largest_gradient",), kind="calculate", tolerance=0.0)
def largest_loss_scale(answer, largest_gradient):
    """The exponent n of the largest power-of-two loss scale S = 2**n that keeps the lesson's measured
    ``largest_gradient`` finite in fp16. Exact: a whole number. (The exponent, not S itself: S is a power of two,
    and every power of two from 1,024 up reads as a small number in KiB or MiB somewhere on any page.)"""
    g = as_number(largest_gradient, "the measured largest gradient (a number)")
    if not g > 0:
        return False, "the measured largest_gradient must be a positive number: rerun the cell that measures it."
    value = as_number(answer, "an exponent n (a whole number such as 10, for S = 2 ** 10)")
    want = int(math.log2(largest_safe_scale(g)))
    scale = 2.0 ** want
    if value == want:
        return True, (f"S = 2^{want} = {scale:,.0f}, so n = {want}: {g:.4g} x {scale:,.0f} = {g * scale:,.0f} <= "
                      "65,504, and twice that would overflow.")
    n = _whole(value)
    if value == scale or (n is not None and n > 64 and math.log2(n) % 1 == 0):
        return False, f"you said {value:,.0f}: that is a scale S; give its exponent n (S = 2 ** n)."
    if n is None:
        return False, (f"you said {value:g}: GradScaler only uses powers of two (multiplying by one is exact in "
                       "floating point), so n is a whole number: round log2(65,504 / largest_gradient) down.")
    if n > 1023:
        return False, f"you said {value:g}: far above any loss scale fp32 can even hold; n is a small whole number."
    if n > want:
        return False, (f"you said {n}: {g:.4g} x 2^{n} is above fp16's largest value, 65,504 — that gradient would "
                       "become inf (the step is skipped).")
    return False, (f"you said {n}: 2^{n} is safe, but not the largest — 2^{n + 1} is safe too. The larger the scale, "
                   "the more small gradients survive.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: from which batch size does autocast lower the peak?
# ------------------------------------------------------------------------------------------------
def autocast_crossover(dims, seq_len: int, recipe: Recipe = Recipe()) -> int | None:
    """The smallest batch size at which autocast bf16 predicts a lower peak than fp32, or None."""
    for b in range(1, MAX_BATCH + 1):
        base = recipe.but(batch_size=b, seq_len=seq_len)
        if predict(dims, base.but(autocast="bf16")).peak < predict(dims, base).peak:
            return b
    return None


@exercise("autocast_pays_from_batch", lesson=LESSON, context=_crossover_context, kind="calculate", tolerance=0.0)
def autocast_pays_from_batch(answer, dims, seq_len: int, course=None):
    """The smallest batch size (sequences of ``seq_len``) at which autocast bf16's predicted peak is below fp32's,
    for the model ``dims`` (the notebook's reference model). ``course``: the lesson's own model, whose crossover
    the notebook shows, for a specific hint when that is the answer given."""
    d = Dims.of(dims)
    want = autocast_crossover(d, seq_len)
    if want is None:
        return False, "for these shapes autocast never lowers the predicted peak; tell your instructor."
    value = as_number(answer, "a batch size (a whole number)")
    b = _whole(value)
    if b is None or b < 1:
        return False, f"you said {value:g}: a batch size is a whole number of sequences, at least 1."

    def peaks(batch):
        r = Recipe(batch_size=batch, seq_len=seq_len)
        return predict(d, r).peak, predict(d, r.but(autocast="bf16")).peak

    if course is not None and Dims.of(course) != d and b != want and b == autocast_crossover(Dims.of(course), seq_len):
        return False, (f"you said {b}: that is the course model's crossover (the sweep above). This model has "
                       f"{d.layers} blocks of hidden size {d.hidden}: its weight copies and its activations per token "
                       "are both larger, in a different ratio — run predict with its own dims.")
    if b > MAX_BATCH:
        return False, f"you said {b:,}: autocast is lower well before that; find the smallest batch size."
    fp32, amp = peaks(b)
    if b == want:
        return True, (f"batch {b}: fp32 {fp32 / 2**20:,.0f} MiB, autocast {amp / 2**20:,.0f} MiB. Below it, the 16-bit "
                      "weight copies cost more than the 16-bit activations save.")
    if b > want:
        return False, (f"at batch {b} autocast is already lower ({amp / 2**20:,.0f} vs {fp32 / 2**20:,.0f} MiB), but "
                       "it is lower at a smaller batch too: find the smallest.")
    return False, (f"at batch {b} autocast's predicted peak is {amp / 2**20:,.0f} MiB against fp32's "
                   f"{fp32 / 2**20:,.0f}: not lower yet. Compare predict(dims, Recipe(batch_size=b, "
                   f"seq_len={seq_len})) with and without autocast='bf16' for growing b.")
