"""Lesson 05 — QLoRA."""

from __future__ import annotations

from ..checks import as_number, close, exercise, human_bytes, ratio_hint
from ..estimate import (
    LINEAR_NAMES,
    Dims,
    Recipe,
    optimizer_state_bytes,
    predict,
    trainable_params,
    trainable_tensor_sizes,
)

LESSON = "05_qlora"


# ------------------------------------------------------------------------------------------------
# Exercise 1: what prepare_model_for_kbit_training adds to a base loaded in bf16
# ------------------------------------------------------------------------------------------------
@exercise("kbit_upcast_bytes", lesson=LESSON)
def kbit_upcast_bytes(answer, dims=None):
    """Bytes ``prepare_model_for_kbit_training`` adds to an nf4 model whose other weights were loaded in bf16."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    embeddings = d.embedding_params * (1 if d.tied else 2)
    norms = d.unquantized_params - embeddings
    want = 2 * d.unquantized_params
    if close(value, want, 1e-6):
        return True, (f"{want:,} bytes ({human_bytes(want)}): {d.unquantized_params:,} unquantized parameters (the "
                      f"embedding{'' if d.tied else 's and lm_head'} and {2 * d.layers + 1} norms) go from 2 to 4 "
                      "bytes each; the 4-bit weights are untouched.")
    tied_twice = 2 * (2 * d.embedding_params + norms)
    for wrong, hint in ((2 * embeddings, "the norms are upcast too: two per block and the final one."),
                        (4 * d.unquantized_params, "that is their whole fp32 size; the question is what is *added* "
                                                   "(4 - 2 bytes each)."),
                        (2 * d.params, "the 4-bit linear weights stay 4-bit: only the unquantized parameters "
                                       "(embeddings and norms) are upcast."),
                        (tied_twice, "the embedding and lm_head are one tied tensor here: count it once.")):
        if wrong != want and close(value, wrong, 1e-4):
            return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {0.5: "that is half: is it 2 bytes added per parameter, or did you count only "
                                         "one of two things?",
                                    1 / 8: "that looks like bits, or one byte too few; give bytes."}, rel=0.01)
    return False, f"you said {value:,.0f}. " + (hint or "count the parameters bitsandbytes leaves unquantized "
                                                "(embeddings, norms) and what each gains going from bf16 to fp32.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: AdamW8bit's state for the adapters
# ------------------------------------------------------------------------------------------------
@exercise("adamw8bit_state_bytes", lesson=LESSON)
def adamw8bit_state_bytes(answer, dims=None, rank: int = 16, targets=LINEAR_NAMES):
    """Bytes of ``bnb.optim.AdamW8bit`` state for LoRA adapters of ``rank`` on ``targets`` (allow 0.1 %)."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    recipe = Recipe(lora_rank=rank, lora_targets=targets, optimizer="adamw8bit")
    want = optimizer_state_bytes(d, recipe)
    n = trainable_params(d, recipe)
    if close(value, want, 1e-3):
        return True, (f"{want:,} bytes ({human_bytes(want)}) for {n:,} adapter parameters, "
                      f"{want / n:.2f} bytes each instead of AdamW's 8: two uint8 moments and an fp32 absmax per "
                      "256 values, except tensors under 4,096 values, which keep fp32 moments.")
    sizes = trainable_tensor_sizes(d, recipe)
    blockwise = sum(2 * s + 8 * -(-s // 256) for s in sizes)
    for wrong, hint in ((8 * n, "that is 32-bit AdamW (two fp32 moments); AdamW8bit stores each moment in one byte."),
                        (8 * n + 4 * len(sizes), "that is torch.optim.AdamW's state; AdamW8bit stores each moment "
                                                 "in one byte."),
                        (2 * n, "two bytes a parameter is only the uint8 moments: each block of 256 values also "
                                "keeps an fp32 absmax per moment, and small tensors stay 32-bit."),
                        (blockwise, "close: but tensors with fewer than 4,096 values (min_8bit_size) keep two fp32 "
                                    "moments. Which adapter matrices are that small?"),
                        (n, "that is one byte a parameter: AdamW keeps two moments.")):
        if wrong != want and close(value, wrong, 1e-3):
            return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {8.0: "that looks like bits; give bytes."}, rel=0.02)
    return False, f"you said {value:,.0f}. " + (hint or "for each adapter matrix (A is r x in, B is out x r): "
                                                "2 bytes per value + 2 x 4 bytes per block of 256, or 8 bytes per "
                                                "value if it has fewer than 4,096 values.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: the most adapter parameters that fit a memory budget
# ------------------------------------------------------------------------------------------------
TARGET_CHOICES = [tuple(t for i, t in enumerate(LINEAR_NAMES) if mask >> i & 1) for mask in range(1, 2 ** 7)]


def most_trainable(dims, recipe: Recipe, budget: int) -> tuple[int, int, tuple[str, ...]]:
    """(trainable parameters, rank, targets) of the largest LoRA that ``predict`` fits in ``budget`` bytes."""
    best = (0, 0, ())
    for targets in TARGET_CHOICES:
        low, high = 0, 4096  # the peak grows with the rank: bisect for the largest rank that fits
        while low < high:
            mid = (low + high + 1) // 2
            if predict(dims, recipe.but(lora_rank=mid, lora_targets=targets)).peak <= budget:
                low = mid
            else:
                high = mid - 1
        if low:
            best = max(best, (trainable_params(dims, recipe.but(lora_rank=low, lora_targets=targets)), low, targets))
    return best


@exercise("lora_under_budget", lesson=LESSON)
def lora_under_budget(answer, dims=None, recipe: Recipe | None = None, budget: int | None = None):
    """A ``LoraConfig`` whose predicted peak under ``recipe`` fits ``budget`` bytes, with at least 90 % of the
    most trainable parameters that fit."""
    from peft import LoraConfig

    if dims is None or recipe is None or budget is None:
        return False, "run the cells above first: the check needs dims=, recipe= and budget=."
    if not isinstance(answer, LoraConfig):
        return False, f"give a `peft.LoraConfig(...)` (you gave a {type(answer).__name__})."
    targets = answer.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    unknown = [] if targets == "all-linear" else [t for t in targets or () if t not in LINEAR_NAMES]
    if not targets or unknown:
        return False, (f"target_modules {unknown or targets!r}: choose among {list(LINEAR_NAMES)} or 'all-linear' "
                       "(these are the Llama module names).")
    mine = recipe.but(lora_rank=answer.r, lora_targets=targets, lora_dropout=answer.lora_dropout or 0.0)
    peak, n = predict(dims, mine).peak, trainable_params(dims, mine)
    best_n, best_r, best_targets = most_trainable(dims, recipe, budget)
    gib = 2 ** 30
    if peak > budget:
        return False, (f"r={answer.r} on {len(mine.lora_targets)} layer type(s) is predicted to peak at "
                       f"{peak / gib:.2f} GiB, over the {budget / gib:.2f} GiB budget: lower the rank or adapt "
                       "fewer layers (predict(dims, recipe.but(lora_rank=..., lora_targets=...)) tells you)"
                       + (f"; lora_dropout={answer.lora_dropout} also keeps a dropped-out copy of each adapter's "
                          "input" if answer.lora_dropout else "") + ".")
    if n < 0.9 * best_n:
        return False, (f"r={answer.r} fits ({peak / gib:.2f} GiB) with {n:,} trainable parameters, but "
                       f"{best_n:,} fit in the budget: raise the rank (each unit of rank on every linear layer "
                       f"adds {trainable_params(dims, recipe.but(lora_rank=1, lora_targets=LINEAR_NAMES)):,}).")
    return True, (f"r={answer.r} on {', '.join(mine.lora_targets)}: {n:,} trainable parameters, predicted peak "
                  f"{peak / gib:.2f} GiB of {budget / gib:.2f}. The most that fits is {best_n:,} "
                  f"(r={best_r} on {len(best_targets)} layer type(s)). Memory barely limits LoRA's rank; the "
                  "frozen weights set the floor.")
