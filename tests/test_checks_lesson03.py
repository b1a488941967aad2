"""Lesson 03's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones, and
gives no points to plausible slips or to cheats (red team)."""

import inspect
import math
import sys

import nbformat
import pytest
import torch
from casebook import COURSE, assert_grades, fails, grade, registered
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers.checks import EXERCISES, FAIL, PASS, SKIP, run_check
from helpers.constants import ROOT
from helpers.estimate import Dims, Recipe, block_activation_bytes, predict
from helpers.exercises import lesson03
from helpers.exercises.lesson03 import checkpoint_flops, toy_stack
from helpers.models import reference_config

ACT_TOKENS = lesson03.ACT_BATCH * lesson03.ACT_SEQ
PEAK_BATCH = lesson03.PEAK_BATCH

pytestmark = pytest.mark.usefixtures("lenient_checks", "one_thread")


def segments(k, reentrant=False):
    """forward(stack, x) checkpointing segments of k blocks."""
    def forward(stack, x):
        blocks = list(stack)
        for start in range(0, len(blocks), k):
            x = checkpoint(nn.Sequential(*blocks[start:start + k]), x, use_reentrant=reentrant)
        return x
    return forward


def skip_last_block(stack, x):
    return nn.Sequential(*list(stack)[:-1])(x)


def flops_ratio(dims):
    plain, checkpointed = checkpoint_flops(dims, 1)
    return checkpointed / plain


