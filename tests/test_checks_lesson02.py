"""Lesson 02's exercise checks: the right answer passes, blanks are "not attempted", wrong ones get hints, and
wrong or cheating answers (functions that tamper, lie, crash or only work for one size) never get points."""

import re
import sys

import nbformat
import pytest
import torch
from casebook import COURSE, grade, liar, registered

from helpers.checks import EXERCISES, FAIL, PASS, SKIP, run_check
from helpers.constants import ROOT
from helpers.estimate import Dims, Recipe, trainable_tensors
from helpers.exercises import lesson02
from helpers.models import reference_config, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("lenient_checks")
SOLUTION = ROOT / "solutions" / "02_freezing_parameters.ipynb"


def test_every_registered_exercise_has_a_test():
    assert registered("02") == {"freeze_all_but_last", "optimizer_state_bytes_k", "count_trainable"}


LLAMA7B = Dims.of(reference_config("llama-7b"))
CTX = {"dims": LLAMA7B, "k": 4}
COURSE_CTX = {"dims": COURSE, "k": 6}  # freeze_all_but_last's context: the course model


@pytest.mark.parametrize("name", ["freeze_all_but_last", "optimizer_state_bytes_k", "count_trainable"])
def test_blanks_are_not_attempted(name):
    code = EXERCISES[name].probe is not None  # for a function, only the stub's None is blank
    for blank in (None, ...) if code else (None, ..., "", (None, None)):
        assert grade(name, blank, CTX if EXERCISES[name].context else None).status == SKIP


def assert_fails(name, answer, word=None, context=CTX):
    result = grade(name, answer, context if EXERCISES[name].context else None)
    label = getattr(answer, "__name__", answer)
    assert result.status == FAIL and result.points == 0, (label, result.message)
    if word:
        assert word.lower() in result.message.lower(), (label, result.message)
    return result


# ------------------------------------------------------------------------------------------------
# freeze_all_but_last: right and wrong functions, each wrong one with the word its hint must contain
# ------------------------------------------------------------------------------------------------
def right_freeze(model, k):
    model.requires_grad_(False)
    layers = model.model.layers
    for block in layers[len(layers) - k:]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)


def freeze_by_names(model, k):  # another honest way: by parameter names
    n = model.config.num_hidden_layers
    for name, p in model.named_parameters():
        parts = name.split(".")
        in_last = "layers" in parts and int(parts[parts.index("layers") + 1]) >= n - k
        p.requires_grad = in_last or name.startswith("model.norm.")


def freezes_nothing(model, k):
    for block in model.model.layers[-k:]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)


def freezes_everything(model, k):
    model.requires_grad_(False)


def leaves_embedding(model, k):
    right_freeze(model, k)
    model.lm_head.requires_grad_(True)


def forgets_norm(model, k):
    right_freeze(model, k)
    model.model.norm.requires_grad_(False)


def off_by_one(model, k):
    right_freeze(model, k)
    layers = model.model.layers
    for block in layers[max(0, len(layers) - k - 1):]:
        block.requires_grad_(True)


def first_blocks(model, k):
    model.requires_grad_(False)
    for block in model.model.layers[:k]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)


def minus_zero(model, k):  # the classic: layers[-0:] is every layer
    model.requires_grad_(False)
    for block in model.model.layers[-k:]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)


def only_mlp(model, k):
    right_freeze(model, k)
    for block in model.model.layers:
        block.self_attn.requires_grad_(False)


def crashes(model, k):
    raise KeyError("layers")


def does_not_reset(model, k):  # freezes only the first time it is called on a model
    if not getattr(model, "_seen", False):
        model.requires_grad_(False)
        model._seen = True
    for block in model.model.layers[len(model.model.layers) - k:]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)


FREEZE_WRONG = [(freezes_nothing, "nothing is frozen"), (freezes_everything, "nothing trains"),
                (leaves_embedding, "tied"), (forgets_norm, "final norm"), (off_by_one, "off by one"),
                (first_blocks, "first"), (minus_zero, "layers[-0:]"), (only_mlp, "whole blocks"),
                (crashes, "keyerror"), (does_not_reset, "twice"), (3, "function itself")]


# Cheats and functions that only look right
def deletes_blocks(model, k):  # the lower blocks are gone instead of frozen: what trains "looks" right
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(layers)[len(layers) - k:])
    model.requires_grad_(False)
    for block in model.model.layers:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)


