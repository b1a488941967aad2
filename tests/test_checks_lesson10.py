"""Lesson 10's checks: the capstone is graded by running the learner's recipe on the course model.

The recipes here run a small workload (2 rows of 128 tokens, 2 steps, 2 held-out chunks) so that each
costs seconds; the rules are the same as the lesson's.
"""

import functools

import pytest
import torch
from casebook import BLANKS, COURSE, assert_grades, registered
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from helpers import capstone
from helpers.capstone import Workload
from helpers.checks import FAIL, PASS, SKIP, run_check
from helpers.estimate import predict
from helpers.exercises.lesson10 import PLAN, SLIPS
from helpers.memory import CATEGORIES, MiB
from helpers.models import load_model, tiny_model
from helpers.train import make_train_step

pytestmark = pytest.mark.usefixtures("lenient_checks")

SMALL = Workload(batch_size=2, seq_len=128, steps=2, eval_chunks=2, budget=500 * MiB, quality=1.5)


def test_every_registered_exercise_has_cases():
    assert registered("10") == {"capstone_prediction", "fit_the_budget"}


# ------------------------------------------------------------------------------------------------
# Exercise 1: predicting the plan by category
# ------------------------------------------------------------------------------------------------
def as_mib(report):
    return {c: getattr(report, c) / MiB for c in CATEGORIES}


def test_capstone_prediction_grades_right_blank_and_wrong():
    want = predict(COURSE, PLAN)
    off = {**as_mib(want), "activations": 3 * want.activations / MiB}
    assert_grades("capstone_prediction", as_mib(want), [
        (as_mib(predict(COURSE, PLAN.but(batch_size=8, gradient_accumulation_steps=1))), "micro-batch"),
        (as_mib(predict(COURSE, PLAN.but(gradient_checkpointing=False))), "checkpointing"),
        (as_mib(predict(COURSE, PLAN.but(weights="fp32"))), "nf4"),
        (as_mib(predict(COURSE, PLAN.but(unquantized="bf16"))), "upcasts"),
        (as_mib(predict(COURSE, PLAN.but(lora_rank=0, weights="fp32"))), "adapters"),
        (off, "not within 10 %"),
        ({"weights": 179}, "missing"),
        ({**as_mib(want), "kv cache": 3}, "unknown"),
        ({**as_mib(want), "weights": "lots"}, "MiB of weights"),
        (316.0, "dict"),
    ], dims=COURSE)


def test_capstone_prediction_takes_predicts_own_report_and_label_names():
    want = predict(COURSE, PLAN)
    assert run_check("capstone_prediction", want, dims=COURSE).status == PASS
    labelled = {"weights": want.weights / MiB, "gradients": want.gradients / MiB,
                "optimizer state": want.optimizer / MiB, "activations and temporaries": want.activations / MiB}
    assert run_check("capstone_prediction", labelled, dims=COURSE).status == PASS


def test_every_slip_is_a_different_prediction():
    want = predict(COURSE, PLAN)
    for recipe, _ in SLIPS:
        assert predict(COURSE, recipe).peak != pytest.approx(want.peak, rel=0.05), recipe


