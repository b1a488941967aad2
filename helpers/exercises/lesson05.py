"""Lesson 05 — QLoRA.

Every target is computed here from the lesson's fixed inputs: the course model's config (``course_dims``), the
reference preset's config (``reference_config``), the lesson's constants below and ``helpers.estimate``; never
from the learner's variables. A ``LoraConfig`` is judged by what peft does with it, applied to a model of the
preset's shapes built on the meta device (lesson 04's ``lora_effects``).
"""

from __future__ import annotations

import functools

from ..checks import AnswerError, as_number, close, exercise, human_bytes, ratio_hint, trusted_dims
from ..estimate import (
    BNB_BLOCK,
    BNB_MIN_8BIT_SIZE,
    BNB_QMAPS,
    LINEAR_NAMES,
    Recipe,
    optimizer_state_bytes,
    predict,
    trainable_params,
    trainable_tensor_sizes,
)
from .lesson04 import covers_every_block, lora_effects

LESSON = "05_qlora"
# Exercise 1: the upcast on a model the lesson cannot load (Llama 3 8B, its shipped config): untied embeddings.
UPCAST_MODEL = "llama-3-8b"
EXACT = 0.0  # exercises 1 and 2: sums of integer products, exact (see ``exact``)
EIGHT_BIT_RANK, EIGHT_BIT_TARGETS = 16, LINEAR_NAMES  # exercise 2: the lesson's adapters, r=16 on every linear layer
# Exercise 3: LLaMA 13B, QLoRA at scale (the lesson's `at_scale_qlora`: nf4, double quantization, bf16 around it,
# one sequence of 512 tokens on a GPU, checkpointing, 32-bit AdamW), a 12 GiB GPU of which 1 GiB is kept for the
# CUDA context and the allocator's slack, and the share of the most trainable parameters that fit which an answer
# must reach (the exercise's "at least 90 %").
PRESET = "llama-13b"
AT_SCALE_QLORA = Recipe(batch_size=1, seq_len=512, device="cuda", gradient_checkpointing=True, weights="nf4",
                        double_quant=True, unquantized="bf16", lora_rank=0, lora_targets="all-linear")
GPU, HEADROOM = 12 * 2**30, 1 * 2**30
BUDGET = GPU - HEADROOM
ENOUGH = 0.9


def exact(value: float, want: int) -> bool:
    """Exercises 1 and 2 are sums of integer products, which floats hold exactly: a byte either way is wrong (a
    forgotten final norm is 8,192 bytes in exercise 1; an absmax per block for one moment only, 0.7 % in 2)."""
    return abs(value - want) <= max(0.5, EXACT * want)


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


def _upcast_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(UPCAST_MODEL))}


def _preset_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(PRESET)), "recipe": AT_SCALE_QLORA, "budget": BUDGET}