def replaces_frozen_blocks(model, k):  # frozen blocks swapped for fresh (re-initialised) ones of the same shape
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    right_freeze(model, k)
    layers = model.model.layers
    for i in range(len(layers) - k):
        layers[i] = LlamaDecoderLayer(model.config, i).requires_grad_(False)


def zeroes_frozen_weights(model, k):
    right_freeze(model, k)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.zero_()


def unties_embedding(model, k):  # a frozen copy of the embedding: lm_head no longer shares it
    right_freeze(model, k)
    model.model.embed_tokens.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)


def only_five_blocks(model, k):  # hard-coded for the 5-block test model
    model.requires_grad_(False)
    for i in range(5 - k, 5):
        model.model.layers[i].requires_grad_(True)
    model.model.norm.requires_grad_(True)


def only_small_k(model, k):  # right for k < 3 only
    right_freeze(model, min(k, 2))


def system_exit(model, k):
    raise SystemExit(0)


def keyboard_interrupt(model, k):
    raise KeyboardInterrupt


def returns_a_liar(model, k):  # does nothing, returns an object that claims to be anything
    class Liar:
        def __eq__(self, other):
            return True

        def __bool__(self):
            return True
    return Liar()


def reads_frames(model, k):  # hunts the caller's frames for a reference set and applies it
    frame = sys._getframe(1)
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, set) and value and all(isinstance(v, str) for v in value):
                for name, p in model.named_parameters():
                    p.requires_grad = name in value
                return
        frame = frame.f_back
    freezes_nothing(model, k)


def patches_requires_grad_reporting(model, k):  # makes every tensor report requires_grad as the check wants
    model.requires_grad_(True)
    original = torch.nn.Module.named_parameters

    def lying(self, *args, **kwargs):
        for name, p in original(self, *args, **kwargs):
            yield name, p.detach().requires_grad_(_wanted(name, len(model.model.layers), k))
    torch.nn.Module.named_parameters = lying
    _PATCHED.append(original)


def _wanted(name, n, k):
    parts = name.split(".")
    return ("layers" in parts and int(parts[parts.index("layers") + 1]) >= n - k) or name.startswith("model.norm.")


_PATCHED = []


def replaces_norm(model, k):  # a new final norm (fresh weights of ones) instead of unfreezing the real one
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    right_freeze(model, k)
    model.model.norm = LlamaRMSNorm(model.config.hidden_size)


FREEZE_CHEATS = [(deletes_blocks, "delete"), (replaces_frozen_blocks, None), (zeroes_frozen_weights, "values"),
                 (unties_embedding, None), (only_five_blocks, "3-block"), (only_small_k, None),
                 (system_exit, "SystemExit"), (keyboard_interrupt, "KeyboardInterrupt"), (returns_a_liar, None),
                 (reads_frames, None), (replaces_norm, None)]


def test_freeze_all_but_last():
    result = grade("freeze_all_but_last", right_freeze, COURSE_CTX)
    assert result.status == PASS, result.message
    assert "k=6 trains 21,241,152" in result.message  # what it does on the course model
    assert grade("freeze_all_but_last", freeze_by_names, COURSE_CTX).status == PASS
    for answer, word in FREEZE_WRONG:
        assert_fails("freeze_all_but_last", answer, word)


@pytest.mark.parametrize("cheat,word", FREEZE_CHEATS, ids=lambda f: getattr(f, "__name__", str(f)))
def test_freeze_all_but_last_red_team(cheat, word):
    assert_fails("freeze_all_but_last", cheat, word)


def test_freeze_reads_parameters_past_a_patched_named_parameters():
    try:
        assert_fails("freeze_all_but_last", patches_requires_grad_reporting)
    finally:
        while _PATCHED:
            torch.nn.Module.named_parameters = _PATCHED.pop()


def test_freeze_check_runs_only_on_its_own_models():
    """run_check takes no model from the notebook, and the probe builds a fresh model for every trial."""
    lesson_model = tiny_model()
    result = run_check("freeze_all_but_last", freezes_everything, model=lesson_model, k=1)
    assert result.status == FAIL and "takes no" in result.message
    assert all(p.requires_grad for p in lesson_model.parameters())
    seen = []
    lesson02.probe_freeze(lambda model, k: seen.append(id(model)))
    assert len(seen) == sum(len(ks) for _, ks in lesson02.FREEZE_TRIALS)
    assert {lay for lay, _ in lesson02.FREEZE_TRIALS} == {3, 5}


