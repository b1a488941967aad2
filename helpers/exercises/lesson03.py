"""Lesson 03 — gradient checkpointing."""

from __future__ import annotations

import math

from ..checks import as_number, close, exercise, human_bytes, ratio_hint
from ..estimate import Dims, Recipe, block_activation_bytes, predict, weight_bytes

LESSON = "03_gradient_checkpointing"

_UNIT_HINTS = {2**-20: "that looks like MiB; the exercise asks for bytes.",
               2**-30: "that looks like GiB; the exercise asks for bytes.",
               1e-6: "that looks like MB; the exercise asks for bytes.",
               1e-9: "that looks like GB; the exercise asks for bytes."}


# ------------------------------------------------------------------------------------------------
# Exercise 1: the activations the decoder blocks keep, with and without checkpointing (predict)
# ------------------------------------------------------------------------------------------------
@exercise("block_activations", lesson=LESSON)
def block_activations(answer, dims=None, batch_size: int = 8, seq_len: int = 128):
    """(without, with) checkpointing: bytes all decoder blocks keep from forward to backward, fp32."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return False, "give two numbers, `(without_bytes, with_bytes)`, in bytes."
    without, with_ = as_number(answer[0], "bytes without checkpointing"), as_number(answer[1], "bytes with")
    tokens = batch_size * seq_len
    per_block = block_activation_bytes(d, tokens)
    want_without, want_with = d.layers * per_block, d.layers * tokens * d.hidden * 4
    if not close(without, want_without, 0.02):
        hint = ratio_hint(without, want_without, {
            1 / d.layers: "that is one block; every one of the blocks keeps its own.",
            0.25: "that counts elements; each fp32 element is 4 bytes.",
            0.5: f"that is half: 2 bytes per element, or batch {batch_size // 2} instead of {batch_size}.",
            1 / batch_size: "that is one sequence; multiply by the batch size.",
            **_UNIT_HINTS}, rel=0.03)
        return False, f"without checkpointing: you said {human_bytes(without)}. " + (
            hint or "use block_activation_bytes(dims, tokens) for one block, times the number of blocks.")
    if close(with_, want_with, 0.02):
        return True, (f"{human_bytes(without)} without, {human_bytes(with_)} with checkpointing: each block keeps "
                      f"only its input ({d.hidden} numbers per token instead of about "
                      f"{per_block / tokens / 4:,.0f}), {without / with_:.0f}x less.")
    hints = {1 / d.layers: "that is one block's input; every checkpointed block keeps its own.",
             0.25: "that counts elements; each fp32 element is 4 bytes.",
             1 / batch_size: "that is one sequence; multiply by the batch size.",
             want_without / want_with: "that is the figure without checkpointing again.",
             (want_with + per_block) / want_with: (
                 "that adds one block's recomputed activations: they exist only during that block's "
                 "backward, not between the forward pass and the backward pass."),
             **_UNIT_HINTS}
    hint = ratio_hint(with_, want_with, hints, rel=0.02)
    return False, f"with checkpointing: you said {human_bytes(with_)}. " + (
        hint or "a checkpointed block keeps only its input: tokens x hidden fp32 numbers.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: the checkpointed peak at batch 8 (predict before measuring)
# ------------------------------------------------------------------------------------------------
def _backward_start(d: Dims, recipe: Recipe) -> int:
    """Weights + optimizer state + what is alive when backward starts (no gradients yet)."""
    n = recipe.batch_size * recipe.seq_len
    saved = d.layers * n * d.hidden * 4 if recipe.gradient_checkpointing else d.layers * block_activation_bytes(d, n)
    full = predict(d, recipe)
    return weight_bytes(d, recipe) + full.optimizer + saved + 3 * n * d.hidden * 4 + 3 * n * d.vocab * 4


@exercise("checkpointed_peak", lesson=LESSON)
def checkpointed_peak(answer, dims=None, batch_size: int = 8, seq_len: int = 128):
    """Peak bytes of one steady-state fp32 AdamW step with checkpointing at ``batch_size`` x ``seq_len``."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    recipe = Recipe(batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True)
    want = predict(d, recipe)
    if close(value, want.peak, 0.02):
        return True, (f"{human_bytes(value)}: the same as at batch 1. With checkpointing the start of backward "
                      f"is smaller, so the end of backward (every gradient, plus the tied embedding's two "
                      f"gradients being summed) sets the peak: {want.result}.")
    plain = predict(d, recipe.but(gradient_checkpointing=False)).peak
    model_state = weight_bytes(d, recipe) + want.optimizer + d.params * 4
    start = _backward_start(d, recipe)
    for target, hint in ((plain, "that is the peak without checkpointing; checkpointing removes most of "
                                 "the blocks' saved activations."),
                         (start, "that is the start of backward with checkpointing; is another moment of the "
                                 "step larger? At the end of backward every gradient exists."),
                         (model_state, "that is weights + gradients + optimizer state alone; at the end of "
                                       "backward the tied embedding's two gradients are being summed, which "
                                       "adds two embedding-sized tensors. The peak at batch 1 shows it.")):
        if close(value, target, 0.01):
            return False, f"you said {human_bytes(value)}: {hint}"
    hint = ratio_hint(value, want.peak, _UNIT_HINTS)
    return False, f"you said {human_bytes(value)}. " + (
        hint or "compare two moments: the start of backward (saved activations, logits, no gradients) and "
                "the end of backward (all gradients). The peak is the larger one.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: checkpoint a toy stack so its activation peak falls under a target
# ------------------------------------------------------------------------------------------------
def toy_stack(n_blocks: int, width: int, seed: int = 0):
    """``n_blocks`` blocks of Linear(width, width) + Tanh, as in the lesson."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_blocks)])


def _run(stack, x, forward):
    """Forward (plain or the learner's), a scalar loss, backward: (output fingerprint, grads, activation peak)."""
    from ..memory import measure

    out = {}

    def step():
        y = stack(x) if forward is None else forward(stack, x)
        # Keep only a fingerprint of the output: holding the output itself through backward would add to the peak.
        out["shape"], out["sum"], out["rows"] = y.shape, float(y.detach().sum()), y.detach()[:2].clone()
        loss = y.pow(2).mean()
        del y  # as in the lesson: autograd alone decides how long the output lives
        loss.backward()

    report = measure(step, model=stack)
    grads = [None if p.grad is None else p.grad.clone() for p in stack.parameters()]
    stack.zero_grad(set_to_none=True)
    return out, grads, report.activations


@exercise("toy_under_target", lesson=LESSON)
def toy_under_target(answer, n_blocks: int = 16, width: int = 64, tokens: int = 512, fraction: float = 0.47):
    """A function ``forward(stack, x)`` whose activation peak is below ``fraction`` of the plain forward's."""
    import torch

    if not callable(answer):
        return False, ("give a function `forward(stack, x)` that returns the output "
                       f"(you gave a {type(answer).__name__}).")
    stack = toy_stack(n_blocks, width)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(1))
    y0, g0, plain = _run(stack, x, None)
    try:
        y, g, acts = _run(stack, x, answer)
    except RuntimeError as err:
        if "does not require grad" in str(err):
            return False, ("the output has no gradient: with use_reentrant=True and an input that does not "
                           "require grad, checkpoint cuts the graph. Pass use_reentrant=False.")
        raise
    if y["shape"] != y0["shape"] or not torch.allclose(y["rows"], y0["rows"], atol=1e-5) or not close(
            y["sum"], y0["sum"], 1e-4):
        return False, "your function must return the stack's output: run every block, in order, on `x`."
    missing = sum(gi is None for gi in g)
    if missing:
        return False, (f"{missing} of {len(g)} parameters got no gradient: with use_reentrant=True and an input "
                       "that does not require grad, checkpointed blocks get none. Pass use_reentrant=False.")
    if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g, g0, strict=True)):
        return False, "the gradients differ from the plain forward's: run every block exactly once, in order."
    share = acts / plain
    if share <= fraction:
        return True, (f"activation peak {human_bytes(acts)}, {share:.0%} of the plain {human_bytes(plain)} "
                      f"(target {fraction:.0%}); the best segment length is about sqrt({n_blocks}) = "
                      f"{math.sqrt(n_blocks):.0f}.")
    if share > 0.95:
        return False, (f"your peak is {share:.0%} of the plain one: no saving. Checkpointing every block on its "
                       "own keeps each block's input, which is all a Linear + Tanh block keeps anyway; checkpoint "
                       "segments of several blocks (about sqrt(n) each).")
    return False, (f"your peak is {share:.0%} of the plain one, above the {fraction:.0%} target. Segments of "
                   f"about sqrt({n_blocks}) = {math.sqrt(n_blocks):.0f} blocks balance the kept inputs against "
                   "the one segment recomputed at a time.")


