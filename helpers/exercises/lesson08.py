"""Lesson 08 — Optimizers that cost less.

Exercises 1 and 2 are predictions, asked before the lesson measures the state and the step (their targets come
from the course model's config, ``course_dims``, and ``helpers.estimate``); exercise 3 is a diagnosis judged
against the lesson's own measured peaks, perplexities and run-to-run noise.
"""

from __future__ import annotations

from ..checks import AnswerError, as_number, close, exercise, human_bytes
from ..estimate import Dims, Recipe, optimizer_state_bytes, trainable_params, trainable_tensor_shapes

LESSON = "08_optimizers"
OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "paged_adamw8bit", "adafactor")  # the estimator's names
# Exercise 2 (relative): bytes per parameter rounded to two decimals are honest, and rounding 8.0116 to 8.01 is
# 0.02 % off; 0.07 % allows any two-decimal rounding of the answers (8.01 +- 0.005 is 0.0625 %) and fails leaving
# out the small terms the lesson names: 8-bit AdamW's block scales (10.00 instead of 10.03, 0.33 %) and
# Adafactor's factored state (8.00 instead of 8.0116, 0.14 %).
PER_PARAMETER_TOLERANCE = 7e-4


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


def _key(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch.isalnum())


# Names a learner may reasonably use for the estimator's: Trainer's optim strings and the class names.
_ALIASES = {_key(k): k for k in OPTIMIZERS} | {"adamwtorch": "adamw", "adamwtorchfused": "adamw",
                                                "adamw8bitbnb": "adamw8bit", "bnbadamw8bit": "adamw8bit"}


