"""Lesson 04's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones, and
gives no points to plausible slips or to cheats (red team)."""

import copy
import gc
import inspect
import sys

import nbformat
import pytest
import torch
from casebook import COURSE, assert_grades, fails, grade, registered
from peft import LoraConfig, PeftModel, get_peft_model

from helpers.checks import EXERCISES, FAIL, PASS, SKIP, run_check
from helpers.constants import ROOT
from helpers.exercises import lesson04

pytestmark = pytest.mark.usefixtures("lenient_checks", "one_thread")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
SOLUTION = ROOT / "solutions" / "04_lora.ipynb"


def lora(r, targets=ATTENTION, task="CAUSAL_LM", **kw):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task, **kw)


def right_load(base, dirs):
    names = list(dirs)
    model = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    return model


def cases(dims):
    shapes = dims.named_linear_shapes()
    count = dims.layers * sum(16 * (o + i) for o, i in shapes.values())
    attention = dims.layers * sum(16 * (o + i) for name, (o, i) in shapes.items() if name in ATTENTION)
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "lora_param_count": (count, {"dims": dims},
                             [(count / dims.layers, "one block"), (4 * count, "bytes"),
                              (dims.layers * sum(o * i for o, i in shapes.values()), "freezes"),
                              (dims.layers * sum(16 * i for o, i in shapes.values()), "only A"),
                              (dims.layers * sum(16 * o for o, i in shapes.values()), "only B"),
                              (attention, "MLP"), (count - attention, "attention projections"),
                              (count + 16 * (dims.hidden + dims.vocab), "lm_head"),
                              ("many", "number")]),
        "lora_config_exact": (lora(12), {"dims": dims},
                              [(lora(8), "r = "), (lora(12, ["q_proj", "v_proj"]), "missing"),
                               (lora(12, "all-linear"), "all-linear"),
                               (lora(12, ATTENTION + ["down_proj"]), "not asked for"),
                               (lora(12, task=None), "CAUSAL_LM"),
                               ({"r": 12, "target_modules": ATTENTION}, "LoraConfig")]),
    }


def test_every_registered_exercise_has_cases(dims):
    assert set(cases(dims)) | {"switch_adapters"} == registered("04")


@pytest.mark.parametrize("name", ["lora_param_count", "lora_config_exact"])
def test_check(name, dims):
    right, context, wrong = cases(dims)[name]
    assert_grades(name, right, wrong, context)


# ------------------------------------------------------------------------------------------------
# Exercise 1: the count
# ------------------------------------------------------------------------------------------------
def test_lora_param_count_red_team(dims):
    shapes = dims.named_linear_shapes()
    want = dims.layers * dims.lora_params(16)
    context = {"dims": dims}
    q_sized = dims.layers * 16 * sum(sum(shapes["q_proj"]) if t in ("k_proj", "v_proj") else sum(shapes[t])
                                     for t in shapes)
    for answer in (want + 1, want - 1, want * (dims.layers - 1) / dims.layers, want * (dims.layers + 1) / dims.layers,
                   want + dims.layers * sum(o for o, _ in shapes.values()),             # a bias on each B
                   q_sized,                                                              # k and v as wide as q
                   dims.layers * dims.lora_params(8),                                    # r = 8
                   dims.layers * dims.lora_params(16, ("q_proj", "v_proj")),             # the paper's two layers
                   want * 1.0001, [want], str(want), True):
        if answer == want:
            continue
        fails("lora_param_count", answer, context)
    result = fails("lora_param_count", q_sized, context)
    assert "k_proj and v_proj are smaller" in result.message
    assert grade("lora_param_count", float(want), context).status == PASS


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


def test_the_notebook_states_the_checks_numbers():
    """The notebook states exercise 2's target as a number (not the rank), and it is the check's; exercise 1 asks
    for the config the lesson then applies."""
    from helpers.estimate import Dims
    from helpers.models import reference_config

    nb = nbformat.read(SOLUTION, as_version=4)
    smol = Dims.of(reference_config(lesson04.EXACT_MODEL))
    assert lesson04.EXACT_TARGET == lesson04.target_for(smol) == 2_457_600
    assert EXERCISES["lora_config_exact"].trusted_context() == {"dims": smol}
    line = next(line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
                if line.startswith("TARGET ="))
    assert eval(line.split("=", 1)[1].split("#")[0]) == lesson04.EXACT_TARGET
    assert f'reference_config("{lesson04.EXACT_MODEL}")' in "\n".join(c.source for c in nb.cells)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert f"`LoraConfig(r={lesson04.COUNT_RANK}, target_modules=\"all-linear\")`" in text
    assert "LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=\"all-linear\"" in "\n".join(
        c.source for c in nb.cells if c.cell_type == "code")
    calls = [c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("check(")]
    assert calls and all("=" not in call for call in calls)  # no context keywords: the checks compute their own
    kinds = {name: EXERCISES[name].kind for name in registered("04")}
    assert kinds == {"lora_param_count": "predict", "lora_config_exact": "calculate", "switch_adapters": "code"}


