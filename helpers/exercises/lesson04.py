"""Lesson 04 — LoRA.

Every target is computed here from the lesson's fixed inputs: the course model's config (``course_dims``) and
the lesson's constants below; never from the learner's variables. A ``LoraConfig`` is judged by what peft does
with it: the judge applies it to a model of the course's shapes that it builds on the meta device (no memory,
no weights) and counts what peft actually trains. The reload function is run by a probe on adapters it saves
itself (fresh random weights each time) and judged by its logits against a model the judge rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import AnswerError, as_config, as_number, exercise, learner_call, ratio_hint, trusted_dims

LESSON = "04_lora"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
COUNT_RANK, COUNT_TARGETS = 8, ("q_proj", "v_proj")  # exercise 1: LoraConfig(r=8, target_modules=[q, v])
TARGET_RANK = 12  # exercise 2: TARGET = 12 x the adapters of one unit of rank on q, k, v, o (all blocks)


def exact(value: float, want: int) -> bool:
    """Exercise 1's answer is a sum of integer products, which floats hold exactly: one parameter off is wrong."""
    return abs(value - want) < 0.5


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


def target_for(dims) -> int:
    """Exercise 2's TARGET for a model of ``dims``: ``TARGET_RANK`` on the four attention projections."""
    return TARGET_RANK * dims.layers * dims.lora_params(1, ATTENTION)


# ------------------------------------------------------------------------------------------------
# What peft does with a LoraConfig (shared with lesson 05)
# ------------------------------------------------------------------------------------------------
def llama_config(dims):
    """A Llama config with the shapes of ``dims`` (the course model and the reference presets are Llamas)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=dims.vocab, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
                       num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
                       num_key_value_heads=dims.kv_heads, head_dim=dims.head_dim, tie_word_embeddings=dims.tied,
                       use_cache=False)


@dataclass
class LoraEffects:
    """What ``get_peft_model`` did to a model: the facts a judge needs, not the config's fields."""

    config: object  # the rebuilt LoraConfig
    wrapper: str  # the PeftModel class peft chose (PeftModelForCausalLM for task_type="CAUSAL_LM")
    trainable: int  # parameters that require grad
    adapters: dict = field(default_factory=dict)  # (block index or None, layer name) -> rank
    extras: list = field(default_factory=list)  # trainable tensors that are not a LoRA A or B weight
    layers: int = 0

    def kinds(self) -> set[str]:
        return {kind for _, kind in self.adapters}

    def blocks_of(self, kind: str) -> set:
        return {i for i, k in self.adapters if k == kind}

    def ranks(self) -> set[int]:
        return set(self.adapters.values())

    def extras_hint(self) -> str:
        """Name the option that trains the extra tensors."""
        names = " ".join(self.extras)
        causes = []
        if "lora_magnitude_vector" in names:
            causes.append("use_dora=True trains a magnitude vector per adapted layer (DoRA)")
        if "modules_to_save" in names:
            causes.append("modules_to_save trains a full copy of each module it names")
        if "lora_B" in names and ".bias" in names:
            causes.append("lora_bias=True trains a bias for every B")
        if not causes:
            shown = ", ".join(self.extras[:3]) + (" ..." if len(self.extras) > 3 else "")
            causes.append(f"these train too: {shown}")
        return "; ".join(causes)


def lora_effects(data, dims) -> LoraEffects:
    """Rebuild the LoraConfig from plain ``data``, apply it with peft to a model of ``dims`` built on the meta
    device, and report what trains. Raises ``AnswerError`` with a sentence when peft refuses the config."""
    import re
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = as_config(data, LoraConfig)
        except (TypeError, ValueError) as err:
            if isinstance(err, AnswerError):
                raise
            raise AnswerError(f"peft refuses this LoraConfig ({type(err).__name__}: {str(err)[:200]}).") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(llama_config(dims))
        try:
            peft_model = get_peft_model(model, config)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
            raise AnswerError(f"peft cannot apply this LoraConfig to the model ({type(err).__name__}: "
                              f"{str(err)[:200]}).") from None
    effects = LoraEffects(config=config, wrapper=type(peft_model).__name__, trainable=0, layers=dims.layers)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            effects.trainable += p.numel()
            if not re.search(r"\.lora_[AB]\.[^.]+\.weight$", name):
                effects.extras.append(name.removeprefix("base_model.model."))
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and module.r:
            block = re.search(r"\.layers\.(\d+)\.", name)
            kind = name.rsplit(".", 1)[-1]
            effects.adapters[int(block.group(1)) if block else None, kind] = max(module.r.values())
    return effects