# ------------------------------------------------------------------------------------------------
# Exercise 1: Adafactor's factored state for full fine-tuning
# ------------------------------------------------------------------------------------------------
@exercise("adafactor_state_bytes", lesson=LESSON, context=_course_context, kind="predict", tolerance=0.0)
def adafactor_state_bytes(answer, dims):
    """Bytes of transformers' ``Adafactor`` state (beta1=None) for full fine-tuning of a model of ``dims``. Exact,
    with or without the one fp32 RMS scalar per tensor (the exercise allows leaving those out): every other
    term is a whole number of bytes the learner can count, the final norm's 4 x hidden included."""
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    want = optimizer_state_bytes(d, Recipe(optimizer="adafactor"))
    shapes = trainable_tensor_shapes(d, Recipe())
    n = trainable_params(d, Recipe())
    matrices = [s for s in shapes if len(s) == 2]
    vectors = sum(s[0] for s in shapes if len(s) == 1)
    scalars = 4 * len(shapes)  # one fp32 RMS per tensor: allowed either way

    def near(other):  # an answer with or without the RMS scalars
        return abs(value - other) < 0.5 or abs(value - (other - scalars)) < 0.5

    if near(want):
        return True, (f"{want:,} bytes ({human_bytes(want)}) for {n:,} parameters, {want / n:.4f} bytes each: one "
                      f"fp32 value per row and per column of each of the {len(matrices)} matrices, a full fp32 "
                      f"second moment for the {len(shapes) - len(matrices)} vectors (the norms), and no first "
                      "moment. AdamW would keep 8 bytes a parameter.")
    rows_only = 4 * (sum(o for o, _ in matrices) + vectors) + scalars
    cols_only = 4 * (sum(i for _, i in matrices) + vectors) + scalars
    no_vectors = 4 * sum(o + i for o, i in matrices) + scalars
    vectors_factored = want + 4 * vectors  # as if a vector had a "row" and a "column" of its own
    wrong = [(want - 4 * d.hidden, "the final norm (model.norm, dims.hidden values after the last block) is trained "
                                   "too: its vector keeps a full fp32 second moment, 4 x hidden bytes."),
             (want - 4 * 2 * d.hidden * d.layers, "each block has two norm weights (input and post-attention "
                                                  "layernorm), each with a full fp32 second moment: 2 x 4 x hidden "
                                                  "bytes per block."),
             (want - 4 * d.hidden * d.layers, "each block has two norm weights, not one: 2 x 4 x hidden bytes per "
                                              "block."),
             (rows_only, "that counts one value per row only: a factored matrix keeps a row vector *and* a column "
                         "vector."),
             (cols_only, "that counts one value per column only: a factored matrix keeps a row vector *and* a "
                         "column vector."),
             (no_vectors, "the vectors (every RMSNorm weight) are not factored but still keep a full fp32 second "
                          "moment: add 4 bytes per norm parameter."),
             (vectors_factored, "a vector cannot be factored: it keeps one fp32 value per element, not a row and a "
                                "column."),
             (want + 4 * n, "that includes a full fp32 first moment: transformers' Adafactor keeps none unless you "
                            "pass beta1 (the default is beta1=None).")]
    if d.tied:
        wrong.append((want + 4 * (d.vocab + d.hidden) + 4, "the embedding and the lm_head are one tied tensor here: "
                                                           "count its row and column vectors once."))
    else:
        wrong.append((want - 4 * (d.vocab + d.hidden) - 4, "the lm_head is its own (vocab x hidden) matrix here "
                                                           "(dims.tied is False): count its row and column too."))
    for other, hint in wrong:
        if near(other):  # near(want) was False, so a match is a wrong answer
            return False, f"you said {value:,.0f}: {hint}"
    for other, hint in ((4 * n, "that is one fp32 value per parameter. Adafactor *factors* its second moment, "
                                "keeping one value per row and one per column of each matrix (n + m instead of "
                                "n x m), and keeps no first moment unless you pass beta1 (the default is "
                                "beta1=None)."),
                        (8 * n, "that is AdamW's two fp32 moments: Adafactor keeps no first moment by default "
                                "(beta1=None) and factors the second."),
                        (8 * want, "that looks like bits; give bytes."),
                        (want / 2**20, "that looks like MiB; give bytes."),
                        (want / 1e6, "that looks like MB; give bytes.")):
        if close(value, other, 0.01):
            return False, f"you said {value:,.0f}: {hint}"
    if close(value, want, 0.01):
        return False, (f"you said {value:,.0f}: close ({100 * (value / want - 1):+.2f} %), but the state is a whole "
                       "number of bytes you can count exactly: count every matrix's row and column, every norm "
                       "vector (the final norm too), and the tied embedding once. Do not round.")
    return False, (f"you said {value:,.0f}. For each matrix of shape (rows, columns) count 4 x (rows + columns) "
                   "bytes; for each vector 4 bytes per element; trainable_tensor_shapes(dims, Recipe()) lists them.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: bytes per parameter of full fine-tuning, each optimizer
# ------------------------------------------------------------------------------------------------
def bytes_per_parameter(dims, optimizer: str) -> float:
    """Weights + gradients + optimizer state of fp32 full fine-tuning, per parameter (no activations)."""
    d = Dims.of(dims)
    n = trainable_params(d, Recipe())
    return 4 + 4 + optimizer_state_bytes(d, Recipe(optimizer=optimizer)) / n


_SPECIFIC = {  # (optimizer, what they said): why it is wrong
    ("sgd", 8.0): "SGD with momentum keeps one fp32 momentum buffer per parameter; 8 is plain SGD (what "
                  "Trainer's optim='sgd' builds unless optim_args sets a momentum).",
    ("sgd", 16.0): "SGD with momentum keeps one buffer, not AdamW's two.",
    ("adamw8bit", 16.0): "8-bit AdamW stores each of its two moments in one byte (plus a small scale per 256 values).",
    ("adamw8bit", 12.0): "8-bit AdamW stores each moment in one byte, not two.",
    ("adamw8bit", 10.0): "two one-byte moments are not all: each moment also keeps one fp32 scale per 256 values, "
                         "and tensors under 4,096 values keep fp32 moments.",
    ("paged_adamw8bit", 16.0): "paged 8-bit AdamW has the same state as AdamW8bit: paging moves it, does not grow it.",
    ("paged_adamw8bit", 10.0): "paged 8-bit AdamW has AdamW8bit's state, scales included (a little over 2 bytes, "
                               "not 2).",
    ("paged_adamw8bit", 8.0): "paging moves the state (to CPU RAM when the GPU is short), it does not remove it: "
                              "the bytes are AdamW8bit's.",
    ("adafactor", 8.0): "Adafactor's state is small but not zero: a row and a column per matrix and a full "
                        "second moment for each norm vector (exercise 1's bytes, divided by the parameter count).",
    ("adafactor", 12.0): "Adafactor factors its second moment: a row and a column per matrix, not one value per "
                         "parameter.",
    ("adafactor", 16.0): "Adafactor keeps no first moment by default and factors the second: its state is a tiny "
                         "fraction of a byte per parameter.",
}


def _per_optimizer(answer) -> dict:
    if not isinstance(answer, dict):
        raise AnswerError(f"give a dict such as {{'adamw': ..., 'sgd': ...}} with the five names {list(OPTIMIZERS)} "
                          f"(you gave a {'list' if isinstance(answer, list) else type(answer).__name__}).")
    named = {}
    for key, value in answer.items():
        name = _ALIASES.get(_key(key))
        if name is None:
            raise AnswerError(f"{key!r} is not one of the optimizers: use the keys {list(OPTIMIZERS)}.")
        if name in named:
            raise AnswerError(f"{key!r} names {name!r} a second time: give one number per optimizer.")
        named[name] = value
    missing = [k for k in OPTIMIZERS if k not in named]
    if missing:
        raise AnswerError(f"the dict has no entry for {missing}: give one number per optimizer, keys "
                          f"{list(OPTIMIZERS)}.")
    if any(named[k] is None for k in OPTIMIZERS):
        raise AnswerError("some values are still None: fill in every optimizer.")
    return {k: as_number(named[k], f"a number of bytes for {k}") for k in OPTIMIZERS}


@exercise("full_finetune_bytes_per_parameter", lesson=LESSON, context=_course_context, kind="predict",
          tolerance=PER_PARAMETER_TOLERANCE)
def full_finetune_bytes_per_parameter(answer, dims):
    """A dict {optimizer: bytes per parameter of weights + gradients + state} for fp32 full fine-tuning, each
    within ``PER_PARAMETER_TOLERANCE`` of the target (relative: two decimals)."""
    d = Dims.of(dims)
    got = _per_optimizer(answer)
    want = {k: bytes_per_parameter(d, k) for k in OPTIMIZERS}
    wrong = [k for k in OPTIMIZERS if not close(got[k], want[k], PER_PARAMETER_TOLERANCE)]
    if not wrong:
        table = ", ".join(f"{k} {want[k]:.3f}" for k in OPTIMIZERS)
        return True, (f"{table} bytes per parameter: 8 for the fp32 weight and its gradient, plus the state. "
                      f"Going from AdamW to Adafactor cuts the model's training footprint by half "
                      f"({want['adafactor'] / want['adamw']:.0%} of AdamW's), before activations.")
    k = wrong[0]
    value, target = got[k], want[k]
    state = target - 8
    specific = [(number, hint) for (name, number), hint in _SPECIFIC.items() if name == k]
    others = "" if len(wrong) == 1 else f" (also check {', '.join(wrong[1:])})"
    for other, hint in [*specific,
                        (state, "that is the optimizer state alone: add 4 bytes for the fp32 weight and 4 for its "
                                "gradient."),
                        (target - 4, "one of the two fp32 copies is missing: count the weight (4) and its gradient "
                                     "(4) as well as the state."),
                        (target + 4, "one 4-byte copy too many: weight (4) + gradient (4) + the state."),
                        (8 * target, "that looks like bits; give bytes.")]:
        if close(value, other, max(PER_PARAMETER_TOLERANCE, 0.01)):
            return False, f"{k}: you said {value:g}{others}. {hint[:1].upper()}{hint[1:]}"
    if abs(value - target) <= 0.01 * target:
        return False, (f"{k}: you said {value:g}{others}: close, but give at least two decimals ({target:.3f} to "
                       "three): the small terms are the point (8-bit AdamW's scales, Adafactor's factored state).")
    return False, (f"{k}: you said {value:g}{others}. Per parameter: 4 bytes of fp32 weight, 4 of gradient, and the "
                   "state (AdamW two fp32 moments, SGD one momentum buffer, 8-bit AdamW two one-byte moments plus "
                   "scales, Adafactor a factored second moment).")


# ------------------------------------------------------------------------------------------------
# Exercise 3: a step that does not fit; choose the optimizer (a diagnosis, decided beyond the noise)
# ------------------------------------------------------------------------------------------------
_WHY = {  # what a learner who picks this one has missed, when it fits but learns far less
    "sgd_plain": "optim='sgd' is plain SGD (no momentum, no state), and at Adam's learning rate its steps barely "
                 "move the weights: it saves memory by not learning.",
    "sgd": "SGD needs its own, far larger learning rate; at this one it learned less.",
}


def _table(values, what: str) -> dict:
    if not isinstance(values, dict) or not values:
        raise AnswerError(f"the lesson's measured {what} must be a dict {{optimizer: number}} (pass the table "
                          "column's .to_dict()): rerun the cells above.")
    return {str(k): as_number(v, f"a measured {what} value") for k, v in values.items()}


@exercise("optimizer_for_budget", lesson=LESSON, measured=("peaks", "perplexity", "budget", "noise"), kind="diagnose")
def optimizer_for_budget(answer, peaks, perplexity, budget, noise):
    """The name (a key of the measured ``peaks``) of an optimizer whose measured peak fits the ``budget`` and whose
    measured perplexity is the lowest of those that fit, where perplexities closer than the measured run-to-run
    ``noise`` (relative: two draws of the training batches) count as equal."""
    peaks, perplexity = _table(peaks, "peaks"), _table(perplexity, "perplexity")
    budget = as_number(budget, "the budget (a number)")
    noise = as_number(noise, "the measured run-to-run noise (a fraction)")
    if not 0 <= noise < 1:
        raise AnswerError("the measured noise must be a fraction between 0 and 1: rerun the cells above.")
    if not isinstance(answer, str):
        return False, f"give the optimizer's name as a string, one of {sorted(peaks)} (you gave {answer!r:.40})."
    names = {_key(k): k for k in peaks}
    name = names.get(_key(answer)) or names.get(_key(_ALIASES.get(_key(answer), "")))
    if name is None:
        return False, f"{answer!r} is not in the table: choose among {sorted(peaks)}."
    if name not in perplexity:
        return False, f"the measured perplexity has no {name!r}: rerun the cells above."
    fits = {k: perplexity[k] for k in peaks if peaks[k] <= budget and k in perplexity}
    if not fits:
        return False, "no optimizer fits this budget; rerun the cell that defines it."
    best = min(fits.values())
    if name not in fits:
        return False, (f"{name} peaks at {peaks[name]:,.0f} MiB, over the budget of {budget:,.0f}: it does not fix "
                       "the run. Look only at the optimizers whose measured peak is at most the budget.")
    worse = perplexity[name] / best - 1
    if worse > noise:
        times = f"{worse / noise:,.0f} times" if noise else "far more than"
        return False, (f"{name} fits ({peaks[name]:,.0f} of {budget:,.0f} MiB), but its held-out perplexity is "
                       f"{perplexity[name]:.2f} against {best:.2f} for another that fits: {worse:.1%} worse, {times} "
                       f"the run-to-run noise ({noise:.2%}). {_WHY.get(name, '')}".rstrip())
    return True, (f"{name}: peak {peaks[name]:,.0f} of {budget:,.0f} MiB, held-out perplexity {perplexity[name]:.2f}, "
                  f"the best of the {len(fits)} that fit (within the {noise:.2%} run-to-run noise). Memory rules out "
                  "options; measured quality chooses among the rest, when the difference is larger than the noise.")