# ------------------------------------------------------------------------------------------------
# Exercise 4: why checkpointing costs time (multiple choice)
# ------------------------------------------------------------------------------------------------
TIME_COST_OPTIONS = {
    "a": "The optimizer step runs a second time for the recomputed blocks.",
    "b": "In backward, each checkpointed block runs its forward again: about one extra forward pass of the blocks.",
    "c": "The saved activations are compressed in the forward pass and decompressed in the backward pass.",
    "d": "Backward runs twice: once for the activations, once for the gradients.",
}
_TIME_COST_HINTS = {
    "a": "the optimizer runs once per step, after backward, with or without checkpointing: its time is unchanged.",
    "c": "nothing is compressed: checkpointing throws the block's intermediate tensors away and rebuilds them.",
    "d": "backward runs once; what repeats is something else. Look at how often block 0 ran, counted above.",
}


@exercise("time_cost", lesson=LESSON)
def time_cost(answer):
    """Which option explains the time checkpointing costs: 'a', 'b', 'c' or 'd'."""
    if not isinstance(answer, str):
        return False, f"answer with one letter as a string, such as 'a' (you gave a {type(answer).__name__})."
    letter = answer.strip().strip("().:'\" ").lower()
    if letter not in TIME_COST_OPTIONS:
        return False, "answer with one of the letters 'a', 'b', 'c' or 'd'."
    if letter == "b":
        return True, ("one extra forward per checkpointed block. A backward costs about twice a forward, so the "
                      "blocks' compute grows from 3 to 4 forward-equivalents (+33 %) at most; the logits, the loss "
                      "and the optimizer step are not repeated, so the whole step grows less.")
    return False, f"({letter}) {_TIME_COST_HINTS[letter]}"
