"""Lesson 08 — Optimizers that cost less."""

from __future__ import annotations

from ..checks import as_number, close, exercise, human_bytes
from ..estimate import Dims, Recipe, optimizer_state_bytes, trainable_params, trainable_tensor_shapes

LESSON = "08_optimizers"
OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "paged_adamw8bit", "adafactor")  # the estimator's names


# ------------------------------------------------------------------------------------------------
# Exercise 1: Adafactor's factored state for full fine-tuning
# ------------------------------------------------------------------------------------------------
@exercise("adafactor_state_bytes", lesson=LESSON)
def adafactor_state_bytes(answer, dims=None):
    """Bytes of transformers' ``Adafactor`` state (beta1=None) for full fine-tuning of a model of ``dims``
    (the per-tensor fp32 RMS scalars may be left out: allow 0.5 %)."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    want = optimizer_state_bytes(d, Recipe(optimizer="adafactor"))
    shapes = trainable_tensor_shapes(d, Recipe())
    n = trainable_params(d, Recipe())
    matrices = [s for s in shapes if len(s) == 2]
    vectors = sum(s[0] for s in shapes if len(s) == 1)
    scalars = 4 * len(shapes)  # one fp32 RMS per tensor: allowed either way
    if close(value, want, 5e-3) or close(value, want - scalars, 5e-3):
        return True, (f"{want:,} bytes ({human_bytes(want)}) for {n:,} parameters, {want / n:.4f} bytes each: one "
                      f"fp32 value per row and per column of each of the {len(matrices)} matrices, a full fp32 "
                      f"second moment for the {len(shapes) - len(matrices)} vectors (the norms), and no first "
                      "moment. AdamW would keep 8 bytes a parameter.")
    rows_only = 4 * (sum(o for o, _ in matrices) + vectors)
    cols_only = 4 * (sum(i for _, i in matrices) + vectors)
    no_vectors = 4 * sum(o + i for o, i in matrices)
    vectors_factored = no_vectors + 4 * 2 * vectors  # as if a vector had a "row" and a "column" of its own
    wrong = [(4 * n, "that is one fp32 value per parameter. Adafactor *factors* its second moment, keeping one "
                     "value per row and one per column of each matrix (n + m instead of n x m), and keeps no first "
                     "moment unless you pass beta1 (the default is beta1=None)."),
             (8 * n, "that is AdamW's two fp32 moments: Adafactor keeps no first moment by default (beta1=None) "
                     "and factors the second."),
             (8 * n + 4 * len(shapes), "that is torch.optim.AdamW's state: Adafactor keeps no first moment by "
                                       "default (beta1=None) and factors the second."),
             (want + 4 * n, "that includes a full fp32 first moment: transformers' Adafactor keeps none unless you "
                            "pass beta1 (the default is beta1=None)."),
             (rows_only, "that counts one value per row only: a factored matrix keeps a row vector *and* a column "
                         "vector."),
             (cols_only, "that counts one value per column only: a factored matrix keeps a row vector *and* a "
                         "column vector."),
             (no_vectors, "the vectors (every RMSNorm weight) are not factored but still keep a full fp32 second "
                          "moment: add 4 bytes per norm parameter."),
             (vectors_factored, "a vector cannot be factored: it keeps one fp32 value per element, not a row and a "
                                "column.")]
    if d.tied:
        wrong.append((want + 4 * (d.vocab + d.hidden), "the embedding and the lm_head are one tied tensor here: "
                                                        "count its row and column vectors once."))
    for other, hint in wrong:
        if not close(other, want, 5e-3) and close(value, other, 5e-3):
            return False, f"you said {value:,.0f}: {hint}"
    if close(value, 8 * want, 5e-3):
        return False, f"you said {value:,.0f}: that looks like bits; give bytes."
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
    ("paged_adamw8bit", 16.0): "paged 8-bit AdamW has the same state as AdamW8bit: paging moves it, does not grow it.",
    ("paged_adamw8bit", 8.0): "paging moves the state (to CPU RAM when the GPU is short), it does not remove it: "
                              "the bytes are AdamW8bit's.",
    ("adafactor", 12.0): "Adafactor factors its second moment: a row and a column per matrix, not one value per "
                         "parameter.",
    ("adafactor", 16.0): "Adafactor keeps no first moment by default and factors the second: its state is a tiny "
                         "fraction of a byte per parameter.",
}


@exercise("full_finetune_bytes_per_parameter", lesson=LESSON)
def full_finetune_bytes_per_parameter(answer, dims=None):
    """A dict {optimizer: bytes per parameter of weights + gradients + state} for fp32 full fine-tuning."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    if not isinstance(answer, dict):
        return False, (f"give a dict such as {{'adamw': ..., 'sgd': ...}} with the five names {list(OPTIMIZERS)} "
                       f"(you gave a {type(answer).__name__}).")
    missing = [k for k in OPTIMIZERS if k not in answer]
    if missing:
        return False, f"the dict has no entry for {missing}: give one number per optimizer, keys {list(OPTIMIZERS)}."
    if any(answer[k] is None or answer[k] is Ellipsis for k in OPTIMIZERS):
        return False, "some values are still None: fill in every optimizer."
    want = {k: bytes_per_parameter(d, k) for k in OPTIMIZERS}
    got = {k: as_number(answer[k], f"a number of bytes for {k}") for k in OPTIMIZERS}
    wrong = [k for k in OPTIMIZERS if not close(got[k], want[k], 0.01)]
    if not wrong:
        table = ", ".join(f"{k} {want[k]:.2f}" for k in OPTIMIZERS)
        return True, (f"{table} bytes per parameter: 8 for the fp32 weight and its gradient, plus the state. "
                      f"Going from AdamW to Adafactor cuts the model's training footprint by half "
                      f"({want['adafactor'] / want['adamw']:.0%} of AdamW's), before activations.")
    k = wrong[0]
    value, target = got[k], want[k]
    state = target - 8
    specific = [(number, hint) for (name, number), hint in _SPECIFIC.items() if name == k]
    for other, hint in [*specific,
                        (state, "that is the optimizer state alone: add 4 bytes for the fp32 weight and 4 for its "
                                "gradient."),
                        (target - 4, "one of the two fp32 copies is missing: count the weight (4) and its gradient "
                                     "(4) as well as the state."),
                        (target + 4, "one 4-byte copy too many: weight (4) + gradient (4) + the state."),
                        (8 * target, "that looks like bits; give bytes.")]:
        if close(value, other, 0.01):
            return False, f"{k}: you said {value:g}. {hint[:1].upper()}{hint[1:]}"
    others = "" if len(wrong) == 1 else f" (also check {', '.join(wrong[1:])})"
    return False, (f"{k}: you said {value:g}{others}. Per parameter: 4 bytes of fp32 weight, 4 of gradient, and the "
                   "state (AdamW two fp32 moments, SGD one momentum buffer, 8-bit AdamW two one-byte moments plus "
                   "scales, Adafactor a factored second moment); optimizer_state_bytes(dims, Recipe(optimizer=...)) "
                   "divided by the parameter count gives the state.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: the optimizer that fits a memory budget with the best measured perplexity
# ------------------------------------------------------------------------------------------------
@exercise("optimizer_for_budget", lesson=LESSON)
def optimizer_for_budget(answer, peaks=None, perplexity=None, budget=None, tie: float = 0.01):
    """The name (a key of ``peaks``) of an optimizer whose measured peak fits ``budget`` with the lowest measured
    perplexity among those that fit (within ``tie``, relative: closer than that is noise)."""
    if peaks is None or perplexity is None or budget is None:
        return False, "run the cells above first: the check needs peaks=, perplexity= and budget=."
    if not isinstance(answer, str):
        return False, f"give the optimizer's name as a string, one of {sorted(peaks)} (you gave {answer!r:.40})."
    if answer not in peaks:
        return False, f"{answer!r} is not in the table: choose among {sorted(peaks)}."
    fits = {k: perplexity[k] for k in peaks if peaks[k] <= budget}
    if not fits:
        return False, "no optimizer fits this budget; rerun the cell that defines it."
    best = min(fits.values())
    if answer not in fits:
        return False, (f"{answer} peaks at {peaks[answer]:,.0f}, over the budget of {budget:,.0f}: look only at the "
                       "optimizers whose measured peak is at most the budget.")
    if perplexity[answer] > best * (1 + tie):
        return False, (f"{answer} fits ({peaks[answer]:,.0f} of {budget:,.0f}), but another optimizer that fits "
                       f"reaches a lower held-out perplexity ({best:.2f} against {perplexity[answer]:.2f}): among "
                       "those under the budget, take the lowest perplexity.")
    return True, (f"{answer}: peak {peaks[answer]:,.0f} of {budget:,.0f}, held-out perplexity "
                  f"{perplexity[answer]:.2f}, the best of the {len(fits)} that fit. Memory rules out options; "
                  "measured quality chooses among the rest.")
