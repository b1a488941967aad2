"""Lesson 06 — Mixed precision: fp16 and bf16."""

from __future__ import annotations

import math

from ..checks import as_number, close, exercise, human_bytes, ratio_hint
from ..estimate import Dims, Recipe, predict

LESSON = "06_mixed_precision"
FP16_MAX = 65504.0
MAX_BATCH = 4096  # how far the crossover search looks


# ------------------------------------------------------------------------------------------------
# Exercise 1: the 16-bit weight copies autocast keeps for backward
# ------------------------------------------------------------------------------------------------
@exercise("autocast_copy_bytes", lesson=LESSON)
def autocast_copy_bytes(answer, dims=None):
    """Bytes of the bf16 weight copies a forward under autocast leaves in the graph (every linear layer's
    weight, and the lm_head's)."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    blocks = d.layers * d.block_linear_params
    want = 2 * (blocks + d.embedding_params)
    if close(value, want, 1e-6):
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
                                                                "is a matmul autocast casts.")):
        if wrong != want and close(value, wrong, 1e-4):
            return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {1 / 8: "that looks like bits of something, or bytes / 8: give bytes.",
                                    1 / 2: "half of it: 2 bytes per weight, not 1."}, rel=0.01)
    advice = ("count the weights of every linear layer (seven per block, dims.block_linear_params, and the lm_head: "
              "vocab x hidden) at 2 bytes.")
    return False, f"you said {value:,.0f}. " + (hint or advice)


# ------------------------------------------------------------------------------------------------
# Exercise 2: the largest loss scale that does not overflow
# ------------------------------------------------------------------------------------------------
def largest_safe_scale(largest_gradient: float) -> float:
    """The largest power of two S with largest_gradient x S <= 65504 (what GradScaler's halving finds)."""
    return 2.0 ** math.floor(math.log2(FP16_MAX / largest_gradient))


@exercise("largest_loss_scale", lesson=LESSON)
def largest_loss_scale(answer, largest_gradient=None):
    """The largest power-of-two loss scale that keeps ``largest_gradient`` finite in fp16."""
    if largest_gradient is None:
        return False, "run the cells above first: pass largest_gradient=largest_gradient."
    value = as_number(answer, "a loss scale (a number such as 1024.0)")
    want = largest_safe_scale(largest_gradient)
    if close(value, want, 1e-9):
        return True, (f"{want:g} = 2^{int(math.log2(want))}: {largest_gradient:.4g} x {want:g} = "
                      f"{largest_gradient * want:,.0f} <= 65,504, and twice that would overflow.")
    if value <= 0:
        return False, f"you said {value:g}: a loss scale multiplies the loss, so it is a positive number."
    exponent = math.log2(want)
    if close(value, exponent, 1e-9):
        return False, f"you gave the exponent {value:g}; give the scale itself, 2 ** {value:g}."
    if value * largest_gradient > FP16_MAX:
        return False, (f"you said {value:g}: {largest_gradient:.4g} x {value:g} = {largest_gradient * value:,.0f} is "
                       "above fp16's largest value, 65,504 — that gradient would become inf (the step is skipped).")
    if not float(value).is_integer() or math.log2(value) % 1:
        return False, (f"you said {value:g}: GradScaler only uses powers of two (multiplying by one is exact in "
                       "floating point); round 65,504 / largest_gradient down to a power of two.")
    return False, (f"you said {value:g}: that is safe, but not the largest — {2 * value:g} is safe too. The larger "
                   "the scale, the more small gradients survive.")


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


@exercise("autocast_pays_from_batch", lesson=LESSON)
def autocast_pays_from_batch(answer, dims=None, seq_len: int = 128):
    """The smallest batch size (sequences of ``seq_len``) at which autocast bf16's predicted peak is below fp32's."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    want = autocast_crossover(d, seq_len)
    if want is None:
        return False, "for these shapes autocast never lowers the predicted peak; tell your instructor."
    value = as_number(answer, "a batch size (a whole number)")
    if value != int(value) or value < 1:
        return False, f"you said {value:g}: a batch size is a whole number of sequences, at least 1."
    b = int(value)

    def peaks(batch):
        r = Recipe(batch_size=batch, seq_len=seq_len)
        return predict(d, r).peak, predict(d, r.but(autocast="bf16")).peak

    fp32, amp = peaks(b)
    if b == want:
        return True, (f"batch {b}: fp32 {fp32 / 2**20:,.0f} MiB, autocast {amp / 2**20:,.0f} MiB. Below it, the 16-bit "
                      "weight copies cost more than the 16-bit activations save.")
    if b > want:
        return False, (f"at batch {b} autocast is already lower ({amp / 2**20:,.0f} vs {fp32 / 2**20:,.0f} MiB), but "
                       "it is lower at a smaller batch too: find the smallest.")
    return False, (f"at batch {b} autocast's predicted peak is {amp / 2**20:,.0f} MiB against fp32's "
                   f"{fp32 / 2**20:,.0f}: not lower yet. Compare predict(dims, Recipe(batch_size=b, seq_len=...)) "
                   "with and without autocast='bf16' for growing b.")