def test_freeze_probe_data_is_small_and_plain():
    import json

    data = lesson02.probe_freeze(right_freeze)
    assert len(json.dumps(data)) < 1_000_000
    assert [t["error"] for t in data] == [None] * len(lesson02.FREEZE_TRIALS)


# ------------------------------------------------------------------------------------------------
# optimizer_state_bytes_k
# ------------------------------------------------------------------------------------------------
def optimizer_cases(d: Dims, k: int):
    head = d.vocab * d.hidden
    trainable = k * d.block_params + d.hidden + head
    target = 8 * trainable
    wrong = [(4 * trainable, "one fp32 moment"), (12 * trainable, "gradients"), (trainable, "number of trainable"),
             (8 * (trainable + d.block_params), f"{k + 1} blocks"),
             (8 * (trainable - d.block_params), f"{k - 1} blocks"),
             (8 * d.params, "every parameter"), (target / 2**20, "MiB"), ("lots", "number"),
             (8 * (trainable - head), "lm_head"), (8 * (trainable - d.hidden), "final norm")]
    if not d.tied:  # an untied lm_head: counting the embedding too is the mistake
        wrong.append((8 * (trainable + head), "not tied"))
    return target, {"dims": d, "k": k}, wrong


SHAPES = [(LLAMA7B, 4), (COURSE, 6), (COURSE, 8), (Dims.of(tiny_config(num_hidden_layers=6)), 3),
          (Dims.of(reference_config("qwen2.5-7b")), 2)]


@pytest.mark.parametrize("d,k", SHAPES)
def test_optimizer_state_bytes_k(d, k):
    target, context, wrong = optimizer_cases(d, k)
    assert grade("optimizer_state_bytes_k", target, context).status == PASS
    tensors = trainable_tensors(d, Recipe(trainable_blocks=k)) + 1  # + the lm_head
    assert tensors == 9 * k + 2
    assert grade("optimizer_state_bytes_k", target + 4 * tensors, context).status == PASS  # Adam's step counters
    for answer, word in wrong:
        assert_fails("optimizer_state_bytes_k", answer, word, context)


@pytest.mark.parametrize("d,k", SHAPES)
def test_optimizer_state_bytes_k_red_team(d, k):
    target, context, _ = optimizer_cases(d, k)
    head = d.vocab * d.hidden
    wrong = [target - 8 * d.hidden, target * 1.005, target * 0.995, target + 8 * 1000, target * 2**20 / 1e6,
             8 * (k * d.block_params + 2 * d.hidden + head),
             8 * (k * d.block_linear_params + d.hidden + head), target + 4 * (9 * k + 3),
             liar(1.0, target), str(target), [target], {"k": target}, True]
    rounded = float(f"{target:.4g}")
    if not target <= rounded <= target + 4 * (9 * k + 2):  # on a tiny model 4 digits can land on the counters
        wrong.append(rounded)
    for answer in wrong:
        assert_fails("optimizer_state_bytes_k", answer, context=context)


def test_optimizer_state_is_for_a_model_the_lesson_does_not_run():
    """The exercise's target is Llama-7B's (untied lm_head), not the course model's: the lesson's own "last K" state
    and the course-shaped formula fail."""
    course_k = 8 * (lesson02.K * COURSE.block_params + COURSE.hidden)
    assert_fails("optimizer_state_bytes_k", course_k, context=CTX)
    no_head = 8 * (4 * LLAMA7B.block_params + LLAMA7B.hidden)
    assert_fails("optimizer_state_bytes_k", no_head, "lm_head", context=CTX)
    assert not LLAMA7B.tied


def test_every_exercise_states_its_kind_and_tolerance():
    assert {n: (EXERCISES[n].kind, EXERCISES[n].tolerance) for n in registered("02")} == {
        "freeze_all_but_last": ("code", 0.0), "optimizer_state_bytes_k": ("calculate", 0.0),
        "count_trainable": ("code", 0.0)}