def test_the_solutions_answers_pass():
    dims = COURSE
    shapes = dims.named_linear_shapes()
    assert run_check("lora_param_count", dims.layers * sum(16 * (o + i) for o, i in shapes.values())).passed
    smol = EXERCISES["lora_config_exact"].trusted_context()["dims"]
    per_rank = smol.layers * sum(o + i for name, (o, i) in smol.named_linear_shapes().items() if name in ATTENTION)
    rank = lesson04.EXACT_TARGET // per_rank
    exact = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                       task_type="CAUSAL_LM")
    assert run_check("lora_config_exact", exact).passed
    assert run_check("switch_adapters", right_load).passed


def test_checks_take_no_context_from_the_caller():
    assert "takes no dims" in run_check("lora_param_count", 5, dims=COURSE).message
    assert "takes no" in run_check("lora_config_exact", lora(1), target=1_382_400 // 12).message


def test_lora_config_exact_hints_at_narrow_key_value_projections():
    """On SmolLM2-360M k and v are a third of q's width: a rank worked out as if they were square is wrong."""
    smol = EXERCISES["lora_config_exact"].trusted_context()["dims"]
    square_rank = lesson04.EXACT_TARGET // (smol.layers * 4 * 2 * smol.hidden)
    result = fails("lora_config_exact", lora(square_rank), {"dims": smol})
    assert "r = " in result.message and f"{smol.layers * smol.lora_params(1, ATTENTION):,}" in result.message


# ------------------------------------------------------------------------------------------------
# Exercise 3: two adapters on one base (red team: slips and cheats)
# ------------------------------------------------------------------------------------------------
def only_the_first(base, dirs):
    name = next(iter(dirs))
    return PeftModel.from_pretrained(base, dirs[name], adapter_name=name)


def default_names(base, dirs):
    """Loads both, but not under the names given: set_adapter(name) cannot find them."""
    folders = iter(dirs.values())
    model = PeftModel.from_pretrained(base, next(folders))
    for i, folder in enumerate(folders):
        model.load_adapter(folder, adapter_name=f"adapter{i}")
    return model


def hard_coded_names(base, dirs):
    """Works for the names of the first model only."""
    folders = list(dirs.values())
    model = PeftModel.from_pretrained(base, folders[0], adapter_name="chat")
    model.load_adapter(folders[1], adapter_name="sql")
    return model


def swapped(base, dirs):
    names = list(dirs)
    model = PeftModel.from_pretrained(base, dirs[names[1]], adapter_name=names[0])
    model.load_adapter(dirs[names[0]], adapter_name=names[1])
    return model


def fresh_adapters(base, dirs):  # the common slip: new adapters instead of the saved ones
    names = list(dirs)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"), adapter_name=names[0])
    model.add_adapter(names[1], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def nested(base, dirs):
    names = list(dirs)
    return PeftModel.from_pretrained(PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0]),
                                     dirs[names[1]], adapter_name=names[1])


def merged(base, dirs):
    """Merging folds one adapter into the weights: a plain transformers model, which cannot switch."""
    return PeftModel.from_pretrained(base, next(iter(dirs.values()))).merge_and_unload()


class Switchboard(torch.nn.Module):
    """One merged copy of the base per adapter, and a set_adapter that picks one: right outputs, twice the memory."""

    def __init__(self, models):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)
        self.active = next(iter(models))

    def set_adapter(self, name):
        self.active = name

    def forward(self, **kw):
        return self.models[self.active](**kw)


def a_merged_copy_each(base, dirs):
    return Switchboard({name: PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
                        for name, folder in dirs.items()})


def returns_a_trained_model_from_the_stack(base, dirs):
    """The known cheat: find a model with a trained adapter in the callers' frames and return it."""
    for frame in inspect.stack():
        for value in frame.frame.f_locals.values():
            if isinstance(value, PeftModel) and value is not base:
                return value
    return base


def returns_a_peft_model_from_memory(base, dirs):
    """The same, through the garbage collector: any PeftModel alive in the process."""
    found = [o for o in gc.get_objects() if isinstance(o, PeftModel)]
    return found[-1] if found else base


def rebuilds_from_the_frames(base, dirs):
    """Looks for a seed in the callers' frames and rebuilds a trained model from the check's own code."""
    frame = sys._getframe(1)
    while frame is not None:
        for name in ("seed", "weights", "adapter"):
            value = frame.f_locals.get(name)
            if isinstance(value, int):
                return lesson04.adapter_model(lesson04.SWITCH_MODELS[0], lesson04.SWITCH_ADAPTERS[0], value)
        frame = frame.f_back
    return lesson04.adapter_model(lesson04.SWITCH_MODELS[0], lesson04.SWITCH_ADAPTERS[0], 5)


def raises_system_exit(base, dirs):
    raise SystemExit(1)


