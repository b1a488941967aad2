"""Lesson 04's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones, and
gives no points to plausible slips or to cheats (red team)."""

import gc
import inspect
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from casebook import COURSE, assert_grades, fails, grade, registered
from peft import LoraConfig, PeftModel, get_peft_model

from helpers.checks import FAIL, PASS, SKIP, run_check
from helpers.exercises import lesson04

pytestmark = pytest.mark.usefixtures("lenient_checks", "one_thread")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
SOLUTION = Path(__file__).resolve().parents[1] / "solutions" / "04_lora.ipynb"


def lora(r, targets=ATTENTION, task="CAUSAL_LM", **kw):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task, **kw)


def right_reload(base, folder):
    return PeftModel.from_pretrained(base, folder)


def fresh_adapters(base, folder):  # the common slip: new adapters instead of the saved ones
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
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) | {"reload_adapter"} == registered("04")


@pytest.mark.parametrize("name", ["lora_param_count", "lora_config_exact"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, context)


# ------------------------------------------------------------------------------------------------
# Exercise 1: the count
# ------------------------------------------------------------------------------------------------
def test_lora_param_count_red_team(dims):
    shapes = dims.named_linear_shapes()
    qv = dims.layers * dims.lora_params(8, ("q_proj", "v_proj"))
    context = {"dims": dims}
    for answer in (qv + 1, qv - 1, qv * (dims.layers - 1) / dims.layers, qv * (dims.layers + 1) / dims.layers,
                   qv + dims.layers * (shapes["q_proj"][0] + shapes["v_proj"][0]),   # a bias on each B
                   dims.layers * dims.lora_params(8, ("q_proj", "k_proj")),           # k for v (same shapes!)
                   dims.layers * dims.lora_params(16, ("q_proj", "v_proj")),          # r = 16
                   dims.layers * dims.lora_params(8, ATTENTION),                      # four layers, not two
                   qv * 1.0001, [qv], str(qv), True):
        if answer == qv:  # k_proj and v_proj have the same shape in these models: that is not a wrong answer
            continue
        fails("lora_param_count", answer, context)
    assert grade("lora_param_count", float(qv), context).status == PASS


# ------------------------------------------------------------------------------------------------
# Exercise 2: what peft trains, not what the fields say
# ------------------------------------------------------------------------------------------------
def test_lora_config_exact_judges_what_peft_trains(dims):
    target = lesson04.target_for(dims)
    context = {"dims": dims}
    wrong = {
        "DoRA": (lora(12, use_dora=True), "use_dora"),
        "modules_to_save": (lora(11, modules_to_save=["lm_head"]), "modules_to_save"),
        "lora_bias": (lora(12, lora_bias=True), "lora_bias"),
        "some blocks": (lora(12, layers_to_transform=[0, 1]), "blocks"),
        "exclude one": (lora(12, exclude_modules=["model.layers.0.self_attn.q_proj"]), "blocks"),
        "rank_pattern": (lora(12, rank_pattern={"q_proj": 8}), "rank_pattern"),
        "inference mode": (lora(12, inference_mode=True), "inference_mode"),
        "MLP instead": (lora(12, ["gate_proj", "up_proj", "down_proj"]), "missing"),
        "regex for q and v": (lora(12, r".*\.(q|v)_proj"), "missing"),
        "a plain dict": ({"__class__": "LoraConfig", "r": 12}, "target"),
        "r = 0": (lora(0), "LoraConfig"),
        "a string": ("LoraConfig(r=12)", "LoraConfig"),
    }
    for case, (answer, word) in wrong.items():
        result = fails("lora_config_exact", answer, context)
        assert word.lower() in result.message.lower(), (case, result.message)
    assert grade("lora_config_exact", lora(12), context).passed
    assert target == 12 * dims.layers * dims.lora_params(1, ATTENTION)


def test_lora_config_exact_accepts_the_forms_peft_accepts(dims):
    context = {"dims": dims}
    for answer in (lora(12, [f"self_attn.{t}" for t in ATTENTION]),          # qualified names (suffix match)
                   lora(12, r".*\.(q|k|v|o)_proj"),                           # a regular expression
                   lora(12, set(ATTENTION)),
                   lora(12, alpha_pattern={"q_proj": 3}, lora_dropout=0.1),  # alpha and dropout change no count
                   LoraConfig(r=12, target_modules=ATTENTION, task_type="CAUSAL_LM", use_rslora=True)):
        result = grade("lora_config_exact", answer, context)
        assert result.passed, (answer.target_modules, result.message)


def test_the_trusted_target_is_the_notebooks():
    """TARGET is computed by the check from the course model's config; the notebook computes the same."""
    nb = nbformat.read(SOLUTION, as_version=4)
    line = next(line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
                if line.startswith("TARGET ="))
    notebook_target = eval(line.split("=", 1)[1], {"dims": COURSE, "ATTENTION": ATTENTION})
    assert notebook_target == lesson04.target_for(COURSE) == 1_382_400
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    targets = ", ".join(f'"{t}"' for t in lesson04.COUNT_TARGETS)
    assert f"`LoraConfig(r={lesson04.COUNT_RANK}, target_modules=[{targets}])`" in text
    calls = [c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("check(")]
    assert calls and all("=" not in call for call in calls)  # no context keywords: the checks compute their own


def test_the_solutions_answers_pass():
    dims = COURSE
    shapes = dims.named_linear_shapes()
    assert run_check("lora_param_count",
                     dims.layers * sum(8 * (o + i) for o, i in (shapes["q_proj"], shapes["v_proj"]))).passed
    target = lesson04.target_for(dims)
    per_rank = dims.layers * sum(o + i for name, (o, i) in shapes.items() if name in ATTENTION)
    exact = LoraConfig(r=target // per_rank, lora_alpha=2 * (target // per_rank),
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    assert run_check("lora_config_exact", exact).passed
    assert run_check("reload_adapter", right_reload).passed


def test_checks_take_no_context_from_the_caller():
    assert "takes no dims" in run_check("lora_param_count", 5, dims=COURSE).message
    assert "takes no" in run_check("lora_config_exact", lora(1), target=1_382_400 // 12).message


# ------------------------------------------------------------------------------------------------
# Exercise 3: reload (red team: slips and cheats)
# ------------------------------------------------------------------------------------------------
def returns_a_trained_model_from_the_stack(base, folder):
    """The known cheat: find a model with the trained adapter in the callers' frames and return it."""
    for frame in inspect.stack():
        for value in frame.frame.f_locals.values():
            if isinstance(value, PeftModel) and value is not base:
                return value
    return base


def returns_a_peft_model_from_memory(base, folder):
    """The same, through the garbage collector: any PeftModel alive in the process."""
    found = [o for o in gc.get_objects() if isinstance(o, PeftModel)]
    return found[-1] if found else base


def rebuilds_from_the_frames(base, folder):
    """Looks for a seed in the callers' frames and rebuilds the trained model from the check's own code."""
    frame = sys._getframe(1)
    while frame is not None:
        for name in ("seed", "weights", "adapter"):
            value = frame.f_locals.get(name)
            if isinstance(value, int):
                return lesson04.adapter_model(lesson04.RELOAD_MODELS[0], value)
        frame = frame.f_back
    return lesson04.adapter_model(lesson04.RELOAD_MODELS[0], 5)  # the old check's fixed seed


def raises_system_exit(base, folder):
    raise SystemExit(1)


def raises_keyboard_interrupt(base, folder):
    raise KeyboardInterrupt


def one_size_only(base, folder):
    from helpers.models import tiny_model

    return PeftModel.from_pretrained(tiny_model(seed=3), folder)


def tampers_with_the_base(base, folder):
    with torch.no_grad():
        base.model.embed_tokens.weight[:10] = 0
    return PeftModel.from_pretrained(base, folder)


def overwrites_the_adapter(base, folder):
    """Saves fresh (B = 0) adapters over the trained ones, then loads those."""
    fresh_adapters(base, folder).save_pretrained(folder)
    return PeftModel.from_pretrained(base.base_model.model if isinstance(base, PeftModel) else base, folder)


class Logits:
    logits = "the right numbers"


class LyingModule(torch.nn.Module):
    def forward(self, **_):
        return Logits()


def returns_a_lying_module(base, folder):
    return LyingModule()


class LyingTensor(torch.Tensor):
    pass


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits.as_subclass(LyingTensor)
        return out


def returns_lying_logits(base, folder):
    return Wrapper(PeftModel.from_pretrained(base, folder))


def trainable_then_trained_again(base, folder):
    """Loads the adapter, then changes it (a 'quick fine-tune' on random data)."""
    model = PeftModel.from_pretrained(base, folder, is_trainable=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(1.01)
    return model


RED_TEAM = {
    "fresh adapters": (fresh_adapters, "base"),
    "nested": (nested, "inside a PeftModel"),
    "returns None": (lambda base, folder: None, "returns None"),
    "raises": (lambda base, folder: 1 / 0, "ZeroDivisionError"),
    "SystemExit": (raises_system_exit, "SystemExit"),
    "KeyboardInterrupt": (raises_keyboard_interrupt, "KeyboardInterrupt"),
    "returns the folder": (lambda base, folder: folder, "not a str"),
    "trained model on the stack": (returns_a_trained_model_from_the_stack, "base"),
    "trained model in memory": (returns_a_peft_model_from_memory, "base"),
    "rebuilt from the frames": (rebuilds_from_the_frames, "neither"),
    "one size only": (one_size_only, "second"),
    "tampers with the base": (tampers_with_the_base, "neither"),
    "overwrites the adapter": (overwrites_the_adapter, "base"),
    "lying module": (returns_a_lying_module, "not a tensor"),
    "lying logits": (returns_lying_logits, "not a tensor"),
    "changes the adapter": (trainable_then_trained_again, "neither"),
}


@pytest.mark.parametrize("case", list(RED_TEAM))
def test_reload_red_team(case):
    fn, word = RED_TEAM[case]
    result = fails("reload_adapter", fn)
    assert word.lower() in result.message.lower(), result.message


def test_reload_accepts_the_right_forms():
    assert run_check("reload_adapter", right_reload).passed
    assert run_check("reload_adapter", merged).passed  # merged weights give the same logits
    assert run_check("reload_adapter", lambda base, folder: PeftModel.from_pretrained(
        base, folder, is_trainable=True)).passed
    for blank in (None, ...):
        assert run_check("reload_adapter", blank).status == SKIP
    assert run_check("reload_adapter", "PeftModel.from_pretrained").status == FAIL


def test_the_reload_judge_rebuilds_the_reference_itself():
    """The judge's expected logits come from the adapter weights the probe saved, applied to a base it builds; data
    that does not match them (or is malformed) fails."""
    from helpers.checks import answer_data, verdict

    data = answer_data("reload_adapter", right_reload)
    assert verdict("reload_adapter", data).passed
    data[0]["logits"]["sample"][0] += 0.01
    assert verdict("reload_adapter", data).status == FAIL
    data = answer_data("reload_adapter", right_reload)
    data[1]["adapter"] = data[1]["adapter"][:-1]
    assert verdict("reload_adapter", data).status == FAIL
    assert verdict("reload_adapter", [{"model": {}}]).status == FAIL
