"""Lesson 03 — gradient checkpointing.

Every target is computed here from the lesson's fixed inputs: a model config (the course model's,
``course_dims``, or one shipped in ``helpers/model_configs``), the lesson's constants below and
``helpers.estimate``; never from the learner's variables. The toy exercise's function is run by a probe on
stacks and inputs the probe builds itself (fresh random seeds), measured there, and judged against a plain
forward the judge runs itself.
"""

from __future__ import annotations

import math

from ..checks import (
    AnswerError,
    as_number,
    as_pair,
    close,
    exercise,
    human_bytes,
    learner_call,
    ratio_hint,
    trusted_dims,
    two_values,
)

LESSON = "03_gradient_checkpointing"

SEQ = 128  # the lesson's sequence length (its SEQ; a test checks the notebook agrees)
# Exercise 1: a model and a batch the lesson does not run (no printed number answers it).
ACT_MODEL, ACT_BATCH, ACT_SEQ = "smollm2-1.7b", 4, 512
# Exercise 2: the checkpointed peak at a batch where the start of backward sets it (measured after the exercise).
PEAK_BATCH = 12
# Exercise 4: the toy stack of the lesson (its N_BLOCKS, WIDTH, TOKENS; a test checks the notebook agrees) and
# the target share of the plain stack's activation peak. Segments of sqrt(16) = 4 blocks (or 5) measure 9 units
# of the plain 20 (45 %); 2, 3 or 8 blocks per segment measure 10 to 12 units (50 % or more).
TOY_BLOCKS, TOY_WIDTH, TOY_TOKENS, TOY_FRACTION = 16, 64, 512, 0.47
TOY_OTHER = (9, 24, 96)  # a second stack (blocks, width, tokens): the function must work for any stack

# Exercise 1's answers are products of integers: 1e-4 leaves room for float arithmetic and nothing else
# (leaving out the attention's log-sum-exp is 2e-4 off on SmolLM2-1.7B at 512 tokens, MB for MiB 4.9 %).
EXACT = 1e-4
# Exercise 2: the start of backward counted as weights + optimizer state + the kept block inputs + three
# logits-sized tensors is 0.40 % under the estimator's (which adds three hidden-sized tensors); the next
# plausible answers are further: the un-checkpointed batch-4 peak printed above 1.2 %, forgetting the kept inputs
# 4 %, MB for MiB 4.9 %, the end-of-backward floor 9.8 %.
PEAK_TOLERANCE = 0.007
# Exercise 3: the FLOP ratio is a ratio of integers; counting the attention scores too moves it 0.4 %,
# recomputing down_proj as well 5.5 %, the textbook "+33 %" 11 %.
RATIO_TOLERANCE = 0.01

_UNIT_HINTS = {2**-20: "that looks like MiB; the exercise asks for bytes.",
               2**-30: "that looks like GiB; the exercise asks for bytes.",
               1e-6: "that looks like MB; the exercise asks for bytes.",
               1e-9: "that looks like GB; the exercise asks for bytes.",
               2**20 / 1e6: "that mixes MB and MiB: give the number of bytes itself.",
               1e6 / 2**20: "that mixes MB and MiB: give the number of bytes itself."}


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims(), "batch_size": PEAK_BATCH, "seq_len": SEQ}


def _activations_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(ACT_MODEL)), "batch_size": ACT_BATCH, "seq_len": ACT_SEQ}


def _quarter(batch_size: int) -> str:
    if batch_size == 4:  # a quarter is either mistake
        return ("that is a quarter: it counts elements (each fp32 element is 4 bytes), or one sequence instead of "
                "the batch of 4.")
    return "that counts elements; each fp32 element is 4 bytes."


