"""Lesson 02's exercise checks: the right answer passes, blanks are "not attempted", wrong ones get hints."""

import pytest
from casebook import COURSE

import helpers.exercises  # noqa: F401  (registers the checks, whichever test runs first)
from helpers.checks import EXERCISES, FAIL, PASS, SKIP, check, run_check
from helpers.estimate import Dims
from helpers.models import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("lenient_checks")




# ------------------------------------------------------------------------------------------------
# freeze_all_but_last: right and wrong functions, each wrong one with the word its hint must contain
# ------------------------------------------------------------------------------------------------
def right_freeze(model, k):
    model.requires_grad_(False)
    layers = model.model.layers
    for block in layers[len(layers) - k:]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)


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


# ------------------------------------------------------------------------------------------------
# count_trainable
# ------------------------------------------------------------------------------------------------
def right_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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


COUNT_WRONG = [(buggy_count, ".grad"), (inverted_count, "inverted"), (all_count, "frozen ones too"),
               (tensor_count, "numel"), (duplicate_count, "twice"), (lambda m: 1 / 0, "zerodivisionerror"),
               (lambda m: "many", "count of parameters"), (right_count(tiny_model()), "function itself")]


def optimizer_cases(d: Dims, k: int):
    trainable = k * d.block_params + d.hidden
    target = 8 * trainable
    context = {"k": k, "block_params": d.block_params, "hidden": d.hidden,
               "embedding_params": d.embedding_params, "n_params": d.params}
    wrong = [(4 * trainable, "one fp32 moment"), (12 * trainable, "gradients"), (trainable, "number of trainable"),
             (8 * ((k + 1) * d.block_params + d.hidden), f"{k + 1} blocks"),
             (8 * ((k - 1) * d.block_params + d.hidden), f"{k - 1} blocks"),
             (8 * d.params, "every parameter"), (target / 2**20, "MiB"), ("lots", "number")]
    if d is COURSE and k == 6:  # the tied embedding: where its ratio is not another mistake's (k=8: 2x)
        wrong.append((8 * (trainable + d.embedding_params), "embedding"))
    return target, context, wrong


def test_every_registered_exercise_has_a_test():
    check("count_trainable", None)  # loads the registry
    names = {n for n, e in EXERCISES.items() if e.lesson.startswith("02")}
    assert names == {"freeze_all_but_last", "optimizer_state_bytes_k", "count_trainable"}


@pytest.mark.parametrize("name", ["freeze_all_but_last", "optimizer_state_bytes_k", "count_trainable"])
def test_blanks_are_not_attempted(name):
    for blank in (None, ..., "", (None, None)):
        assert run_check(name, blank).status == SKIP


def test_freeze_all_but_last():
    result = run_check("freeze_all_but_last", right_freeze, model=tiny_model(), k=2)
    assert result.status == PASS, result.message
    assert "k=2 trains" in result.message  # says what it does on the lesson's model
    assert run_check("freeze_all_but_last", right_freeze).status == PASS  # context is optional
    for answer, word in FREEZE_WRONG:
        result = run_check("freeze_all_but_last", answer, k=2)
        assert result.status == FAIL, getattr(answer, "__name__", answer)
        assert word.lower() in result.message.lower(), (getattr(answer, "__name__", answer), result.message)
        assert result.points == 0


def test_freeze_check_never_touches_the_lessons_model():
    lesson_model = tiny_model()
    run_check("freeze_all_but_last", freezes_everything, model=lesson_model, k=1)
    assert all(p.requires_grad for p in lesson_model.parameters())


@pytest.mark.parametrize("d,k", [(COURSE, 6), (COURSE, 8), (Dims.of(tiny_config(num_hidden_layers=6)), 3)])
def test_optimizer_state_bytes_k(d, k):
    target, context, wrong = optimizer_cases(d, k)
    assert run_check("optimizer_state_bytes_k", target, **context).status == PASS
    step_counters = 4 * (9 * k + 1)  # Adam's per-tensor step counters: inside the tolerance
    assert run_check("optimizer_state_bytes_k", target + step_counters, **context).status == PASS
    for answer, word in wrong:
        result = run_check("optimizer_state_bytes_k", answer, **context)
        assert result.status == FAIL, answer
        assert word.lower() in result.message.lower(), (answer, result.message)
    assert "run the cells above" in run_check("optimizer_state_bytes_k", target).message


def test_count_trainable():
    result = run_check("count_trainable", right_count)
    assert result.status == PASS, result.message
    for answer, word in COUNT_WRONG:
        result = run_check("count_trainable", answer)
        assert result.status == FAIL, answer
        assert word.lower() in result.message.lower(), (answer, result.message)
