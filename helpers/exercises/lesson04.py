"""Lesson 04 — LoRA."""

from __future__ import annotations

from ..checks import as_number, close, exercise, ratio_hint
from ..estimate import Dims

LESSON = "04_lora"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------------------------
# Exercise 1: predict the trainable parameters of a LoraConfig (before print_trainable_parameters)
# ------------------------------------------------------------------------------------------------
@exercise("lora_param_count", lesson=LESSON)
def lora_param_count(answer, dims=None, rank: int = 8, targets=("q_proj", "v_proj")):
    """Trainable parameters of ``LoraConfig(r=rank, target_modules=targets)`` on the model of ``dims``."""
    if dims is None:
        return False, "run the cells above first: the check needs the model's shapes (pass dims=dims)."
    d = Dims.of(dims)
    value = as_number(answer, "a number of parameters")
    shapes = d.named_linear_shapes()
    want = d.layers * d.lora_params(rank, targets)
    if close(value, want, 1e-6):
        per = ", ".join(f"{t} {rank} x ({shapes[t][1]} + {shapes[t][0]})" for t in targets)
        return True, (f"{want:,.0f} = {d.layers} blocks x ({per}): A is r x in, B is out x r. "
                      f"That is {want / d.params:.2%} of the model's {d.params:,} parameters.")
    full = d.layers * sum(shapes[t][0] * shapes[t][1] for t in targets)
    a_only = d.layers * sum(rank * shapes[t][1] for t in targets)
    b_only = d.layers * sum(rank * shapes[t][0] for t in targets)
    same_as_q = d.layers * len(targets) * rank * sum(shapes["q_proj"])
    for wrong, hint in ((full, "that is the targeted layers' own weights, which LoRA freezes; the adapters are "
                               "the two thin matrices A (r x in) and B (out x r) beside each."),
                        (a_only, "that counts only A (r x in); B (out x r) trains too."),
                        (b_only, "that counts only B (out x r); A (r x in) trains too."),
                        (same_as_q, "v_proj is smaller than q_proj: the model has fewer key/value heads "
                                    f"({d.kv_heads}) than query heads ({d.heads}), so v_proj's output is "
                                    f"{shapes['v_proj'][0]}, not {shapes['q_proj'][0]}.")):
        if wrong != want and close(value, wrong, 1e-6):
            return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {1 / d.layers: "that is one block; every block gets its own adapters.",
                                    4.0: "that looks like bytes (fp32); the exercise asks for parameters.",
                                    2.0: "that is twice the answer: is the rank or a layer counted twice?",
                                    0.5: "that is half the answer: a layer or a matrix is missing."}, rel=0.01)
    return False, f"you said {value:,.0f}. " + (hint or "per targeted layer: r x (in_features + out_features), "
                                                "for every block; look at the shapes in `dims.named_linear_shapes()`.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: a LoraConfig that trains exactly a given number of parameters
# ------------------------------------------------------------------------------------------------
@exercise("lora_config_exact", lesson=LESSON)
def lora_config_exact(answer, dims=None, target: int | None = None):
    """A ``LoraConfig`` on the four attention projections, for a causal LM, training exactly ``target``."""
    from peft import LoraConfig

    if dims is None or target is None:
        return False, "run the cells above first: the check needs the model's shapes and the target (dims=, target=)."
    d = Dims.of(dims)
    if not isinstance(answer, LoraConfig):
        return False, (f"give a `peft.LoraConfig(...)` (you gave a {type(answer).__name__}); a dict of its "
                       "arguments is not enough.")
    targets = answer.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            return False, ("'all-linear' adapts the MLP too; the exercise asks for the attention projections "
                           f"only: {list(ATTENTION)}.")
        return False, (f"target_modules={targets!r} is a string; give the list of module names "
                       f"{list(ATTENTION)}.")
    targets = set(targets or ())
    if targets != set(ATTENTION):
        missing, extra = sorted(set(ATTENTION) - targets), sorted(targets - set(ATTENTION))
        parts = ([f"missing {missing}"] if missing else []) + ([f"not asked for {extra}"] if extra else [])
        return False, f"target_modules should be the four attention projections: {'; '.join(parts)}."
    task = getattr(answer.task_type, "value", answer.task_type)
    if task != "CAUSAL_LM":
        return False, ("set task_type='CAUSAL_LM': peft then wraps the model as a PeftModelForCausalLM, which "
                       "passes labels through and saves the right adapter config.")
    got = d.layers * d.lora_params(answer.r, ATTENTION)
    if got == target:
        return True, (f"r={answer.r} on q, k, v, o trains {got:,} parameters: {d.lora_params(1, ATTENTION):,} "
                      f"per unit of rank per block x {d.layers} blocks x r={answer.r}.")
    per_rank = d.layers * d.lora_params(1, ATTENTION)
    return False, (f"r={answer.r} trains {got:,}, not {target:,}. The count is linear in r: each unit of rank "
                   f"adds {per_rank:,} parameters here, so r = {target:,} / {per_rank:,}. (lora_alpha and "
                   "lora_dropout do not change the count.)")


# ------------------------------------------------------------------------------------------------
# Exercise 3: reload a saved adapter the right way
# ------------------------------------------------------------------------------------------------
def _saved_adapter(folder):
    """A tiny model with a LoRA adapter whose B is not zero (as after training), saved to ``folder``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..models import tiny_model

    model = get_peft_model(tiny_model(seed=3), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          task_type="CAUSAL_LM"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.save_pretrained(folder)
    return model.eval()


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@exercise("reload_adapter", lesson=LESSON)
def reload_adapter(answer):
    """A function ``reload(base_model, adapter_dir)`` returning the base model with the saved adapter applied."""
    import tempfile

    import torch
    from peft import PeftModel

    from ..models import tiny_model

    if not callable(answer):
        return False, f"give a function `reload(base_model, adapter_dir)` (you gave a {type(answer).__name__})."
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        trained = _saved_adapter(folder)
        want = _logits(trained, ids)
        base = tiny_model(seed=3)
        base_out = _logits(base, ids)
        try:
            got_model = answer(base, folder)
        except Exception as err:  # the learner's code: report it, do not raise
            return False, f"your function raised {type(err).__name__}: {str(err)[:200]}"
    if got_model is None:
        return False, "your function returns None: return the model with the adapter loaded."
    if not isinstance(got_model, torch.nn.Module):
        return False, f"return the model (a torch module), not a {type(got_model).__name__}."
    nested = isinstance(got_model, PeftModel) and isinstance(got_model.base_model.model, PeftModel)
    if nested:
        return False, ("your model is a PeftModel inside a PeftModel: get_peft_model on a model that already has "
                       "the adapter re-initialises it (B = 0) and wraps it again. Load it once, with "
                       "`PeftModel.from_pretrained`.")
    got = _logits(got_model.eval(), ids)
    if torch.allclose(got, want, atol=1e-5):
        return True, ("the reloaded model gives the trained model's outputs. PeftModel.from_pretrained loads the "
                      "adapter for inference (frozen); pass is_trainable=True to train it further.")
    if torch.allclose(got, base_out, atol=1e-5):
        return False, ("your model gives the *base* model's outputs: the adapter's trained weights were not "
                       "loaded. get_peft_model creates fresh adapters (B = 0); load the saved ones with "
                       "`PeftModel.from_pretrained(base_model, adapter_dir)`.")
    return False, ("the outputs match neither the trained model nor the base model: load the saved adapter "
                   "onto the base model you are given, unchanged, with `PeftModel.from_pretrained`.")