# ------------------------------------------------------------------------------------------------
# Exercise 1: the activations the decoder blocks keep, with and without checkpointing, for another model
# ------------------------------------------------------------------------------------------------
@exercise("block_activations", lesson=LESSON, context=_activations_context, kind="calculate", tolerance=EXACT)
def block_activations(data, dims, batch_size: int = ACT_BATCH, seq_len: int = ACT_SEQ):
    """(without, with) checkpointing: bytes all decoder blocks keep from forward to backward, fp32."""
    from ..capstone import course_dims
    from ..estimate import block_activation_bytes

    d = trusted_dims(dims)
    without, with_ = as_pair(data, ("without", "with"), "give two numbers, `(without_bytes, with_bytes)`, in bytes.",
                             ("bytes without checkpointing", "bytes with"))
    tokens = batch_size * seq_len
    per_block = block_activation_bytes(d, tokens)
    want_without, want_with = d.layers * per_block, d.layers * tokens * d.hidden * 4
    course = course_dims()
    other_model = course != d
    if not close(without, want_without, EXACT):
        hint = ratio_hint(without, want_without, {
            1 / d.layers: "that is one block; every one of the blocks keeps its own.",
            1 / batch_size: "that is one sequence; multiply by the batch size.",
            0.25: _quarter(batch_size),
            0.5: f"that is half: 2 bytes per element, or batch {batch_size // 2} instead of {batch_size}.",
            **_UNIT_HINTS}, rel=0.005)
        if hint is None and other_model and close(without, course.layers * block_activation_bytes(course, tokens),
                                                  0.01):
            hint = ("that is the course model's shape: use the dims of the exercise's model "
                    "(`Dims.of(reference_config(...))`).")
        if hint is None and close(without, d.layers * (per_block - 4 * d.heads * tokens), EXACT):
            hint = ("close: the attention also keeps one log-sum-exp per head and token (4 x heads bytes); "
                    "block_activation_bytes counts it.")
        if hint is None and close(without, want_without, 0.03):
            hint = "close, but not exact: use block_activation_bytes(dims, tokens), not a rounded per-token figure."
        return False, f"without checkpointing: you said {human_bytes(without)}. " + (
            hint or "use block_activation_bytes(dims, tokens) for one block, times the number of blocks.")
    if close(with_, want_with, EXACT):
        return True, (f"{human_bytes(without)} without, {human_bytes(with_)} with checkpointing: each block keeps "
                      f"only its input ({d.hidden:,} numbers per token instead of about "
                      f"{per_block / tokens / 4:,.0f}), {without / with_:.0f}x less.")
    hints = {1 / d.layers: "that is one block's input; every checkpointed block keeps its own.",
             1 / batch_size: "that is one sequence; multiply by the batch size.",
             0.25: _quarter(batch_size),
             0.5: "that is 2 bytes per element; the activations are fp32 (4 bytes).",
             want_without / want_with: "that is the figure without checkpointing again.",
             (want_with + per_block) / want_with: (
                 "that adds one block's recomputed activations: they exist only during that block's "
                 "backward, not between the forward pass and the backward pass."),
             **_UNIT_HINTS}
    if other_model:
        hints.setdefault(course.layers * course.hidden / (d.layers * d.hidden),
                         "that is the course model's shape: use the dims of the exercise's model.")
    hint = ratio_hint(with_, want_with, hints, rel=0.005)
    return False, f"with checkpointing: you said {human_bytes(with_)}. " + (
        hint or "a checkpointed block keeps only its input: tokens x hidden fp32 numbers.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: the checkpointed peak at batch 12 (predict before measuring)
# ------------------------------------------------------------------------------------------------
def _backward_start(d, recipe) -> int:
    """Weights + optimizer state + what is alive when backward starts (no gradients yet)."""
    from ..estimate import block_activation_bytes, loss_bytes, predict, weight_bytes

    n = recipe.micro_batch_size * recipe.seq_len
    saved = d.layers * n * d.hidden * 4 if recipe.gradient_checkpointing else d.layers * block_activation_bytes(d, n)
    full = predict(d, recipe)
    loss = loss_bytes(d, recipe.micro_batch_size, recipe.seq_len)
    return weight_bytes(d, recipe) + full.optimizer + saved + 3 * n * d.hidden * 4 + loss


@exercise("checkpointed_peak", lesson=LESSON, context=_course_context, kind="predict", tolerance=PEAK_TOLERANCE)
def checkpointed_peak(data, dims, batch_size: int = PEAK_BATCH, seq_len: int = SEQ):
    """Peak bytes of one steady-state fp32 AdamW step with checkpointing at ``batch_size`` x ``seq_len``."""
    from ..estimate import Recipe, predict, weight_bytes

    d = trusted_dims(dims)
    value = as_number(data, "a number of bytes")
    recipe = Recipe(batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True)
    want = predict(d, recipe)
    n = batch_size * seq_len
    if close(value, want.peak, PEAK_TOLERANCE):
        if want.moment == "backward start":
            why = ("the start of backward sets it: weights, optimizer state, the blocks' kept inputs and the "
                   "logits-sized tensors of the loss, before any gradient exists")
        else:
            why = ("the end of backward sets it (every gradient, plus the tied embedding's two gradients being "
                   "summed), as at batch 1")
        return True, f"{human_bytes(value)}: {why}; the estimator says {human_bytes(want.peak)}."
    floor = predict(d, Recipe(batch_size=1, seq_len=seq_len)).peak
    plain = predict(d, recipe.but(gradient_checkpointing=False)).peak
    model_state = weight_bytes(d, recipe) + want.optimizer + d.params * 4
    start = _backward_start(d, recipe)
    kept, logits = d.layers * n * d.hidden * 4, n * d.vocab * 4
    candidates = (
        (plain, "that is the peak without checkpointing; checkpointing removes most of the blocks' saved "
                "activations."),
        (floor, "that is the end-of-backward floor of batch 1 to 3. At this batch, with checkpointing, is the "
                "start of backward larger? Count what is alive then."),
        (model_state, "that is weights + gradients + optimizer state alone; gradients do not exist yet when the "
                      "peak is the start of backward."),
        (start - kept, "you left out the blocks' kept inputs: a checkpointed block still keeps its input "
                       "(tokens x hidden fp32 numbers)."),
        (start - logits, "the loss keeps three logits-sized tensors at the start of backward (batch x sequence x "
                         "vocabulary fp32 numbers each), not two."),
        (start - 3 * logits, "you left out the logits-sized tensors of the loss: checkpointing does not touch "
                             "them, and at this batch they are the largest activations."),
    )
    for target, hint in candidates:
        if close(value, target, PEAK_TOLERANCE):
            return False, f"you said {human_bytes(value)}: {hint}"
    hint = ratio_hint(value, want.peak, _UNIT_HINTS, rel=0.005)
    return False, f"you said {human_bytes(value)}. " + (
        hint or "compare two moments: the start of backward (kept inputs, logits, no gradients) and the end of "
                "backward (all gradients). The peak is the larger one.")


# ------------------------------------------------------------------------------------------------
# Exercise 4: checkpoint a toy stack so its activation peak falls under a target
# ------------------------------------------------------------------------------------------------
def toy_stack(n_blocks: int, width: int, seed: int = 0):
    """``n_blocks`` blocks of Linear(width, width) + Tanh, as in the lesson."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_blocks)])


def toy_input(tokens: int, width: int, seed: int):
    import torch

    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


def _summary(t) -> dict:
    """A fingerprint of a tensor: forging it needs the tensor."""
    flat = t.detach().reshape(-1).double()
    return {"shape": list(t.shape), "numel": t.numel(), "sum": flat.sum().item(), "norm": flat.norm().item(),
            "sample": [v.item() for v in flat[:6]] + [v.item() for v in flat[-6:]]}


def toy_effects(n_blocks: int, width: int, tokens: int, seed: int, forward=None) -> dict:
    """Build a toy stack and input from ``seed``; run ``forward(stack, x)`` (the plain stack when None; a
    learner's function is called through ``learner_call``), then the caller's own loss and backward, all
    measured. Returns what happened, as plain data: the output's and every parameter's gradient fingerprint,
    how many gradients existed before the caller's backward and how many autograd accumulated in it, the
    activation peak, and the bytes the meter saw created during the forward."""
    import torch

    from ..memory import Meter

    stack = toy_stack(n_blocks, width, seed)
    x = toy_input(tokens, width, seed + 1)
    params = list(stack.parameters())  # the stack's own parameters, whatever the function does to the stack
    found = {}  # filled only after the function has returned (nothing in it for the function to change)
    depth = torch._C._len_torch_dispatch_stack()
    with Meter(model=stack) as meter:
        seen = sum(r[0] for r in meter.tracker.records)
        if forward is None:
            ok, y = True, stack(x)
        else:
            ok, y = learner_call(forward, stack, x)
        found["meter_intact"] = torch._C._len_torch_dispatch_stack() == depth + 1
        found["forward_bytes"] = sum(r[0] for r in meter.tracker.records) - seen
        accumulated = [0] * len(params)
        if not ok:
            found["error"] = y
        elif type(y) is not torch.Tensor:
            found["error"] = f"returned a {type(y).__name__}, not a tensor"
        else:
            found["grads_before"] = sum(p.grad is not None for p in params)
            found["leaf"] = y.grad_fn is None
            found["requires_grad"] = y.requires_grad
            found["output"] = _summary(y)
            loss = y.pow(2).mean()
            del y  # as in the lesson: autograd alone decides how long the output lives
            handles = [p.register_post_accumulate_grad_hook(
                lambda _p, i=i: accumulated.__setitem__(i, accumulated[i] + 1)) for i, p in enumerate(params)]
            ok, err = learner_call(loss.backward)  # the backward may run the function's code (recomputation)
            for h in handles:
                h.remove()
            del loss
            if not ok:
                found["backward_error"] = err
    y = None
    return {"n_blocks": n_blocks, "width": width, "tokens": tokens, "seed": seed, **found,
            "peak": meter.report.activations, "accumulated": list(accumulated),
            "grads": [None if p.grad is None else _summary(p.grad) for p in params]}


def _toy_probe(fn) -> dict:
    """Run the learner's ``forward`` on the lesson's stack (measured) and on a second one, each built from a
    fresh random seed here: nothing the function could have prepared for."""
    import secrets

    return {"lesson": toy_effects(TOY_BLOCKS, TOY_WIDTH, TOY_TOKENS, secrets.randbelow(2**30), fn),
            "other": toy_effects(*TOY_OTHER, secrets.randbelow(2**30), fn)}


_PLAIN_PEAKS: dict = {}


def _plain_peak(n_blocks: int, width: int, tokens: int) -> int:
    """The plain stack's activation peak (the same for every seed), measured here, by trusted code."""
    key = (n_blocks, width, tokens)
    if key not in _PLAIN_PEAKS:
        _PLAIN_PEAKS[key] = toy_effects(n_blocks, width, tokens, 0)["peak"]
    return _PLAIN_PEAKS[key]


def _fingerprints_match(got, want, rel: float) -> bool:
    """``got`` is ``want``'s fingerprint to ``rel`` of the tensor's size: its norm to ``rel``, each sampled value
    to ``rel`` of the root mean square value, the sum to what that much per value can add up to."""
    if not isinstance(got, dict) or got.get("shape") != want["shape"]:
        return False
    norm = want["norm"]
    rms = norm / math.sqrt(max(want["numel"], 1))
    sample = got.get("sample")
    if not isinstance(sample, list) or len(sample) != len(want["sample"]):
        return False
    tiny = 1e-30
    return (abs(as_number(got.get("norm")) - norm) <= rel * norm + tiny
            and abs(as_number(got.get("sum")) - want["sum"]) <= rel * norm * math.sqrt(want["numel"]) + tiny
            and all(abs(as_number(a) - b) <= rel * rms + tiny for a, b in zip(sample, want["sample"], strict=True)))


_REENTRANT = ("with use_reentrant=True and an input that does not require grad, checkpoint cuts the graph "
              "(the checkpointed blocks' parameters get no gradient). Pass use_reentrant=False.")
GRAD_REL = 1e-5  # relative to each gradient's norm: float rounding of the same arithmetic, nothing more


def _toy_case_problem(case, where: str) -> str | None:
    """What is wrong with one probed run (None if its output and gradients are the plain stack's)."""
    if not isinstance(case, dict):
        raise AnswerError("the check's probe did not return its data; run the check again.")
    if "error" in case:
        return f"{where}your function {case['error'] if 'returned' in case['error'] else 'raised ' + case['error']}."
    want = toy_effects(case["n_blocks"], case["width"], case["tokens"], case["seed"])
    if case.get("grads_before"):
        return (f"{where}{case['grads_before']} parameters already had a gradient when your function returned: "
                "it must only run the forward pass; the check runs the backward itself (and measures it).")
    if not _fingerprints_match(case.get("output"), want["output"], 1e-5):
        return (f"{where}your function must return the stack's output: run every block, in order, on `x` "
                "(the same arithmetic: no other dtype, no copy of the stack).")
    backward_error = case.get("backward_error", "")
    if "does not require grad" in backward_error or not case.get("requires_grad"):
        return f"{where}the output has no gradient: {_REENTRANT}"
    if backward_error:
        return f"{where}the check's backward through your output failed: {backward_error}."
    if case.get("leaf"):
        return (f"{where}your output is a leaf tensor, not connected to the stack's parameters: return the "
                "result of the blocks, not a detached copy.")
    accumulated, grads = case.get("accumulated") or [], case.get("grads") or []
    if len(grads) != len(want["grads"]) or len(accumulated) != len(grads):
        raise AnswerError("the check's probe returned malformed data; run the check again.")
    missing = sum(not n or g is None for n, g in zip(accumulated, grads, strict=True))
    if missing:
        return (f"{where}{missing} of {len(grads)} parameters got no gradient from the check's backward. Run the "
                "blocks of the stack you are given (not copies, nothing detached); and " + _REENTRANT)
    if not all(_fingerprints_match(g, w, GRAD_REL) for g, w in zip(grads, want["grads"], strict=True)):
        return (f"{where}the gradients differ from the plain forward's: run every block exactly once per forward, "
                "in order, and let the check's backward compute them.")
    unit = case["tokens"] * case["width"] * 4
    if not case.get("meter_intact") or as_number(case.get("forward_bytes")) < case["n_blocks"] * unit:
        return (f"{where}the memory meter did not see your forward pass (every block creates its output): "
                "run it with ordinary PyTorch operations, inside the measured call.")
    return None


@exercise("toy_under_target", lesson=LESSON, probe=_toy_probe, kind="code",
          context=lambda: {"n_blocks": TOY_BLOCKS, "width": TOY_WIDTH, "tokens": TOY_TOKENS,
                           "fraction": TOY_FRACTION})
def toy_under_target(data, n_blocks: int, width: int, tokens: int, fraction: float):
    """A function ``forward(stack, x)`` whose activation peak is at most ``fraction`` of the plain forward's, with
    the plain forward's output and gradients, on the lesson's stack and on another one."""
    if not isinstance(data, dict) or not {"lesson", "other"} <= set(data):
        raise AnswerError("give a function `forward(stack, x)` that returns the output.")
    lesson = data["lesson"]
    if not isinstance(lesson, dict) or [lesson.get(k) for k in ("n_blocks", "width", "tokens")] != [
            n_blocks, width, tokens]:
        raise AnswerError("the check's probe ran on another stack than the lesson's; run the check again.")
    problem = _toy_case_problem(lesson, "")
    if problem:
        return False, problem
    other = data["other"]
    problem = _toy_case_problem(other, f"on another stack ({other.get('n_blocks')} blocks of width "
                                       f"{other.get('width')}, {other.get('tokens')} rows): "
                                if isinstance(other, dict) else "")
    if problem:
        return False, problem + " Your function must work for any stack of blocks, not only the lesson's."
    plain = _plain_peak(n_blocks, width, tokens)
    acts = as_number(lesson.get("peak"), "the measured peak")
    share = acts / plain
    if share <= fraction:
        return True, (f"activation peak {human_bytes(acts)}, {share:.0%} of the plain {human_bytes(plain)} "
                      f"(target {fraction:.0%}), with the plain forward's output and gradients; the best segment "
                      f"length is about sqrt({n_blocks}) = {math.sqrt(n_blocks):.0f}.")
    if share > 0.95:
        return False, (f"your peak is {share:.0%} of the plain one: no saving. Checkpointing every block on its "
                       "own keeps each block's input, which is all a Linear + Tanh block keeps anyway; checkpoint "
                       "segments of several blocks (about sqrt(n) each).")
    return False, (f"your peak is {share:.0%} of the plain one, above the {fraction:.0%} target. Segments of "
                   f"about sqrt({n_blocks}) = {math.sqrt(n_blocks):.0f} blocks balance the kept inputs against "
                   "the one segment recomputed at a time.")



# ------------------------------------------------------------------------------------------------
# Exercise 3: what checkpointing costs (explain: the trade-off the numbers support, and the number)
# ------------------------------------------------------------------------------------------------
TIME_COST_OPTIONS = {
    "a": "It repeats the forward and the backward of every block; it is worth it at every batch, because it "
         "always lowers the saved activations.",
    "b": "It repeats (most of) the forward of the blocks only, not the lm_head, the loss or the optimizer step; it "
         "is worth it where saved activations set the peak, and a pure cost where the end of backward sets it.",
    "c": "It repeats (most of) the forward of the blocks only; it is worth it at every batch, because the blocks' "
         "saved activations always fall about 19x.",
    "d": "It costs no compute: the dropped activations are copied to CPU memory and read back in the backward pass.",
}
_TIME_COST_HINTS = {
    "a": "backward runs once per step, with or without checkpointing; what repeats is part of the forward.",
    "c": ("the saved activations do fall at every batch, but the peak does not: look at the peaks measured at "
          "batch 1 to 3. Memory saved away from the peak buys nothing, and the recomputation still costs."),
    "d": ("nothing is copied anywhere: checkpointing throws a block's intermediate tensors away and rebuilds "
          "them by running the block again (that is `offload`, another technique)."),
}


def checkpoint_flops(d, tokens: int) -> tuple[int, int]:
    """(plain, checkpointed) weight-matmul FLOPs of one full fine-tuning step: 2 per weight per token forward
    (every block's linear layers and the lm_head; an embedding lookup is no matmul), twice that backward (the
    input's gradient and the weight's), and, with checkpointing, the blocks' forward again without ``down_proj``,
    whose output no backward needs (PyTorch stops recomputing a block once it has rebuilt every tensor its
    backward saved). The attention scores are left out, as ``FlopCounterMode`` leaves out CPU attention."""
    linear = d.layers * d.block_linear_params + d.vocab * d.hidden
    plain = 6 * tokens * linear
    recomputed = 2 * tokens * d.layers * (d.block_linear_params - d.hidden * d.intermediate)
    return plain, plain + recomputed


def _time_cost_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


def _choice_and_ratio(data) -> tuple[str, float]:
    expected = ('give a dict, `{"choice": "b", "flops_ratio": 1.5}` (your letter and your number), or the pair '
                '`("b", 1.5)`.')
    choice, ratio = two_values(data, ("choice", "flops_ratio"), expected)
    if not isinstance(choice, str):
        raise AnswerError("the choice is one letter as a string, such as 'a'; " + expected)
    letter = choice.strip().strip("().:'\" ").lower()
    if letter not in TIME_COST_OPTIONS:
        full = {" ".join(text.lower().split()): key for key, text in TIME_COST_OPTIONS.items()}
        letter = full.get(" ".join(choice.strip().lower().split()), letter)
    if letter not in TIME_COST_OPTIONS:
        raise AnswerError("the choice is one of the letters 'a', 'b', 'c' or 'd'.")
    return letter, as_number(ratio, "a ratio (the checkpointed step's FLOPs / the plain step's)")


@exercise("time_cost", lesson=LESSON, context=_time_cost_context, kind="explain", tolerance=RATIO_TOLERANCE)
def time_cost(data, dims):
    """The trade-off checkpointing makes ('a' to 'd') and the checkpointed step's weight-matmul FLOPs as a
    multiple of the plain step's, for the course model in full fine-tuning."""
    d = trusted_dims(dims)
    letter, ratio = _choice_and_ratio(data)
    plain, checkpointed = checkpoint_flops(d, 1)
    want = checkpointed / plain
    if letter != "b":
        return False, f"({letter}) {_TIME_COST_HINTS[letter]}"
    if close(ratio, want, RATIO_TOLERANCE):
        blocks = d.layers * d.block_linear_params
        return True, (f"({letter}) and {ratio:.3f}x: the step costs 6 FLOPs per weight per token "
                      f"({blocks + d.vocab * d.hidden:,} weights in matmuls), and checkpointing adds 2 per weight of "
                      f"the blocks except down_proj ({blocks - d.layers * d.hidden * d.intermediate:,}): "
                      f"+{want - 1:.1%}. The lm_head ({d.vocab * d.hidden:,} weights) is not recomputed; that is why "
                      "it stays under the +33 % of 'one more forward of everything'.")
    whole_block = 1 + 2 * d.layers * d.block_linear_params / (6 * (d.layers * d.block_linear_params
                                                                  + d.vocab * d.hidden))
    hints = (
        (whole_block, "you recomputed every matmul of each block; PyTorch stops recomputing a block once every "
                      "tensor its backward needs exists again, so down_proj (whose output only feeds the residual "
                      "sum) does not run twice."),
        (4 / 3, "that is one more forward of the whole model (+33 %); the lm_head runs after the last block and "
                "is not recomputed, and each block's down_proj is not either."),
        (3 / 2, "that assumes backward costs the same as forward; a weight matmul's backward computes two products "
                "(the input's gradient and the weight's), twice the forward's one."),
        (2.0, "that repeats the whole step; only part of the blocks' forward runs again."),
        (want - 1, "that is the extra compute alone; give the ratio, checkpointed / plain (1 + the extra)."),
    )
    for target, hint in hints:
        if close(ratio, target, RATIO_TOLERANCE):
            return False, f"({letter}) is the trade-off; {ratio:g}x is not the FLOP ratio: {hint}"
    return False, (f"({letter}) is the trade-off; {ratio:g}x is not the FLOP ratio. Count 2 FLOPs per weight per "
                   "token forward and 4 backward for every weight matmul (blocks and lm_head), then add what runs "
                   "again in the backward pass.")