def cases(dims):
    tokens = ACT_TOKENS
    without = dims.layers * block_activation_bytes(dims, tokens)
    with_ = dims.layers * tokens * dims.hidden * 4
    peak = predict(dims, Recipe(batch_size=PEAK_BATCH, seq_len=128, gradient_checkpointing=True)).peak
    plain_peak = predict(dims, Recipe(batch_size=PEAK_BATCH, seq_len=128)).peak
    ratio = flops_ratio(dims)
    whole_block = 1 + 2 * dims.layers * dims.block_linear_params / (
        6 * (dims.layers * dims.block_linear_params + dims.vocab * dims.hidden))
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "block_activations": ((without, with_), {"dims": dims},
                              [((without / dims.layers, with_), "one block"),
                               ((without / 4, with_), "elements"),
                               ((without, with_ / 4), "elements"),
                               ((without, without), "without checkpointing again"),
                               ((without, with_ + without / dims.layers), "recomputed"),
                               ((without, with_ / dims.layers), "one block's input"),
                               ((without / 2**20, with_ / 2**20), "MiB"),
                               (without, "two numbers")]),
        "checkpointed_peak": (peak, {"dims": dims},
                              [(plain_peak, "without checkpointing"), (peak / 2**20, "MiB"),
                               ("a lot", "number")]),
        "toy_under_target": (segments(round(math.sqrt(lesson03.TOY_BLOCKS))), None,
                             [(segments(1), "no saving"), (segments(lesson03.TOY_BLOCKS // 2), "above the"),
                              (segments(2), "above the"),
                              (segments(4, reentrant=True), "use_reentrant=False"),
                              (skip_last_block, "every block"), ("checkpoint", "function")]),
        "time_cost": ({"choice": "b", "flops_ratio": ratio}, {"dims": dims},
                      [({"choice": "a", "flops_ratio": ratio}, "backward runs once"),
                       ({"choice": "c", "flops_ratio": ratio}, "the peak does not"),
                       ({"choice": "d", "flops_ratio": ratio}, "nothing is copied"),
                       ({"choice": "b", "flops_ratio": 4 / 3}, "lm_head"),
                       ({"choice": "b", "flops_ratio": whole_block}, "down_proj"),
                       ({"choice": "b", "flops_ratio": 1.5}, "twice"),
                       ({"choice": "b", "flops_ratio": ratio - 1}, "extra compute alone"),
                       ({"choice": "e", "flops_ratio": ratio}, "one of the letters"),
                       ("b", "dict"), (2, "dict")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("03")


@pytest.mark.parametrize("name", ["block_activations", "checkpointed_peak", "time_cost"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, context)


def test_toy_check():
    """As assert_grades, with the blanks a code answer can have (a string is an answer of the wrong kind)."""
    right, context, wrong = cases(COURSE)["toy_under_target"]
    assert grade("toy_under_target", right).status == PASS
    for blank in (None, ...):
        assert grade("toy_under_target", blank).status == SKIP
    for answer, word in wrong:
        result = grade("toy_under_target", answer)
        assert result.status == FAIL and result.points == 0, answer
        assert word.lower() in result.message.lower(), (answer, result.message)


# ------------------------------------------------------------------------------------------------
# Exercises 1 and 2: predictions (red team: slips just outside the lesson's point)
# ------------------------------------------------------------------------------------------------
def test_block_activations_red_team(dims):
    tokens = ACT_TOKENS
    per_block = block_activation_bytes(dims, tokens)
    without, with_ = dims.layers * per_block, dims.layers * tokens * dims.hidden * 4
    context = {"dims": dims}
    lse = dims.layers * 4 * dims.heads * tokens
    wrong = [
        (without - lse, with_),                                     # forgot the attention's log-sum-exp
        (dims.layers * tokens * 19 * dims.hidden * 4, with_),       # the rounded "19 x hidden" of the table
        (without * 1e6 / 2**20, with_),                             # MB / MiB mixed up
        (without, with_ * 2**20 / 1e6),
        (without, with_ + per_block),                               # one block recomputed, counted as kept
        (without, 2 * with_),                                       # 8 bytes a number
        (without * 127 / 128, with_),                               # one position short
        (without, with_ * 127 / 128),
        ((without, with_), None),                                   # nested
        ("1.37 GB", "70 MB"),                                       # strings
        {"without": without},                                       # half a dict
    ]
    for answer in wrong:
        fails("block_activations", answer, context)
    assert run_check("block_activations", (1e9, None)).status == SKIP
    assert grade("block_activations", {"without": without, "with": with_}, context).status == PASS
    assert grade("block_activations", [int(without), float(with_)], context).status == PASS


def test_block_activations_hint_at_the_log_sum_exp():
    tokens = ACT_TOKENS
    without = COURSE.layers * block_activation_bytes(COURSE, tokens)
    lse = COURSE.layers * 4 * COURSE.heads * tokens
    message = fails("block_activations", (without - lse, COURSE.layers * tokens * COURSE.hidden * 4),
                    {"dims": COURSE}).message
    assert "log-sum-exp" in message


def test_checkpointed_peak_red_team(dims):
    recipe = Recipe(batch_size=PEAK_BATCH, seq_len=128, gradient_checkpointing=True)
    peak = predict(dims, recipe)
    context = {"dims": dims}
    for answer in (peak.peak * 1e6 / 2**20, peak.peak * 2**20 / 1e6, peak.peak / 1e9, peak.peak * 1.01,
                   peak.peak * 0.99, peak.weights + peak.optimizer + 4 * dims.params, [peak.peak], str(peak.peak),
                   True, float("nan")):
        fails("checkpointed_peak", answer, context)


def test_checkpointed_peak_hints_at_the_moments(dims):
    """The end-of-backward floor, the model state alone, and the start of backward with a part left out are the
    plausible partial answers; each gets its own hint."""
    from helpers.exercises.lesson03 import _backward_start

    recipe = Recipe(batch_size=PEAK_BATCH, seq_len=128, gradient_checkpointing=True)
    start = _backward_start(dims, recipe)
    peak = predict(dims, recipe)
    n = PEAK_BATCH * 128
    floor = predict(dims, Recipe(batch_size=1, seq_len=128)).peak
    context = {"dims": dims}
    if not math.isclose(floor, peak.peak, rel_tol=0.02):  # on the course shapes the two moments differ
        assert "end-of-backward floor" in fails("checkpointed_peak", floor, context).message
        assert "kept inputs" in fails("checkpointed_peak", start - dims.layers * n * dims.hidden * 4,
                                      context).message
        assert "not two" in fails("checkpointed_peak", start - n * dims.vocab * 4, context).message
    state = peak.weights + peak.optimizer + 4 * dims.params
    assert "gradients do not exist yet" in fails("checkpointed_peak", state, context).message


def test_checkpointed_peak_at_the_course_batch_is_the_start_of_backward():
    """At the exercise's batch the start of backward sets the checkpointed peak, clearly above the batch-1 floor
    (the answer is not the floor printed above the exercise), and the simple count of the solution is within the
    tolerance while the batch-4 peak printed above it is not."""
    recipe = Recipe(batch_size=PEAK_BATCH, seq_len=128, gradient_checkpointing=True)
    peak = predict(COURSE, recipe)
    assert peak.moment == "backward start"
    b1 = predict(COURSE, Recipe(batch_size=1, seq_len=128))
    assert peak.peak > 1.05 * b1.peak
    n = PEAK_BATCH * 128
    simple = b1.weights + b1.optimizer + COURSE.layers * n * COURSE.hidden * 4 + 3 * n * COURSE.vocab * 4
    assert run_check("checkpointed_peak", simple).passed
    assert run_check("checkpointed_peak", predict(COURSE, Recipe(batch_size=4, seq_len=128)).peak).status == FAIL
    for off in (1 - 1.5 * lesson03.PEAK_TOLERANCE, 1 + 1.5 * lesson03.PEAK_TOLERANCE):
        assert run_check("checkpointed_peak", peak.peak * off).status == FAIL


def test_the_solutions_answers_pass():
    """The notebook's solution expressions, with the lesson's measurements stood in for by the prediction
    (the lesson measures within 0.02 % of it), pass against the trusted context (the course model's config)."""
    dims = COURSE
    big = Dims.of(reference_config("smollm2-1.7b"))
    tokens = 4 * 512
    assert run_check("block_activations", (big.layers * block_activation_bytes(big, tokens),
                                           big.layers * tokens * big.hidden * 4)).passed
    measured_b1 = predict(dims, Recipe(batch_size=1, seq_len=128))
    tokens = 12 * 128
    start = (measured_b1.weights + measured_b1.optimizer + dims.layers * tokens * dims.hidden * 4
             + 3 * tokens * dims.vocab * 4)
    assert run_check("checkpointed_peak", max(start, measured_b1.peak)).passed
    weights = dims.layers * dims.block_linear_params + dims.vocab * dims.hidden
    recomputed = 2 * dims.layers * (dims.block_linear_params - dims.hidden * dims.intermediate)
    assert run_check("time_cost", {"choice": "b", "flops_ratio": (6 * weights + recomputed) / (6 * weights)}).passed


def test_the_context_is_the_course_model_and_the_lessons_constants():
    from helpers.checks import EXERCISES

    context = EXERCISES["block_activations"].trusted_context()
    assert context == {"dims": Dims.of(reference_config("smollm2-1.7b")), "batch_size": 4, "seq_len": 512}
    assert EXERCISES["checkpointed_peak"].trusted_context() == {"dims": COURSE, "batch_size": 12, "seq_len": 128}
    assert EXERCISES["time_cost"].trusted_context() == {"dims": COURSE}


def test_checks_take_no_context_from_the_caller():
    message = run_check("block_activations", (1, 2), dims=COURSE).message
    assert "takes no dims" in message
    assert run_check("toy_under_target", segments(4), fraction=0.99).status == FAIL


def test_the_notebook_agrees_with_the_lessons_constants():
    nb = nbformat.read(lesson03_solution(), as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert (f"N_BLOCKS, WIDTH, TOKENS = {lesson03.TOY_BLOCKS}, {lesson03.TOY_WIDTH}, {lesson03.TOY_TOKENS}"
            in code)
    assert f"**{round(100 * lesson03.TOY_FRACTION)} %**" in text
    assert f"SEQ = {lesson03.SEQ}" in code
    assert f'reference_config("{lesson03.ACT_MODEL}")' in code
    assert f"tokens = {lesson03.ACT_BATCH} * {lesson03.ACT_SEQ}" in code
    assert f"**{lesson03.ACT_BATCH} × {lesson03.ACT_SEQ} tokens**" in text
    assert f"batch {lesson03.PEAK_BATCH} × {lesson03.SEQ} tokens" in text
    assert f"tokens = {lesson03.PEAK_BATCH} * SEQ" in code
    calls = [c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("check(")]
    assert calls and all("=" not in call for call in calls)  # no context keywords: the checks compute their own


def lesson03_solution():

    return ROOT / "solutions" / "03_gradient_checkpointing.ipynb"


# ------------------------------------------------------------------------------------------------
# Exercise 3: the toy stack (red team: plausible mistakes and cheats)
# ------------------------------------------------------------------------------------------------
def backward_itself_detached(stack, x):
    """The known cheat: run backward here, return a detached leaf (the check's backward then costs nothing)."""
    y = stack(x)
    y.pow(2).mean().backward()
    return y.detach().requires_grad_()


def backward_itself_no_grads_left(stack, x):
    y = stack(x)
    y.pow(2).mean().backward()
    stack.zero_grad(set_to_none=True)
    return y.detach().requires_grad_()


def grads_injected_by_a_hook(stack, x):
    """Computes the plain gradients itself, then returns a leaf whose hook makes autograd accumulate them."""
    params = list(stack.parameters())
    y = stack(x)
    grads = torch.autograd.grad(y.pow(2).mean(), params)
    z = y.detach().requires_grad_()
    z.register_hook(lambda g: torch.autograd.backward(params, grads) or g)
    return z * 1


def hidden_from_the_meter(stack, x):
    """The plain forward with the memory meter switched off, padded with visible allocations."""
    from helpers.memory import unmetered

    with unmetered():
        y = stack(x)
    return y * 1


def forward_in_another_thread(stack, x):
    """The plain forward in a worker thread, where the meter (a per-thread dispatch mode) does not look."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(stack, x).result()


def raises_system_exit(stack, x):
    raise SystemExit(0)


class LyingTensor(torch.Tensor):
    pass


def returns_a_lying_tensor(stack, x):
    return segments(4)(stack, x).as_subclass(LyingTensor)


class Fake:
    shape = (512, 64)

    def pow(self, _):
        return self

    def mean(self):
        return torch.zeros((), requires_grad=True)


def returns_a_lying_object(stack, x):
    return Fake()


def only_sixteen_blocks(stack, x):
    for start in range(0, 16, 4):
        x = checkpoint(nn.Sequential(*(stack[i] for i in range(start, start + 4))), x, use_reentrant=False)
    return x


def deletes_blocks(stack, x):
    del stack[len(stack) // 2:]
    return segments(4)(stack, x)


def replaces_a_module(stack, x):
    stack[0] = nn.Identity()
    return segments(4)(stack, x)


def runs_a_copy(stack, x):
    import copy

    return segments(4)(copy.deepcopy(stack), x)


def detaches_midway(stack, x):
    blocks = list(stack)
    x = nn.Sequential(*blocks[:8])(x).detach()
    return segments(4)(nn.Sequential(*blocks[8:]), x)


def in_bf16(stack, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return segments(4)(stack, x).float()


def reads_the_frames(stack, x):
    """Looks through the callers' frames for a reference (a plain output, gradients, a peak) to return."""
    for frame in inspect.stack():
        for value in frame.frame.f_locals.values():
            if isinstance(value, torch.Tensor) and value.shape == (x.shape[0], x.shape[1]) and value is not x:
                return value
    frame = sys._getframe(1)
    while frame is not None:
        frame = frame.f_back
    return stack(x)


def scales_its_gradients(stack, x):
    y = segments(4)(stack, x)
    y.register_hook(lambda g: 2 * g)
    return y


def rescales_its_output(stack, x):
    return segments(4)(stack, x) * 1.0001


def sets_grad_mode_off(stack, x):
    torch.set_grad_enabled(False)
    return stack(x)


RED_TEAM = {
    "backward itself, detached leaf": (backward_itself_detached, "already had a gradient"),
    "backward itself, gradients cleared": (backward_itself_no_grads_left, "leaf"),
    "gradients injected by a hook": (grads_injected_by_a_hook, "no saving"),
    "hidden from the meter": (hidden_from_the_meter, "meter"),
    "another thread": (forward_in_another_thread, "meter"),
    "SystemExit": (raises_system_exit, "SystemExit"),
    "tensor subclass": (returns_a_lying_tensor, "LyingTensor"),
    "lying object": (returns_a_lying_object, "not a tensor"),
    "one size only": (only_sixteen_blocks, "any stack"),
    "deletes blocks": (deletes_blocks, "stack's output"),
    "replaces a module": (replaces_a_module, "stack's output"),
    "runs a copy": (runs_a_copy, "not copies"),
    "detaches midway": (detaches_midway, "no gradient"),
    "bf16": (in_bf16, "stack's output"),
    "reads the frames": (reads_the_frames, "no saving"),
    "scales its gradients": (scales_its_gradients, "gradients differ"),
    "rescales its output": (rescales_its_output, "stack's output"),
    "grad mode off": (sets_grad_mode_off, "no gradient"),
    "plain": (lambda stack, x: stack(x), "no saving"),
}


@pytest.mark.parametrize("case", list(RED_TEAM))
def test_toy_red_team(case):
    fn, word = RED_TEAM[case]
    try:
        result = fails("toy_under_target", fn)
    finally:
        torch.set_grad_enabled(True)
    assert word.lower() in result.message.lower(), result.message


def test_toy_passes_on_fresh_stacks_every_time():
    """The probe draws new seeds each time; the judge rebuilds the same stacks and compares."""
    for _ in range(2):
        assert run_check("toy_under_target", segments(4)).passed
    assert run_check("toy_under_target", segments(5)).passed  # 4, 4, 4, 4 or 5, 5, 5, 1: both 9 units


def test_toy_check_follows_the_fraction():
    strict = {"n_blocks": lesson03.TOY_BLOCKS, "width": lesson03.TOY_WIDTH, "tokens": lesson03.TOY_TOKENS,
              "fraction": 0.2}
    result = grade("toy_under_target", segments(4), strict)
    assert result.status == FAIL and "above the 20% target" in result.message


def test_toy_judge_refuses_data_from_another_stack():
    from helpers.checks import answer_data, verdict

    data = answer_data("toy_under_target", segments(4))
    data["lesson"]["n_blocks"] = 4
    assert verdict("toy_under_target", data).status == FAIL
    forged = answer_data("toy_under_target", segments(4))
    forged["lesson"]["grads"][0]["norm"] *= 1.001  # a gradient that is not the plain forward's
    assert verdict("toy_under_target", forged).status == FAIL
    assert verdict("toy_under_target", {"lesson": "x", "other": None}).status == FAIL


def test_answers_in_other_forms(dims):
    ratio = flops_ratio(COURSE)
    assert run_check("time_cost", {"Choice": " (B) ", "flops_ratio": ratio}).status == PASS
    assert run_check("time_cost", (lesson03.TIME_COST_OPTIONS["b"], ratio)).status == PASS
    assert run_check("time_cost", ["b", ratio]).status == PASS
    for wrong in ("ab", "b c", "B or D"):
        assert run_check("time_cost", {"choice": wrong, "flops_ratio": ratio}).status == FAIL
    for wrong in (["b"], {"answer": "b"}, {"choice": "b"}, ("b", str(ratio)), ("b", ratio, 1), {"choice": "b",
                  "flops_ratio": None}, (ratio, "b")):
        assert run_check("time_cost", wrong).status != PASS


def test_time_cost_number_is_the_counted_flop_ratio():
    """The course model's ratio is what FlopCounterMode counts (lesson 03 measures 1.1974); the judge's tolerance
    passes counting the attention scores too and fails every plausible other count."""
    ratio = flops_ratio(COURSE)
    assert abs(ratio - 1.1974) < 1e-4
    tol = lesson03.RATIO_TOLERANCE
    assert EXERCISES["time_cost"].tolerance == tol and EXERCISES["time_cost"].kind == "explain"
    for near in (ratio * (1 - 0.9 * tol), ratio * (1 + 0.9 * tol)):
        assert run_check("time_cost", {"choice": "b", "flops_ratio": near}).passed
    for far in (ratio * (1 - 1.2 * tol), ratio * (1 + 1.2 * tol), 4 / 3, 1.2632, 1.25, 1.0):
        assert run_check("time_cost", {"choice": "b", "flops_ratio": far}).status == FAIL, far
    # the attention scores (4 x sequence x q_dim FLOPs per token and block forward, at 128 tokens), counted too
    d, s = COURSE, 128
    att = 4 * s * d.q_dim // 2  # per token, in weight-equivalents (2 FLOPs each)
    plain = 6 * (d.layers * (d.block_linear_params + att) + d.vocab * d.hidden)
    extra = 2 * d.layers * (d.block_linear_params - d.hidden * d.intermediate + att)
    assert run_check("time_cost", {"choice": "b", "flops_ratio": (plain + extra) / plain}).passed


def test_every_exercise_states_its_kind_and_tolerance():
    kinds = {name: (EXERCISES[name].kind, EXERCISES[name].tolerance) for name in registered("03")}
    assert kinds == {"block_activations": ("calculate", lesson03.EXACT),
                     "checkpointed_peak": ("predict", lesson03.PEAK_TOLERANCE),
                     "time_cost": ("explain", lesson03.RATIO_TOLERANCE),
                     "toy_under_target": ("code", 0.0)}


def test_block_activations_is_another_model_than_the_course_one():
    """The exercise's model is not the lesson's: the course model's numbers (printed per token above the exercise,
    times the tokens) fail with a hint."""
    tokens = ACT_TOKENS
    course = (COURSE.layers * block_activation_bytes(COURSE, tokens), COURSE.layers * tokens * COURSE.hidden * 4)
    message = fails("block_activations", course).message
    assert "course model" in message


def test_toy_stack_shape():
    stack = toy_stack(3, 8)
    assert len(stack) == 3 and stack[0][0].in_features == 8
    assert torch.equal(toy_stack(3, 8)[0][0].weight, stack[0][0].weight)  # seeded