def test_K_is_one_constant_shared_with_the_notebook():
    nb = nbformat.read(SOLUTION, 4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    literals = re.findall(r"^K = (\d+)", source, flags=re.M)
    assert literals == [str(lesson02.K)]


@pytest.mark.slow
def test_trusted_context_is_the_course_config():
    assert EXERCISES["optimizer_state_bytes_k"].trusted_context() == {"dims": LLAMA7B, "k": 4}
    assert (lesson02.STATE_MODEL, lesson02.STATE_K) == ("llama-7b", 4)
    right = 8 * (4 * LLAMA7B.block_params + LLAMA7B.hidden + LLAMA7B.vocab * LLAMA7B.hidden)
    assert grade("optimizer_state_bytes_k", right).status == PASS
    result = run_check("optimizer_state_bytes_k", right, k=4)
    assert result.status == FAIL and "takes no k" in result.message  # the notebook cannot move the target


def test_solution_check_calls_pass_no_learner_values():
    nb = nbformat.read(SOLUTION, 4)
    calls = [c.source for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith("check(")]
    assert calls == ['check("freeze_all_but_last", freeze_all_but_last)',
                     'check("optimizer_state_bytes_k", state_bytes_K)', 'check("count_trainable", count_trainable)']


# ------------------------------------------------------------------------------------------------
# count_trainable
# ------------------------------------------------------------------------------------------------
def right_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def transformers_count(model):
    return model.num_parameters(only_trainable=True)


def buggy_count(model):  # the lesson's bug: no .grad before backward (or after zero_grad(set_to_none=True))
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


def inverted_count(model):
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def all_count(model):
    return sum(p.numel() for p in model.parameters())


def tensor_count(model):
    return sum(1 for p in model.parameters() if p.requires_grad)


def duplicate_count(model):
    return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad)


def grad_or_trainable(model):  # a patched bug: still trusts a stale .grad left by an earlier backward
    return sum(p.numel() for p in model.parameters() if p.requires_grad or p.grad is not None)


COUNT_WRONG = [(buggy_count, ".grad"), (inverted_count, "inverted"), (all_count, "frozen ones too"),
               (tensor_count, "numel"), (duplicate_count, "twice"), (grad_or_trainable, "stale gradients"),
               (lambda m: 1 / 0, "zerodivisionerror"),
               (lambda m: "many", "count of parameters"), (right_count(tiny_model()), "function itself")]


def only_fresh_five_block(model):  # hard-coded: the fresh 5-block model's total
    return sum(p.numel() for p in tiny_model(num_hidden_layers=5).parameters())


def counts_after_unfreezing(model):  # tampers: unfreezes everything, then counts what it left
    model.requires_grad_(True)
    return right_count(model)


def counts_then_freezes(model):  # right number, but freezes the model it was asked to count
    n = right_count(model)
    model.requires_grad_(False)
    return n


def counts_once(model):  # right the first time, then remembers a stale answer
    if not hasattr(model, "_count"):
        model._count = right_count(model)
        return model._count
    return model._count + 1


def lying_int(model):
    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__
    return Liar(7)


def lying_object(model):
    class Liar:
        def __eq__(self, other):
            return True

        def __int__(self):
            return 0
    return Liar()


def count_tensor(model):  # a one-element tensor is a number: accepted (see the test below)
    return torch.tensor(right_count(model))


def frame_reader(model):  # takes the first large int it finds in the callers' frames
    frame = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if type(value) is int and value > 1000:
                return value
        frame = frame.f_back
    return 0


def backward_then_grad(model):  # runs a backward itself so that `.grad` exists, then counts gradients
    ids = torch.arange(8).reshape(1, 8) % model.config.vocab_size
    if any(p.requires_grad for p in model.parameters()):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


def exits(model):
    raise SystemExit(3)


COUNT_CHEATS = [(only_fresh_five_block, None), (counts_after_unfreezing, "never sets it"),
                (counts_then_freezes, "never sets it"), (counts_once, None), (lying_int, None), (lying_object, "int"),
                (frame_reader, None), (backward_then_grad, "gradients"), (exits, "SystemExit")]


def test_count_trainable():
    result = grade("count_trainable", right_count)
    assert result.status == PASS, result.message
    for honest in (transformers_count, count_tensor, lambda m: float(right_count(m))):
        assert grade("count_trainable", honest).status == PASS
    for answer, word in COUNT_WRONG:
        assert_fails("count_trainable", answer, word)


@pytest.mark.parametrize("cheat,word", COUNT_CHEATS, ids=lambda f: getattr(f, "__name__", str(f)))
def test_count_trainable_red_team(cheat, word):
    assert_fails("count_trainable", cheat, word)