# ------------------------------------------------------------------------------------------------
# Exercise 1: what prepare_model_for_kbit_training adds to a base loaded in bf16 (Llama 3 8B by default)
# ------------------------------------------------------------------------------------------------
@exercise("kbit_upcast_bytes", lesson=LESSON, context=_upcast_context, kind="calculate", tolerance=EXACT)
def kbit_upcast_bytes(data, dims):
    """Bytes ``prepare_model_for_kbit_training`` adds to an nf4 model whose other weights were loaded in bf16."""
    d = trusted_dims(dims)
    value = as_number(data, "a number of bytes")
    embeddings = d.embedding_params * (1 if d.tied else 2)
    norms = d.unquantized_params - embeddings
    want = 2 * d.unquantized_params
    if exact(value, want):
        return True, (f"{want:,} bytes ({human_bytes(want)}): {d.unquantized_params:,} unquantized parameters (the "
                      f"embedding{'' if d.tied else ', the untied lm_head'} and {2 * d.layers + 1} norms) go from 2 to "
                      "4 bytes each; the 4-bit weights are untouched.")
    tied_twice = 2 * (2 * d.embedding_params + norms)
    for wrong, hint in ((2 * embeddings, "the norms are upcast too: two per block and the final one."),
                        (want - 2 * d.hidden, "count the final norm too: two per block, plus one after the last "
                                              "block."),
                        (want - 2 * d.layers * d.hidden, "each block has two norms (before attention and before "
                                                         "the MLP), plus the final one."),
                        (4 * d.unquantized_params, "that is their whole fp32 size; the question is what is *added* "
                                                   "(4 - 2 bytes each)."),
                        (2 * d.params, "the 4-bit linear weights stay 4-bit: only the unquantized parameters "
                                       "(embeddings and norms) are upcast."),
                        (tied_twice, "the embedding and lm_head are one tied tensor here: count it once."),
                        (2 * (d.embedding_params + norms), "this model's lm_head is a separate tensor (not tied): "
                                                           "it is upcast too.")):
        if wrong != want and exact(value, wrong):
            return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {0.5: "that is half: is it 2 bytes added per parameter, or did you count only "
                                          "one of two things?",
                                    1 / 8: "that looks like bits, or one byte too few; give bytes.",
                                    8.0: "that looks like bits; give bytes.",
                                    2**-20: "that looks like MiB; the exercise asks for bytes.",
                                    1e-6: "that looks like MB; the exercise asks for bytes.",
                                    2**20 / 1e6: "that mixes MB and MiB: give the number of bytes itself.",
                                    1e6 / 2**20: "that mixes MB and MiB: give the number of bytes itself."},
                      rel=0.005)
    if hint is None and close(value, want, 0.01):
        hint = "close, but not exact: count every unquantized parameter, without rounding."
    return False, f"you said {value:,.0f}. " + (hint or "count the parameters bitsandbytes leaves unquantized "
                                                "(embeddings, norms) and what each gains going from bf16 to fp32.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: AdamW8bit's state for the adapters
# ------------------------------------------------------------------------------------------------
@exercise("adamw8bit_state_bytes", lesson=LESSON, context=_course_context, kind="predict", tolerance=EXACT)
def adamw8bit_state_bytes(data, dims, rank: int = EIGHT_BIT_RANK, targets=EIGHT_BIT_TARGETS):
    """Bytes of ``bnb.optim.AdamW8bit`` state for LoRA adapters of ``rank`` on ``targets``; the shared 2 KiB of
    code tables may be counted or left out (the exercise says so), nothing else may differ."""
    d = trusted_dims(dims)
    value = as_number(data, "a number of bytes")
    recipe = Recipe(lora_rank=rank, lora_targets=targets, optimizer="adamw8bit")
    want = optimizer_state_bytes(d, recipe)  # with the code tables
    sizes = trainable_tensor_sizes(d, recipe)
    tables = BNB_QMAPS if any(s >= BNB_MIN_8BIT_SIZE for s in sizes) else 0
    n = trainable_params(d, recipe)
    if exact(value, want) or exact(value, want - tables):
        counted = " (with the 2 KiB of shared code tables)" if tables and exact(value, want) else ""
        return True, (f"{value:,.0f} bytes ({human_bytes(value)}){counted} for {n:,} adapter parameters, "
                      f"{value / n:.2f} bytes each instead of AdamW's 8: two uint8 moments and an fp32 absmax per "
                      f"{BNB_BLOCK} values, except tensors under {BNB_MIN_8BIT_SIZE:,} values, which keep fp32 "
                      "moments.")

    def blocks(s):
        return -(-s // BNB_BLOCK)

    small = sum(8 * s for s in sizes if s < BNB_MIN_8BIT_SIZE)
    large = [s for s in sizes if s >= BNB_MIN_8BIT_SIZE]
    blockwise = sum(2 * s + 8 * blocks(s) for s in sizes)
    one_absmax = small + sum(2 * s + 4 * blocks(s) for s in large)
    no_absmax = small + sum(2 * s for s in large)
    floor_blocks = small + sum(2 * s + 8 * (s // BNB_BLOCK) for s in large)
    for wrong, hint in ((8 * n, "that is 32-bit AdamW (two fp32 moments); AdamW8bit stores each moment in one byte."),
                        (8 * n + 4 * len(sizes), "that is torch.optim.AdamW's state; AdamW8bit stores each moment "
                                                 "in one byte."),
                        (2 * n, "two bytes a parameter is only the uint8 moments: each block of 256 values also "
                                "keeps an fp32 absmax per moment, and small tensors stay 32-bit."),
                        (blockwise, "close: but tensors with fewer than 4,096 values (min_8bit_size) keep two fp32 "
                                    "moments. Which adapter matrices are that small?"),
                        (one_absmax, "each of the two moments has its own absmax per block: 2 x 4 bytes per block."),
                        (no_absmax, "each block of 256 values also keeps an fp32 absmax for each moment."),
                        (floor_blocks, "a last, partial block of values still needs its absmax: round the number of "
                                       "blocks up."),
                        (n, "that is one byte a parameter: AdamW keeps two moments.")):
        for extra in (0, tables):
            if wrong + extra not in (want, want - tables) and exact(value, wrong + extra):
                return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {8.0: "that looks like bits; give bytes.",
                                    2**-20: "that looks like MiB; the exercise asks for bytes.",
                                    1e-6: "that looks like MB; the exercise asks for bytes.",
                                    2**20 / 1e6: "that mixes MB and MiB: give the number of bytes itself.",
                                    1e6 / 2**20: "that mixes MB and MiB: give the number of bytes itself.",
                                    1 / d.layers: "that is one block; every block has its adapters."}, rel=0.005)
    return False, f"you said {value:,.0f}. " + (hint or "For each adapter matrix (A is r x in, B is out x r): "
                                                "2 bytes per value + 2 x 4 bytes per block of 256, or 8 bytes per "
                                                "value if it has fewer than 4,096 values.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: the most adapter parameters that fit a memory budget
# ------------------------------------------------------------------------------------------------
TARGET_CHOICES = [tuple(t for i, t in enumerate(LINEAR_NAMES) if mask >> i & 1) for mask in range(1, 2 ** 7)]


@functools.lru_cache(maxsize=16)
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


@exercise("lora_under_budget", lesson=LESSON, context=_preset_context, kind="calculate")
def lora_under_budget(data, dims, recipe: Recipe, budget: int):
    """A ``LoraConfig`` whose predicted peak under ``recipe`` fits ``budget`` bytes, with at least 90 % of the most
    trainable parameters that fit. Judged by applying it with peft to a model of ``dims``' shapes: what peft
    trains must be plain LoRA (one rank, the same layer types in every block, nothing else trainable), the
    form ``predict`` models."""
    d = trusted_dims(dims)
    if not isinstance(recipe, Recipe) or type(budget) is not int:
        raise TypeError("the context's recipe must be a Recipe and its budget a number of bytes")
    effects = lora_effects(data, d)
    kinds = effects.kinds()
    if not kinds:
        raise AnswerError(f"peft adapts no layer with this config: choose target_modules among {list(LINEAR_NAMES)} "
                          "or 'all-linear' (the Llama module names).")
    unknown = sorted(str(k) for k in kinds - set(LINEAR_NAMES))
    if unknown:
        return False, (f"peft adapts {unknown}: choose among {list(LINEAR_NAMES)} for target_modules, or "
                       "'all-linear' (the linear layers of the blocks, which predict's LoRA model covers).")
    partial = [k for k in LINEAR_NAMES if k in kinds and not covers_every_block(effects, k)]
    if partial:
        k = partial[0]
        return False, (f"peft adapts {k} in {len(effects.blocks_of(k))} of the {d.layers} blocks: predict models "
                       "adapters on the same layer types in every block (leave out layers_to_transform, "
                       "exclude_modules and the like).")
    if effects.extras:
        return False, (f"peft would train more than the adapters' A and B: {effects.extras_hint()}, which "
                       "predict's LoRA model does not count. Use plain LoRA.")
    if effects.trainable == 0:
        return False, ("peft trains nothing with this config: inference_mode=True freezes the adapters (leave it "
                       "False for training).")
    ranks = sorted(effects.ranks())
    if len(ranks) > 1:
        return False, (f"peft gives the adapters ranks {ranks} (rank_pattern): predict models one rank for every "
                       "adapted layer; give one r.")
    targets = tuple(t for t in LINEAR_NAMES if t in kinds)
    dropout = as_number(getattr(effects.config, "lora_dropout", 0.0) or 0.0, "lora_dropout")
    mine = recipe.but(lora_rank=ranks[0], lora_targets=targets, lora_dropout=dropout)
    n = effects.trainable
    if n != trainable_params(d, mine):  # peft trains something predict does not describe: say so, judge nothing
        return False, (f"peft trains {n:,} parameters with this config, which is not plain LoRA of r={ranks[0]} on "
                       f"{', '.join(targets)}; use plain LoRA.")
    peak = predict(d, mine).peak
    best_n, best_r, best_targets = most_trainable(d, recipe, budget)
    gib = 2 ** 30
    if peak > budget:
        return False, (f"r={ranks[0]} on {len(targets)} layer type(s) is predicted to peak at "
                       f"{peak / gib:.2f} GiB, over the {budget / gib:.2f} GiB budget: lower the rank or adapt "
                       "fewer layers (predict(dims, recipe.but(lora_rank=..., lora_targets=...)) tells you)"
                       + (f"; lora_dropout={dropout} also keeps a dropped-out copy of each adapter's "
                          "input" if dropout else "") + ".")
    if n < ENOUGH * best_n:
        return False, (f"r={ranks[0]} fits ({peak / gib:.2f} GiB) with {n:,} trainable parameters, but "
                       f"{best_n:,} fit in the budget: raise the rank (each unit of rank on every linear layer "
                       f"adds {trainable_params(d, recipe.but(lora_rank=1, lora_targets=LINEAR_NAMES)):,}).")
    return True, (f"r={ranks[0]} on {', '.join(targets)}: {n:,} trainable parameters (peft's count), predicted peak "
                  f"{peak / gib:.2f} GiB of {budget / gib:.2f}. The most that fits is {best_n:,} "
                  f"(r={best_r} on {len(best_targets)} layer type(s)). Memory barely limits LoRA's rank; the "
                  "frozen weights set the floor.")
