"""Lesson 05's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones."""

import pytest
from casebook import assert_grades, registered
from peft import LoraConfig

from helpers.checks import FAIL, run_check
from helpers.estimate import LINEAR_NAMES, Recipe, optimizer_state_bytes, predict, trainable_params
from helpers.exercises.lesson05 import most_trainable

pytestmark = pytest.mark.usefixtures("lenient_checks")


def rank_for(dims):
    """A rank at which some adapter matrices go 8-bit (>= 4,096 values) and some stay 32-bit."""
    return 16 if dims.hidden >= 512 else 64
QLORA = Recipe(batch_size=1, seq_len=256, weights="nf4", double_quant=True, unquantized="bf16",
               gradient_checkpointing=True)


def lora(r, targets="all-linear", **kw):
    return LoraConfig(r=r, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM", **kw)


def budget_for(dims):
    """A budget that fits r=24 on every linear layer, and the rank that fills it."""
    budget = predict(dims, QLORA.but(lora_rank=24)).peak
    return budget, most_trainable(dims, QLORA, budget)


def cases(dims):
    embeddings, norms = dims.embedding_params * (1 if dims.tied else 2), (2 * dims.layers + 1) * dims.hidden
    upcast = 2 * (embeddings + norms)
    rank = rank_for(dims)
    eight = Recipe(lora_rank=rank, optimizer="adamw8bit")
    n = trainable_params(dims, eight)
    state = optimizer_state_bytes(dims, eight)
    sizes = [rank * s for t in LINEAR_NAMES for s in reversed(dims.named_linear_shapes()[t])] * dims.layers
    budget, (best_n, best_r, _) = budget_for(dims)
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "kbit_upcast_bytes": (upcast, {"dims": dims},
                              [(2 * embeddings, "norms"), (4 * (embeddings + norms), "added"),
                               (2 * dims.params, "stay 4-bit"), (upcast / 2, "half"), (upcast * 3, "unquantized"),
                               ("lots", "number")]),
        "adamw8bit_state_bytes": (state, {"dims": dims, "rank": rank},
                                  [(8 * n, "32-bit"), (2 * n, "absmax"),
                                   (sum(2 * s + 8 * -(-s // 256) for s in sizes), "4,096"), (n, "two moments"),
                                   (8 * state, "bits"), ([state], "number")]),
        "lora_under_budget": (lora(24), {"dims": dims, "recipe": QLORA, "budget": budget},
                              [(lora(4 * best_r), "over the"), (lora(2), "raise the rank"),
                               (lora(8, ["q_proj", "qkv"]), "choose among"),
                               ({"r": 24, "target_modules": "all-linear"}, "LoraConfig")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("05")


@pytest.mark.parametrize("name", ["kbit_upcast_bytes", "adamw8bit_state_bytes", "lora_under_budget"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, **context)


def test_the_budget_check_accepts_any_good_answer_and_the_best(dims):
    budget, (best_n, best_r, best_targets) = budget_for(dims)
    context = {"dims": dims, "recipe": QLORA, "budget": budget}
    assert run_check("lora_under_budget", lora(best_r, list(best_targets)), **context).passed
    assert run_check("lora_under_budget", lora(24, list(LINEAR_NAMES)), **context).passed  # a list, not the string
    assert run_check("lora_under_budget", lora(25), **context).status == FAIL            # one rank over
    plain = QLORA.but(gradient_checkpointing=False)  # without checkpointing dropout's copies add to the peak
    context = {"dims": dims, "recipe": plain, "budget": predict(dims, plain.but(lora_rank=24)).peak}
    with_dropout = run_check("lora_under_budget", lora(24, lora_dropout=0.1), **context)
    assert with_dropout.status == FAIL and "lora_dropout" in with_dropout.message
    assert best_n >= trainable_params(dims, QLORA.but(lora_rank=24))


def test_context_missing_says_what_to_pass():
    assert "dims=dims" in run_check("kbit_upcast_bytes", 5).message
    assert "dims=dims" in run_check("adamw8bit_state_bytes", 5).message
    assert "budget=" in run_check("lora_under_budget", lora(4)).message