# ------------------------------------------------------------------------------------------------
# Exercise 2: the capstone, run for real on the course model
# ------------------------------------------------------------------------------------------------
def qlora(lr=1e-3, rows=None):
    """A QLoRA recipe at micro-batch 1; ``rows`` feeds only the first rows of each batch (a cheat)."""
    def recipe():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = prepare_model_for_kbit_training(load_model(quantization_config=quantization),
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

        def step(batch):
            if rows is not None:
                batch = {k: v[:rows] for k, v in batch.items()}
            n = len(batch["input_ids"])
            return make_train_step(model, optimizer, batch, gradient_checkpointing=True, accumulation_steps=n)()
        return model, optimizer, step
    return recipe


def full_fp32():
    model = load_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    return model, optimizer, lambda batch: make_train_step(model, optimizer, batch)()


def grade(recipe, workload=SMALL):
    return run_check("fit_the_budget", recipe, workload=workload)


def test_a_recipe_that_fits_and_learns_passes_with_its_numbers():
    # A notebook that altered the cached corpus (here: held-out chunks swapped for training ones) gains nothing.
    poisoned = capstone.course_corpus()
    poisoned.heldout_index = poisoned.train_index[:2]
    result = grade(qlora())
    assert result.status == PASS, result.message
    assert result.points == 3 and "MiB of the 500 MiB budget" in result.message and "perplexity" in result.message
    assert capstone.course_corpus() is not poisoned


def test_blank_is_not_attempted():
    for blank in BLANKS:
        assert grade(blank).status == SKIP


def test_over_budget_says_which_categories_and_what_to_do():
    result = grade(full_fp32)
    assert result.status == FAIL and result.points == 0
    message = result.message
    assert "Over budget" in message
    for words in ("optimizer state 1,026", "on its own more than the whole budget", "LoRA", "weights 513"):
        assert words in message, (words, message)


def test_fits_but_does_not_learn():
    stingy = Workload(**{**SMALL.__dict__, "quality": 1.2})  # the nf4 base alone is about 1.3 x the fp32 model
    result = grade(qlora(lr=1e-7), stingy)
    assert result.status == FAIL and "did not learn enough" in result.message


def test_dropping_rows_does_not_count():
    result = grade(qlora(rows=1))
    assert result.status == FAIL and "skipped 1 of the batch's 2 rows" in result.message


def test_trainable_tensors_that_never_get_a_gradient_do_not_count():
    result = grade(qlora(lr=0.0))  # LoRA's B stays zero, so A's gradient is zero in every step
    assert result.status == FAIL and "got no gradient, or only zeros, in all 2 steps" in result.message, result.message
    assert "lora_A" in result.message

    def with_an_unused_parameter():
        model, optimizer, step = qlora()()
        model.register_parameter("unused", torch.nn.Parameter(torch.zeros(4)))  # trainable, never in the forward
        return model, optimizer, step
    result = grade(with_an_unused_parameter)
    assert result.status == FAIL and "1 of the model's" in result.message and "e.g. unused" in result.message


def evaluated_first(recipe, reenable=False):
    """``recipe``, with the model evaluated in eval mode without gradients before it is returned (the trap);
    ``reenable`` first switches bitsandbytes' packing back on, as a model from from_pretrained has it."""
    def build():
        model, optimizer, step = recipe()
        if reenable:
            for layer in model.modules():
                if hasattr(layer, "support_avx512bf16_for_cpu"):  # every bitsandbytes Linear4bit
                    layer.support_avx512bf16_for_cpu = True
        model.eval()
        with torch.no_grad():
            model(input_ids=capstone.course_corpus().heldout[:1])
        return model, optimizer, step
    return build


def test_a_model_packed_before_the_first_step_is_refused_on_every_cpu(avx512bf16):
    result = grade(evaluated_first(qlora(), reenable=True))
    assert result.status == FAIL and "packed by bitsandbytes for fast CPU inference" in result.message, result.message
    assert "no backward" in result.message and "prevent_packing" in result.message


def test_evaluating_a_model_from_load_model_before_returning_it_is_harmless(avx512bf16):
    # load_model prevents the packing, so the same evaluation leaves the model trainable.
    result = grade(evaluated_first(qlora()))
    assert result.status == PASS, result.message


@pytest.mark.filterwarnings("ignore:.*gemv_4bit.*autograd kernel")  # torch says so of the packed layer: the point
@pytest.mark.parametrize("trainer", ["make_train_step", "own loop"])
def test_layers_packed_during_the_run_are_refused(avx512bf16, trainer):
    def packs_in_its_first_step():
        model, optimizer, step = qlora()()
        done = []

        def own_loop(batch):  # what make_train_step does, without its refusal to train packed layers
            model.train()
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        def sneaky(batch):
            if not done:
                done.append(evaluated_first(lambda: (model, optimizer, step), reenable=True)())
            return (step if trainer == "make_train_step" else own_loop)(batch)
        return model, optimizer, sneaky
    result = grade(packs_in_its_first_step)
    words = "were packed by bitsandbytes" if trainer == "make_train_step" else "packed for CPU inference during the run"
    assert result.status == FAIL and words in result.message, result.message


def test_a_model_trained_before_the_first_step_does_not_count(monkeypatch):
    # As if the pretrained model were far worse: the built model then looks trained before step 1.
    monkeypatch.setattr(capstone, "pretrained_perplexity", functools.lru_cache(lambda chunks: 1e6))
    result = grade(qlora())
    assert result.status == FAIL and "before its first step" in result.message


@pytest.mark.parametrize("recipe,words", [
    (LoraConfig(r=8), "must be a function"),
    (lambda: (None, None), "three things"),
    (lambda: ("model", None, lambda b: 0.0), "torch.nn.Module"),
    (lambda: (tiny_model(), None, lambda b: 0.0), "not the course model"),
    (lambda: (load_model().requires_grad_(False), None, lambda b: 0.0), "requires grad"),
    (lambda: 1 / 0, "could not be checked"),
])
def test_malformed_recipes_get_a_sentence(recipe, words):
    result = grade(recipe)
    assert result.status == FAIL and words in result.message, result.message


def test_a_workload_needs_a_measured_step():
    with pytest.raises(ValueError, match="at least 2 steps"):
        Workload(steps=1)
