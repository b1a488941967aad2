"""Lesson 05's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones, and
gives no points to plausible slips or to cheats (red team)."""

import math

import nbformat
import pandas as pd
import pytest
from casebook import COURSE, assert_grades, fails, grade, registered
from peft import LoraConfig

from helpers.checks import EXERCISES, FAIL, run_check
from helpers.constants import ROOT
from helpers.estimate import (
    LINEAR_NAMES,
    Dims,
    Recipe,
    optimizer_state_bytes,
    predict,
    trainable_params,
    weight_bytes,
)
from helpers.exercises import lesson05
from helpers.exercises.lesson05 import most_trainable
from helpers.models import reference_config

pytestmark = pytest.mark.usefixtures("lenient_checks")
SOLUTION = ROOT / "solutions" / "05_qlora.ipynb"
QLORA = Recipe(batch_size=1, seq_len=256, weights="nf4", double_quant=True, unquantized="bf16",
               gradient_checkpointing=True)


def lora(r, targets="all-linear", **kw):
    return LoraConfig(r=r, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM", **kw)


def budget_for(dims):
    """A budget that fits r=24 on every linear layer, and the most that fits it."""
    budget = predict(dims, QLORA.but(lora_rank=24)).peak
    return budget, most_trainable(dims, QLORA, budget)


def rank_for(dims):
    """A rank at which some adapter matrices go 8-bit (>= 4,096 values) and some stay 32-bit: the lesson's 16 on
    the course shapes, 64 on the tiny ones."""
    return 16 if dims.hidden >= 512 else 64


def adamw8bit(dims, rank=16):
    """The solution's formula (without the shared code tables)."""
    sizes = [rank * n for out_f, in_f in dims.named_linear_shapes().values() for n in (in_f, out_f)] * dims.layers
    return sum(8 * n if n < 4096 else 2 * n + 2 * 4 * math.ceil(n / 256) for n in sizes), sizes


def cases(dims):
    embeddings, norms = dims.embedding_params * (1 if dims.tied else 2), (2 * dims.layers + 1) * dims.hidden
    upcast = 2 * (embeddings + norms)
    state, sizes = adamw8bit(dims, rank_for(dims))
    n = sum(sizes)
    budget, (best_n, best_r, _) = budget_for(dims)
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "kbit_upcast_bytes": (upcast, {"dims": dims},
                              [(2 * embeddings, "norms"), (4 * (embeddings + norms), "added"),
                               (2 * dims.params, "stay 4-bit"), (upcast / 2, "half"), (upcast * 3, "unquantized"),
                               (upcast - 2 * dims.hidden, "final norm"), ("lots", "number")]),
        "adamw8bit_state_bytes": (state, {"dims": dims, "rank": rank_for(dims)},
                                  [(8 * n, "32-bit"), (2 * n, "absmax"),
                                   (sum(2 * s + 8 * -(-s // 256) for s in sizes), "4,096"), (n, "two moments"),
                                   (8 * state, "bits"), ([state], "number")]),
        "lora_under_budget": (lora(24), {"dims": dims, "recipe": QLORA, "budget": budget},
                              [(lora(4 * best_r), "over the"), (lora(2), "raise the rank"),
                               (lora(8, ["q_proj", "lm_head"]), "choose among"),
                               ({"r": 24, "target_modules": "all-linear"}, "LoraConfig")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("05")


@pytest.mark.parametrize("name", ["kbit_upcast_bytes", "adamw8bit_state_bytes", "lora_under_budget"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, context)


# ------------------------------------------------------------------------------------------------
# Exercises 1 and 2: predictions (red team: slips just outside the lesson's point)
# ------------------------------------------------------------------------------------------------
def test_kbit_upcast_red_team(dims):
    embeddings = dims.embedding_params * (1 if dims.tied else 2)
    unquantized = embeddings + (2 * dims.layers + 1) * dims.hidden
    want = 2 * unquantized
    context = {"dims": dims}
    for answer in (want - 2 * dims.hidden,                     # the final norm forgotten
                   want - 2 * dims.layers * dims.hidden,       # one norm per block
                   2 * (2 * dims.embedding_params + (2 * dims.layers + 1) * dims.hidden),  # tied counted twice
                   want * 1e6 / 2**20, want / 2**20, want / 1e6,  # MB / MiB
                   want * 8, want / 8,                         # bits
                   4 * unquantized, 2 * weight_bytes(dims, Recipe(training=False, weights="nf4")),
                   want + 1, want * 1.001, str(want), [want], True):
        if answer != want:
            fails("kbit_upcast_bytes", answer, context)
    assert grade("kbit_upcast_bytes", float(want), context).passed


def test_adamw8bit_red_team(dims):
    rank = rank_for(dims)
    state, sizes = adamw8bit(dims, rank)
    n = sum(sizes)
    large = [s for s in sizes if s >= 4096]
    small = [s for s in sizes if s < 4096]
    context = {"dims": dims, "rank": rank}
    one_absmax = 8 * sum(small) + sum(2 * s + 4 * math.ceil(s / 256) for s in large)
    for answer in (one_absmax,                                  # one absmax for both moments
                   8 * sum(small) + 2 * sum(large),             # no absmax
                   8 * n + 4 * len(sizes),                      # torch AdamW with step counters
                   4 * n,                                       # one fp32 moment
                   state * 1e6 / 2**20, state / 2**20,          # MB / MiB
                   state + 4 * len(sizes),                      # a 4-byte counter per tensor: bnb keeps none
                   state + 2048 + 4,                            # tables and something else
                   state / dims.layers, state * 8, state - 8, str(state)):
        fails("adamw8bit_state_bytes", answer, context)
    assert grade("adamw8bit_state_bytes", state + 2048, context).passed  # the shared tables may be counted
    want = optimizer_state_bytes(dims, Recipe(lora_rank=rank, optimizer="adamw8bit"))
    assert want in (state, state + 2048)


def test_the_solutions_answers_pass():
    """The notebook's solution expressions pass against the trusted context (the course model, LLaMA 13B)."""
    dims = COURSE
    llama3 = Dims.of(reference_config(lesson05.UPCAST_MODEL))
    unquantized = llama3.vocab * llama3.hidden * (1 if llama3.tied else 2) + (2 * llama3.layers + 1) * llama3.hidden
    assert run_check("kbit_upcast_bytes", (4 - 2) * unquantized).passed
    assert unquantized * 2 == 2_101_878_784                              # Llama 3 8B: untied, 128,256 x 4,096
    course = dims.vocab * dims.hidden + (2 * dims.layers + 1) * dims.hidden
    result = run_check("kbit_upcast_bytes", 2 * course)                 # the course model's: not the question
    assert result.status == FAIL
    assert run_check("adamw8bit_state_bytes", adamw8bit(dims)[0]).passed
    llama13 = reference_config(lesson05.PRESET)
    rank = 1
    while predict(llama13, lesson05.AT_SCALE_QLORA.but(lora_rank=rank + 1, lora_targets="all-linear")).peak \
            <= lesson05.BUDGET:
        rank += 1
    result = run_check("lora_under_budget", lora(rank))
    assert result.passed, result.message
    assert run_check("lora_under_budget", lora(rank + 1)).status == FAIL  # one rank over the budget


def test_the_notebook_agrees_with_the_lessons_constants():
    """The lesson's `llama13`, `at_scale_qlora` and `BUDGET`, computed by its own cells, are the check's."""
    nb = nbformat.read(SOLUTION, as_version=4)
    cells = {c.get("id"): c.source for c in nb.cells}
    namespace = {"pd": pd, "Recipe": Recipe, "predict": predict, "reference_config": reference_config, "Dims": Dims}
    exec(cells["35ac7598"], namespace)  # the presets table: defines GiB, at_scale and the recipes
    exec(cells["6fcff29e"], namespace)  # llama13, at_scale_qlora, GPU, HEADROOM, BUDGET
    context = EXERCISES["lora_under_budget"].trusted_context()
    assert namespace["at_scale_qlora"] == lesson05.AT_SCALE_QLORA == context["recipe"]
    assert namespace["BUDGET"] == lesson05.BUDGET == context["budget"] == 11 * 2**30
    assert (namespace["GPU"], namespace["HEADROOM"]) == (lesson05.GPU, lesson05.HEADROOM)
    assert EXERCISES["kbit_upcast_bytes"].trusted_context() == {"dims": Dims.of(reference_config("llama-3-8b"))}
    assert f'reference_config("{lesson05.UPCAST_MODEL}")' in "\n".join(c.source for c in nb.cells)
    kinds = {name: EXERCISES[name].kind for name in ("kbit_upcast_bytes", "adamw8bit_state_bytes", "lora_under_budget")}
    assert kinds == {"kbit_upcast_bytes": "calculate", "adamw8bit_state_bytes": "predict",
                     "lora_under_budget": "calculate"}
    assert Dims.of(namespace["llama13"]) == context["dims"]
    assert "at least 90 %" in "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert lesson05.ENOUGH == 0.9
    assert "(r = 16 on every linear layer)" in "\n".join(c.source for c in nb.cells)
    assert (lesson05.EIGHT_BIT_RANK, lesson05.EIGHT_BIT_TARGETS) == (16, LINEAR_NAMES)
    calls = [c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("check(")]
    assert calls and all("=" not in call for call in calls)  # no context keywords: the checks compute their own


def test_checks_take_no_context_from_the_caller():
    assert "takes no dims" in run_check("kbit_upcast_bytes", 5, dims=COURSE).message
    assert "takes no" in run_check("adamw8bit_state_bytes", 5, dims=COURSE).message
    assert "takes no rank" in run_check("adamw8bit_state_bytes", 5, rank=8).message
    assert "takes no" in run_check("lora_under_budget", lora(4), budget=10**12).message


# ------------------------------------------------------------------------------------------------
# Exercise 3: what peft trains, not what the fields say
# ------------------------------------------------------------------------------------------------
def test_the_budget_check_accepts_any_good_answer_and_the_best(dims):
    budget, (best_n, best_r, best_targets) = budget_for(dims)
    context = {"dims": dims, "recipe": QLORA, "budget": budget}
    assert grade("lora_under_budget", lora(best_r, list(best_targets)), context).passed
    assert grade("lora_under_budget", lora(24, list(LINEAR_NAMES)), context).passed  # a list, not the string
    assert grade("lora_under_budget", lora(24, [f"self_attn.{t}" for t in LINEAR_NAMES[:4]]
                                           + [f"mlp.{t}" for t in LINEAR_NAMES[4:]]), context).passed
    assert grade("lora_under_budget", lora(24, alpha_pattern={"q_proj": 64}), context).passed  # alpha: no memory
    assert grade("lora_under_budget", lora(25), context).status == FAIL            # one rank over
    plain = QLORA.but(gradient_checkpointing=False)  # without checkpointing dropout's copies add to the peak
    context = {"dims": dims, "recipe": plain, "budget": predict(dims, plain.but(lora_rank=24)).peak}
    with_dropout = grade("lora_under_budget", lora(24, lora_dropout=0.1), context)
    assert with_dropout.status == FAIL and "lora_dropout" in with_dropout.message
    assert best_n >= trainable_params(dims, QLORA.but(lora_rank=24))


def test_the_budget_check_judges_what_peft_trains(dims):
    budget, (best_n, best_r, best_targets) = budget_for(dims)
    context = {"dims": dims, "recipe": QLORA, "budget": budget}
    wrong = {
        "DoRA": (lora(24, use_dora=True), "use_dora"),
        "modules_to_save": (lora(24, modules_to_save=["lm_head"]), "modules_to_save"),
        "embeddings saved": (lora(24, modules_to_save=["embed_tokens"]), "modules_to_save"),
        "lora_bias": (lora(24, lora_bias=True), "lora_bias"),
        "fewer blocks, higher rank": (lora(4 * best_r, list(LINEAR_NAMES), layers_to_transform=[0]), "blocks"),
        "exclude a layer": (lora(24, exclude_modules=["model.layers.0.mlp.down_proj"]), "blocks"),
        "rank_pattern": (lora(24, rank_pattern={"down_proj": 4 * best_r}), "rank_pattern"),
        "the lm_head": (lora(8, ["q_proj", "lm_head"]), "choose among"),
        "inference mode": (lora(24, inference_mode=True), "inference_mode"),
        "a layer that does not exist": (lora(24, ["qkv"]), "LoraConfig"),
        "a dict": ({"r": 24, "target_modules": "all-linear"}, "LoraConfig"),
        "peft's default targets": ({"__class__": "LoraConfig", "r": 24}, "raise the rank"),
        "a string": ("all-linear", "LoraConfig"),
        "a number": (24, "LoraConfig"),
    }
    for case, (answer, word) in wrong.items():
        result = fails("lora_under_budget", answer, context)
        assert word.lower() in result.message.lower(), (case, result.message)