def raises_keyboard_interrupt(base, dirs):
    raise KeyboardInterrupt


def one_size_only(base, dirs):
    from helpers.models import tiny_model

    return right_load(tiny_model(seed=3), dirs)


def tampers_with_the_base(base, dirs):
    with torch.no_grad():
        base.model.embed_tokens.weight[:10] = 0
    return right_load(base, dirs)


def overwrites_the_adapters(base, dirs):
    """Saves fresh (B = 0) adapters over the trained ones, then loads those."""
    names = list(dirs)
    for name in names:
        fresh = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
        fresh.save_pretrained(dirs[name])
    return right_load(base, dirs)


class Logits:
    logits = "the right numbers"


class LyingModule(torch.nn.Module):
    def set_adapter(self, name):
        pass

    def forward(self, **_):
        return Logits()


class LyingTensor(torch.Tensor):
    pass


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def set_adapter(self, name):
        self.inner.set_adapter(name)

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits.as_subclass(LyingTensor)
        return out


def returns_lying_logits(base, dirs):
    return Wrapper(right_load(base, dirs))


def changes_an_adapter(base, dirs):
    """Loads both, then changes one (a 'quick fine-tune' on random data)."""
    model = right_load(base, dirs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(1.01)
    return model


def set_adapter_never_switches(base, dirs):
    model = right_load(base, dirs)
    model.set_adapter = lambda name: None  # the instance attribute hides the method
    return model


RED_TEAM = {
    "only the first": (only_the_first, "not found"),
    "default names": (default_names, "adapter_name"),
    "hard-coded names": (hard_coded_names, "second"),
    "swapped": (swapped, "still computes"),
    "fresh adapters": (fresh_adapters, "base"),
    "nested": (nested, "inside a PeftModel"),
    "merged": (merged, "merge"),
    "a merged copy each": (a_merged_copy_each, "copy of the base"),
    "returns None": (lambda base, dirs: None, "returns None"),
    "raises": (lambda base, dirs: 1 / 0, "ZeroDivisionError"),
    "SystemExit": (raises_system_exit, "SystemExit"),
    "KeyboardInterrupt": (raises_keyboard_interrupt, "KeyboardInterrupt"),
    "returns the folders": (lambda base, dirs: dirs, "not a dict"),
    "trained model on the stack": (returns_a_trained_model_from_the_stack, "set_adapter"),
    "trained model in memory": (returns_a_peft_model_from_memory, "set_adapter"),
    "rebuilt from the frames": (rebuilds_from_the_frames, "set_adapter"),
    "one size only": (one_size_only, "second"),
    "tampers with the base": (tampers_with_the_base, "neither"),
    "overwrites the adapters": (overwrites_the_adapters, "base"),
    "lying module": (lambda base, dirs: LyingModule(), "not a tensor"),
    "lying logits": (returns_lying_logits, "not a tensor"),
    "changes an adapter": (changes_an_adapter, "neither"),
    "set_adapter never switches": (set_adapter_never_switches, "still computes"),
}


@pytest.mark.slow  # twenty cases of two seconds: each saves and reloads adapters
@pytest.mark.parametrize("case", list(RED_TEAM))
def test_switch_red_team(case):
    fn, word = RED_TEAM[case]
    result = fails("switch_adapters", fn)
    assert word.lower() in result.message.lower(), result.message


def test_switch_accepts_the_right_forms():
    assert run_check("switch_adapters", right_load).passed

    def from_a_loop(base, dirs):  # every adapter through load_adapter onto a PeftModel made for the first
        model = None
        for name, folder in dirs.items():
            if model is None:
                model = PeftModel.from_pretrained(base, folder, adapter_name=name, is_trainable=True)
            else:
                model.load_adapter(folder, adapter_name=name)
        return model

    assert run_check("switch_adapters", from_a_loop).passed
    for blank in (None, ...):
        assert run_check("switch_adapters", blank).status == SKIP
    assert run_check("switch_adapters", "PeftModel.from_pretrained").status == FAIL


def test_the_switch_judge_rebuilds_the_reference_itself():
    """The judge's expected logits come from the adapter weights the probe saved, applied to a base it builds; data
    that does not match them (or is malformed) fails."""
    from helpers.checks import answer_data, verdict

    data = answer_data("switch_adapters", right_load)
    assert verdict("switch_adapters", data).passed
    data[0]["switches"][1]["logits"]["sample"][0] += 0.01
    assert verdict("switch_adapters", data).status == FAIL
    data = answer_data("switch_adapters", right_load)
    name = data[1]["names"][0]
    data[1]["adapters"][name] = data[1]["adapters"][name][:-1]
    assert verdict("switch_adapters", data).status == FAIL
    data = answer_data("switch_adapters", right_load)
    data[0]["held"] *= 2
    assert verdict("switch_adapters", data).status == FAIL
    assert verdict("switch_adapters", [{"model": {}}]).status == FAIL