def covers_every_block(effects: LoraEffects, kind: str) -> bool:
    return effects.blocks_of(kind) == set(range(effects.layers))


# ------------------------------------------------------------------------------------------------
# Exercise 1: predict the trainable parameters of a LoraConfig (before print_trainable_parameters)
# ------------------------------------------------------------------------------------------------
@exercise("lora_param_count", lesson=LESSON, context=_course_context)
def lora_param_count(data, dims, rank: int = COUNT_RANK, targets=COUNT_TARGETS):
    """Trainable parameters of ``LoraConfig(r=rank, target_modules=targets)`` on the model of ``dims``."""
    d = trusted_dims(dims)
    value = as_number(data, "a number of parameters")
    shapes = d.named_linear_shapes()
    want = d.layers * d.lora_params(rank, targets)
    if exact(value, want):
        per = ", ".join(f"{t} {rank} x ({shapes[t][1]} + {shapes[t][0]})" for t in targets)
        return True, (f"{want:,.0f} = {d.layers} blocks x ({per}): A is r x in, B is out x r. "
                      f"That is {want / d.params:.2%} of the model's {d.params:,} parameters.")
    full = d.layers * sum(shapes[t][0] * shapes[t][1] for t in targets)
    a_only = d.layers * sum(rank * shapes[t][1] for t in targets)
    b_only = d.layers * sum(rank * shapes[t][0] for t in targets)
    same_as_q = d.layers * len(targets) * rank * sum(shapes["q_proj"])
    with_bias = want + d.layers * sum(shapes[t][0] for t in targets)
    for wrong, hint in ((full, "that is the targeted layers' own weights, which LoRA freezes; the adapters are "
                               "the two thin matrices A (r x in) and B (out x r) beside each."),
                        (a_only, "that counts only A (r x in); B (out x r) trains too."),
                        (b_only, "that counts only B (out x r); A (r x in) trains too."),
                        (same_as_q, "v_proj is smaller than q_proj: the model has fewer key/value heads "
                                    f"({d.kv_heads}) than query heads ({d.heads}), so v_proj's output is "
                                    f"{shapes['v_proj'][0]}, not {shapes['q_proj'][0]}."),
                        (with_bias, "LoRA's A and B have no bias (peft's default lora_bias=False): r x (in + out) "
                                    "per layer.")):
        if wrong != want and exact(value, wrong):
            return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {1 / d.layers: "that is one block; every block gets its own adapters.",
                                    4.0: "that looks like bytes (fp32); the exercise asks for parameters.",
                                    2.0: "that is twice the answer: is the rank or a layer counted twice?",
                                    0.5: "that is half the answer: a layer or a matrix is missing.",
                                    (d.layers - 1) / d.layers: "that is one block short: count every block.",
                                    (d.layers + 1) / d.layers: "that is one block too many."}, rel=0.001)
    return False, f"you said {value:,.0f}. " + (hint or "per targeted layer: r x (in_features + out_features), "
                                                "for every block; look at the shapes in `dims.named_linear_shapes()`.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: a LoraConfig that trains exactly a given number of parameters
# ------------------------------------------------------------------------------------------------
@exercise("lora_config_exact", lesson=LESSON, context=_course_context)
def lora_config_exact(data, dims, target: int | None = None):
    """A ``LoraConfig`` on the four attention projections of every block, for a causal LM, with which peft
    trains exactly ``target`` parameters (the lesson's TARGET by default) — judged by applying it."""
    d = trusted_dims(dims)
    target = target_for(d) if target is None else target
    effects = lora_effects(data, d)
    kinds = effects.kinds()
    mlp = sorted(kinds - set(ATTENTION))
    if kinds >= set(ATTENTION) and mlp and {"gate_proj", "up_proj", "down_proj"} <= kinds:
        return False, ("that adapts every linear layer (as 'all-linear' does), the MLP too; the exercise asks for "
                       f"the attention projections only: {list(ATTENTION)}.")
    missing = [k for k in ATTENTION if k not in kinds]
    if missing or mlp:
        parts = ([f"missing {missing}"] if missing else []) + ([f"not asked for {mlp}"] if mlp else [])
        return False, (f"peft adapts {sorted(kinds) or 'no layer'}; target_modules should be the four attention "
                       f"projections: {'; '.join(parts)}.")
    partial = [k for k in ATTENTION if not covers_every_block(effects, k)]
    if partial:
        k = partial[0]
        return False, (f"peft adapts {k} in {len(effects.blocks_of(k))} of the {d.layers} blocks: adapt all four "
                       "projections in every block (leave out layers_to_transform, exclude_modules and the like).")
    if effects.extras:
        return False, (f"peft would train more than the adapters' A and B: {effects.extras_hint()}. The exercise "
                       "asks for plain LoRA.")
    if effects.wrapper != "PeftModelForCausalLM":
        return False, ("set task_type='CAUSAL_LM': peft then wraps the model as a PeftModelForCausalLM, which "
                       "passes labels through and saves the right adapter config.")
    got = effects.trainable
    ranks = sorted(effects.ranks())
    if got == target:
        shown = f"r={ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
        return True, (f"{shown} on q, k, v, o trains {got:,} parameters: {d.lora_params(1, ATTENTION):,} "
                      f"per unit of rank per block x {d.layers} blocks x the rank.")
    if got == 0:
        return False, ("peft trains nothing with this config: inference_mode=True freezes the adapters (leave it "
                       "False for training).")
    per_rank = d.layers * d.lora_params(1, ATTENTION)
    shown = f"r={ranks[0]}" if len(ranks) == 1 else f"ranks {ranks} (rank_pattern)"
    return False, (f"with {shown}, peft trains {got:,}, not {target:,}. The count is linear in r: each unit of rank "
                   f"adds {per_rank:,} parameters here, so r = {target:,} / {per_rank:,}. (lora_alpha and "
                   "lora_dropout do not change the count.)")


# ------------------------------------------------------------------------------------------------
# Exercise 3: reload a saved adapter the right way
# ------------------------------------------------------------------------------------------------
# Two small Llamas: the function must work for any model, not one size. Base weights come from seed 3; the
# adapter's A and B from a seed the probe draws afresh each time and forgets once the adapter is saved (as after
# training: B is not zero). The probe keeps the saved weights, as immutable numbers, for the judge.
RELOAD_MODELS = ({}, {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 96, "head_dim": 12,
                      "vocab_size": 384})
RELOAD_BASE_SEED = 3
RELOAD_ADAPTER = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
RELOAD_TOLERANCE = 1e-4  # merged (W + BA) or not, the same logits to float rounding (about 1e-6 here)


def _vocab_of(overrides: dict) -> int:
    from ..models import tiny_config

    return tiny_config(**overrides).vocab_size


def _reload_ids(overrides: dict):
    import torch

    return torch.randint(3, _vocab_of(overrides), (2, 12), generator=torch.Generator().manual_seed(0))


def adapter_model(overrides: dict, seed: int | None = None, weights=None):
    """The small model of ``overrides`` with an adapter whose A and B come from ``seed`` (as after training), or
    are ``weights`` ([name, values] pairs, as the probe reports them)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..models import tiny_model

    model = get_peft_model(tiny_model(seed=RELOAD_BASE_SEED, **overrides), LoraConfig(**RELOAD_ADAPTER))
    adapters = {name: p for name, p in model.named_parameters() if "lora_" in name}
    with torch.no_grad():
        if weights is None:
            generator = torch.Generator().manual_seed(seed)
            for name, p in adapters.items():
                p.normal_(std=0.5 if "lora_B" in name else 0.2, generator=generator)
        else:
            given = dict(weights) if isinstance(weights, list) and all(
                isinstance(w, list) and len(w) == 2 and isinstance(w[0], str) for w in weights) else {}
            if set(given) != set(adapters) or any(
                    not isinstance(given[n], list) or len(given[n]) != p.numel() for n, p in adapters.items()):
                raise AnswerError("the check's probe returned malformed data; run the check again.")
            for name, p in adapters.items():
                p.copy_(torch.tensor([as_number(v) for v in given[name]], dtype=p.dtype).view_as(p))
    return model.eval()


def _save_adapter(folder: str, overrides: dict) -> tuple:
    """Save a trained adapter of a fresh random seed to ``folder``; return its weights as immutable numbers. The
    seed and the model are gone when this returns: nothing is left for the learner's function to rebuild from."""
    import gc
    import secrets

    model = adapter_model(overrides, secrets.randbelow(2**30))
    model.save_pretrained(folder)
    weights = tuple((name, tuple(p.detach().reshape(-1).tolist()))
                    for name, p in model.named_parameters() if "lora_" in name)
    del model
    gc.collect()
    return weights


def _logits_summary(logits) -> dict:
    flat = logits.detach().double()
    return {"shape": list(logits.shape), "sum": flat.sum().item(), "norm": flat.norm().item(),
            "sample": [v.item() for v in flat[..., :6].reshape(-1)]}


def _is_nested(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel) and isinstance(model.base_model.model, PeftModel)


def _logits_of(model, ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _reload_one(fn, overrides: dict) -> dict:
    """Save a trained adapter, call ``fn`` on a fresh base and the folder, and report what the returned model
    computes. The report is put together after the call: nothing in it is there for the function to change."""
    import tempfile

    import torch

    from ..models import tiny_model

    with tempfile.TemporaryDirectory() as folder:
        weights = _save_adapter(folder, overrides)
        ok, got = learner_call(fn, tiny_model(seed=RELOAD_BASE_SEED, **overrides), folder)
        found = {}
        if not ok:
            found["error"] = got
        elif got is None:
            found["returned"] = "None"
        elif not isinstance(got, torch.nn.Module):
            found["returned"] = type(got).__name__
        else:
            found["returned"] = "module"
            ok, nested = learner_call(_is_nested, got)
            found["nested"] = ok and nested is True
            ok, logits = learner_call(_logits_of, got, _reload_ids(overrides))
            if not ok:
                found["error"] = f"{logits} (while computing logits with the model your function returned)"
            elif type(logits) is not torch.Tensor:
                found["error"] = f"the model's output logits are a {type(logits).__name__}, not a tensor"
            else:
                found["logits"] = _logits_summary(logits)
        got = logits = None
    return {"model": dict(overrides), "adapter": weights, **found}


def _reload_probe(fn) -> list:
    """For two model sizes: save a trained adapter (fresh random weights), drop the model, then call
    ``fn(fresh_base, folder)`` and report what the returned model computes."""
    return [_reload_one(fn, dict(overrides)) for overrides in RELOAD_MODELS]


def _close_logits(got, want: dict) -> bool:
    if not isinstance(got, dict) or got.get("shape") != want["shape"]:
        return False
    sample = got.get("sample")
    if not isinstance(sample, list) or len(sample) != len(want["sample"]):
        return False
    n = len(want["sample"])
    return (abs(as_number(got.get("norm")) - want["norm"]) <= RELOAD_TOLERANCE * (1 + want["norm"])
            and abs(as_number(got.get("sum")) - want["sum"]) <= RELOAD_TOLERANCE * (1 + want["norm"]) * n
            and all(abs(as_number(a) - b) <= RELOAD_TOLERANCE for a, b in zip(sample, want["sample"], strict=True)))


@exercise("reload_adapter", lesson=LESSON, probe=_reload_probe)
def reload_adapter(data):
    """A function ``reload(base_model, adapter_dir)`` returning the base model with the saved adapter applied:
    its logits must be those of the base with the saved adapter, which the judge rebuilds itself."""
    from ..models import tiny_model

    if not isinstance(data, list) or len(data) != len(RELOAD_MODELS):
        raise AnswerError("give a function `reload(base_model, adapter_dir)`.")
    for i, case in enumerate(data):
        if not isinstance(case, dict) or case.get("model") != RELOAD_MODELS[i]:
            raise AnswerError("the check's probe returned malformed data; run the check again.")
        where = "" if i == 0 else "on a second, smaller model: "
        if "error" in case and "returned" not in case:
            return False, f"{where}your function raised {case['error']}"
        if case.get("returned") == "None":
            return False, f"{where}your function returns None: return the model with the adapter loaded."
        if case.get("returned") != "module":
            return False, f"{where}return the model (a torch module), not a {case.get('returned')}."
        if case.get("nested"):
            return False, (f"{where}your model is a PeftModel inside a PeftModel: get_peft_model on a model that "
                           "already has the adapter re-initialises it (B = 0) and wraps it again. Load it once, "
                           "with `PeftModel.from_pretrained`.")
        if "error" in case:
            return False, f"{where}{case['error']}."
        ids = _reload_ids(RELOAD_MODELS[i])
        want = _logits_summary(_logits_of(adapter_model(RELOAD_MODELS[i], weights=case.get("adapter")), ids))
        if _close_logits(case.get("logits"), want):
            continue
        base = _logits_summary(_logits_of(tiny_model(seed=RELOAD_BASE_SEED, **RELOAD_MODELS[i]), ids))
        if _close_logits(case.get("logits"), base):
            return False, (f"{where}your model gives the *base* model's outputs: the adapter's trained weights "
                           "were not loaded. get_peft_model creates fresh adapters (B = 0); load the saved ones "
                           "with `PeftModel.from_pretrained(base_model, adapter_dir)`.")
        return False, (f"{where}the outputs match neither the trained model nor the base model: load the saved "
                       "adapter onto the base model you are given, unchanged, with `PeftModel.from_pretrained`."
                       + (" Your function must work for any model, not one size." if i else ""))
    return True, ("the reloaded model gives the trained model's outputs, on two model sizes. "
                  "PeftModel.from_pretrained loads the adapter for inference (frozen); pass is_trainable=True to "
                  "train it further.")
