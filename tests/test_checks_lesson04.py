"""Lesson 04's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones."""

import pytest
from casebook import assert_grades, registered
from peft import LoraConfig, PeftModel, get_peft_model

from helpers.checks import FAIL, run_check

pytestmark = pytest.mark.usefixtures("lenient_checks")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora(r, targets=ATTENTION, task="CAUSAL_LM"):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task)


def right_reload(base, folder):
    return PeftModel.from_pretrained(base, folder)


def fresh_adapters(base, folder):  # the note's mistake: new adapters instead of the saved ones
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM"))


def nested(base, folder):
    return get_peft_model(PeftModel.from_pretrained(base, folder), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def merged(base, folder):
    return PeftModel.from_pretrained(base, folder).merge_and_unload()


def cases(dims):
    per_rank = dims.layers * dims.lora_params(1, ATTENTION)
    target = 12 * per_rank
    shapes = dict(zip(("q", "k", "v", "o"), dims.linear_shapes()[:4], strict=False))
    qv = dims.layers * 8 * (sum(shapes["q"]) + sum(shapes["v"]))
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "lora_param_count": (qv, {"dims": dims},
                             [(qv / dims.layers, "one block"), (4 * qv, "bytes"),
                              (dims.layers * (shapes["q"][0] * shapes["q"][1] + shapes["v"][0] * shapes["v"][1]),
                               "freezes"),
                              (dims.layers * 8 * (shapes["q"][1] + shapes["v"][1]), "only A"),
                              (dims.layers * 8 * (shapes["q"][0] + shapes["v"][0]), "only B"),
                              (dims.layers * 16 * sum(shapes["q"]), "v_proj is smaller"),
                              ("many", "number")]),
        "lora_config_exact": (lora(12), {"dims": dims, "target": target},
                              [(lora(8), "r = "), (lora(12, ["q_proj", "v_proj"]), "missing"),
                               (lora(12, "all-linear"), "all-linear"),
                               (lora(12, ATTENTION + ["down_proj"]), "not asked for"),
                               (lora(12, task=None), "CAUSAL_LM"),
                               ({"r": 12, "target_modules": ATTENTION}, "LoraConfig")]),
        "reload_adapter": (right_reload, {},
                           [(fresh_adapters, "base"), (nested, "inside a PeftModel"),
                            (lambda base, folder: None, "returns None"),
                            (lambda base, folder: 1 / 0, "ZeroDivisionError"),
                            ("PeftModel.from_pretrained", "function")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) == registered("04")


@pytest.mark.parametrize("name", ["lora_param_count", "lora_config_exact", "reload_adapter"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, **context)


def test_a_merged_reload_is_also_right():
    assert run_check("reload_adapter", merged).passed


def test_context_missing_says_what_to_pass():
    assert "dims=dims" in run_check("lora_param_count", 5).message
    assert run_check("lora_config_exact", lora(4)).status == FAIL
