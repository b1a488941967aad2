"""Lesson 04 — LoRA.

Every target is computed here from the lesson's fixed inputs: the course model's config (``course_dims``), a
shipped reference config (``helpers/model_configs``) and the lesson's constants below; never from the learner's
variables. A ``LoraConfig`` is judged by what peft does with it: the judge applies it to a model of the right
shapes that it builds on the meta device (no memory, no weights) and counts what peft actually trains. The
adapter-switching function is run by a probe on adapters it saves itself (fresh random weights each time) and
judged by its logits against models the judge rebuilds, and by the parameters the returned model holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import AnswerError, as_config, as_number, exercise, learner_call, ratio_hint, trusted_dims
from ..estimate import LINEAR_NAMES

LESSON = "04_lora"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Exercise 1 (predict, before peft prints its count): the lesson's own config, r=16 on every linear layer.
COUNT_RANK, COUNT_TARGETS = 16, LINEAR_NAMES
COUNT_TOLERANCE = 0.0  # a sum of integer products: one parameter off is wrong
# Exercise 2: a model the lesson never loads (SmolLM2-360M, its shipped config) and a parameter count that only
# one rank on its four attention projections gives. The notebook states the number, not the rank.
EXACT_MODEL = "smollm2-360m"
EXACT_TARGETS = ATTENTION
EXACT_RANK = 12
EXACT_TARGET = 2_457_600  # = EXACT_RANK x 32 blocks x 6,400 (a test checks it against the shipped config)


def exact(value: float, want: int) -> bool:
    """Exercise 1's answer is a sum of integer products, which floats hold exactly: one parameter off is wrong."""
    return abs(value - want) <= max(0.5, COUNT_TOLERANCE * want)


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


def _exact_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(EXACT_MODEL))}


def target_for(dims) -> int:
    """Exercise 2's target for a model of ``dims``: ``EXACT_RANK`` on ``EXACT_TARGETS`` in every block."""
    return EXACT_RANK * dims.layers * dims.lora_params(1, EXACT_TARGETS)


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
# Exercise 1: predict the trainable parameters of the lesson's LoraConfig (before peft counts them)
# ------------------------------------------------------------------------------------------------
@exercise("lora_param_count", lesson=LESSON, context=_course_context, kind="predict", tolerance=COUNT_TOLERANCE)
def lora_param_count(data, dims, rank: int = COUNT_RANK, targets=COUNT_TARGETS):
    """Trainable parameters of ``LoraConfig(r=rank, target_modules=targets)`` on the model of ``dims``."""
    d = trusted_dims(dims)
    value = as_number(data, "a number of parameters")
    shapes = d.named_linear_shapes()
    targets = tuple(t for t in LINEAR_NAMES if t in targets)
    want = d.layers * d.lora_params(rank, targets)
    if exact(value, want):
        per = " + ".join(f"{shapes[t][1] + shapes[t][0]:,}" for t in targets)
        return True, (f"{want:,.0f} = {d.layers} blocks x {rank} x ({per}): each adapted layer gets A (r x in) and "
                      f"B (out x r). That is {want / d.params:.2%} of the model's {d.params:,} parameters.")
    full = d.layers * sum(shapes[t][0] * shapes[t][1] for t in targets)
    a_only = d.layers * sum(rank * shapes[t][1] for t in targets)
    b_only = d.layers * sum(rank * shapes[t][0] for t in targets)
    q_sized = d.layers * rank * sum(sum(shapes["q_proj"]) if t in ("k_proj", "v_proj") else sum(shapes[t])
                                    for t in targets)
    with_bias = want + d.layers * sum(shapes[t][0] for t in targets)
    attention_only = d.layers * d.lora_params(rank, [t for t in targets if t in ATTENTION])
    mlp_only = d.layers * d.lora_params(rank, [t for t in targets if t in MLP])
    with_head = want + rank * (d.hidden + d.vocab)
    for wrong, hint in ((full, "that is the adapted layers' own weights, which LoRA freezes; the adapters are "
                               "the two thin matrices A (r x in) and B (out x r) beside each."),
                        (a_only, "that counts only A (r x in); B (out x r) trains too."),
                        (b_only, "that counts only B (out x r); A (r x in) trains too."),
                        (q_sized, "k_proj and v_proj are smaller than q_proj: the model has fewer key/value heads "
                                  f"({d.kv_heads}) than query heads ({d.heads}), so their output is "
                                  f"{d.kv_dim}, not {d.q_dim}."),
                        (with_bias, "LoRA's A and B have no bias (peft's default lora_bias=False): r x (in + out) "
                                    "per layer."),
                        (attention_only, "that counts the attention projections only: every linear layer of the "
                                         "blocks includes the MLP's gate_proj, up_proj and down_proj."),
                        (mlp_only, "that counts the MLP only: the four attention projections are linear layers too."),
                        (with_head, "'all-linear' leaves the output layer (lm_head) out: only the blocks' linear "
                                    "layers get adapters.")):
        if wrong != want and exact(value, wrong):
            return False, f"you said {value:,.0f}: {hint}"
    hint = ratio_hint(value, want, {1 / d.layers: "that is one block; every block gets its own adapters.",
                                    4.0: "that looks like bytes (fp32); the exercise asks for parameters.",
                                    2.0: "that is twice the answer: is the rank or a layer counted twice?",
                                    0.5: "that is half the answer: a layer or a matrix is missing.",
                                    (d.layers - 1) / d.layers: "that is one block short: count every block.",
                                    (d.layers + 1) / d.layers: "that is one block too many."}, rel=0.001)
    return False, f"you said {value:,.0f}. " + (hint or "per adapted layer: r x (in_features + out_features), "
                                                "for every block; look at the shapes in `dims.named_linear_shapes()`.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: a LoraConfig that trains exactly a given number of parameters, on a model the lesson never loads
# ------------------------------------------------------------------------------------------------
@exercise("lora_config_exact", lesson=LESSON, context=_exact_context, kind="calculate")
def lora_config_exact(data, dims, target: int | None = None):
    """A ``LoraConfig`` on the four attention projections of every block, for a causal LM, with which peft
    trains exactly ``target`` parameters (``target_for(dims)`` by default) — judged by applying it."""
    d = trusted_dims(dims)
    target = target_for(d) if target is None else target
    effects = lora_effects(data, d)
    kinds = effects.kinds()
    extra = sorted(kinds - set(EXACT_TARGETS))
    if kinds >= set(EXACT_TARGETS) and set(MLP) <= kinds:
        return False, ("that adapts every linear layer (as 'all-linear' does), the MLP too; the exercise asks for "
                       f"the attention projections only: {list(EXACT_TARGETS)}.")
    missing = [k for k in EXACT_TARGETS if k not in kinds]
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"not asked for {extra}"] if extra else [])
        return False, (f"peft adapts {sorted(kinds) or 'no layer'}; target_modules should be the four attention "
                       f"projections: {'; '.join(parts)}.")
    partial = [k for k in EXACT_TARGETS if not covers_every_block(effects, k)]
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
    per_block = d.lora_params(1, EXACT_TARGETS)
    if got == target:
        shown = f"r={ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
        return True, (f"{shown} on q, k, v, o trains {got:,} parameters: {per_block:,} per unit of rank per block "
                      f"(k and v are {d.kv_dim} wide, q and o {d.q_dim}) x {d.layers} blocks x the rank.")
    if got == 0:
        return False, ("peft trains nothing with this config: inference_mode=True freezes the adapters (leave it "
                       "False for training).")
    per_rank = d.layers * per_block
    shown = f"r={ranks[0]}" if len(ranks) == 1 else f"ranks {ranks} (rank_pattern)"
    return False, (f"with {shown}, peft trains {got:,}, not {target:,}. The count is linear in r: each unit of rank "
                   f"adds {per_rank:,} parameters on this model, so r = {target:,} / {per_rank:,}. (lora_alpha and "
                   "lora_dropout do not change the count.)")


# ------------------------------------------------------------------------------------------------
# Exercise 3: one base model, two saved adapters, switch between them
# ------------------------------------------------------------------------------------------------
# Two small Llamas: the function must work for any model and any adapter names, not one size or one pair. Base
# weights come from seed 3; each adapter's A and B from a seed the probe draws afresh each time and forgets once
# the adapter is saved (as after training: B is not zero). The two adapters adapt different layers with different
# ranks, as two fine-tunes made by different people would. The probe keeps the saved weights, as immutable
# numbers, for the judge.
SWITCH_MODELS = ({}, {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 96, "head_dim": 12,
                      "vocab_size": 384})
SWITCH_NAMES = (("chat", "sql"), ("summarise", "translate"))  # one pair per model: names are the caller's
SWITCH_ADAPTERS = ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"},
                   {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                    "task_type": "CAUSAL_LM"})
SWITCH_ORDER = (1, 0, 1)  # the second adapter, the first, the second again: switching must work both ways
SWITCH_BASE_SEED = 3
SWITCH_TOLERANCE = 1e-4  # the same logits to float rounding (about 1e-6 here)
SWITCH_SLACK = 1.02  # the returned model may hold 2 % more parameters than one base and the two adapters


def _vocab_of(overrides: dict) -> int:
    from ..models import tiny_config

    return tiny_config(**overrides).vocab_size


def _switch_ids(overrides: dict):
    import torch

    return torch.randint(3, _vocab_of(overrides), (2, 12), generator=torch.Generator().manual_seed(0))


def _base(overrides: dict):
    from ..models import tiny_model

    return tiny_model(seed=SWITCH_BASE_SEED, **overrides)


def adapter_model(overrides: dict, config: dict, seed: int | None = None, weights=None):
    """The small model of ``overrides`` with one adapter of ``config`` whose A and B come from ``seed`` (as after
    training), or are ``weights`` ([name, values] pairs, as the probe reports them)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(overrides), LoraConfig(**config))
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


def _save_adapter(folder: str, overrides: dict, config: dict) -> tuple:
    """Save a trained adapter of a fresh random seed to ``folder``; return its weights as immutable numbers. The
    seed and the model are gone when this returns: nothing is left for the learner's function to rebuild from."""
    import gc
    import secrets

    model = adapter_model(overrides, config, secrets.randbelow(2**30))
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


def _held_parameters(model) -> int:
    """Elements of the distinct parameters and buffers the module holds (read through torch.nn.Module's own
    methods, so a module cannot answer for itself)."""
    import torch

    seen, total = set(), 0
    for t in (*torch.nn.Module.parameters(model), *torch.nn.Module.buffers(model)):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def _switch_one(fn, index: int) -> dict:
    """Save two trained adapters, call ``fn`` on a fresh base and {name: folder}, then switch the returned model
    between the adapters (``set_adapter``) and report what it computes each time. The report is put together after
    the call: nothing in it is there for the function to change."""
    import os
    import tempfile

    import torch

    overrides, names = dict(SWITCH_MODELS[index]), SWITCH_NAMES[index]
    with tempfile.TemporaryDirectory() as folder:
        dirs = {name: os.path.join(folder, name) for name in names}
        weights = {name: _save_adapter(dirs[name], overrides, config)
                   for name, config in zip(names, SWITCH_ADAPTERS, strict=True)}
        ok, got = learner_call(fn, _base(overrides), dict(dirs))
        found: dict = {"switches": []}
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
            ok, held = learner_call(_held_parameters, got)
            found["held"] = held if ok and type(held) is int else -1
            for i in SWITCH_ORDER:
                name = names[i]
                ok, err = learner_call(lambda n=name: got.set_adapter(n))
                if not ok:
                    found["switches"].append({"name": name, "error": f"{err} (while calling set_adapter({name!r}))"})
                    break
                ok, logits = learner_call(_logits_of, got, _switch_ids(overrides))
                if not ok:
                    found["switches"].append({"name": name, "error": f"{logits} (while computing logits)"})
                    break
                if type(logits) is not torch.Tensor:
                    found["switches"].append({"name": name, "error": f"the model's output logits are a "
                                                                    f"{type(logits).__name__}, not a tensor"})
                    break
                found["switches"].append({"name": name, "logits": _logits_summary(logits)})
        got = logits = None
    return {"model": overrides, "names": list(names), "adapters": {n: weights[n] for n in names}, **found}


def _switch_probe(fn) -> list:
    """For two model sizes: save two trained adapters (fresh random weights), drop the models, then call
    ``fn(fresh_base, {name: folder})`` and switch the returned model between the adapters."""
    return [_switch_one(fn, i) for i in range(len(SWITCH_MODELS))]


def _close_logits(got, want: dict) -> bool:
    if not isinstance(got, dict) or got.get("shape") != want["shape"]:
        return False
    sample = got.get("sample")
    if not isinstance(sample, list) or len(sample) != len(want["sample"]):
        return False
    n = len(want["sample"])
    return (abs(as_number(got.get("norm")) - want["norm"]) <= SWITCH_TOLERANCE * (1 + want["norm"])
            and abs(as_number(got.get("sum")) - want["sum"]) <= SWITCH_TOLERANCE * (1 + want["norm"]) * n
            and all(abs(as_number(a) - b) <= SWITCH_TOLERANCE for a, b in zip(sample, want["sample"], strict=True)))


def _malformed() -> AnswerError:
    return AnswerError("the check's probe returned malformed data; run the check again.")


@exercise("switch_adapters", lesson=LESSON, probe=_switch_probe, kind="code")
def switch_adapters(data):
    """A function ``load_adapters(base_model, adapter_dirs)`` returning one model that holds every adapter of
    ``adapter_dirs`` ({name: folder}) on the one base, each selectable by ``model.set_adapter(name)``: after each
    switch its logits must be those of the base with that saved adapter (rebuilt by the judge), and it may hold no
    second copy of the base."""
    if not isinstance(data, list) or len(data) != len(SWITCH_MODELS):
        raise AnswerError("give a function `load_adapters(base_model, adapter_dirs)`.")
    for i, case in enumerate(data):
        if not isinstance(case, dict) or case.get("model") != SWITCH_MODELS[i] or \
                case.get("names") != list(SWITCH_NAMES[i]) or not isinstance(case.get("adapters"), dict):
            raise _malformed()
        where = "" if i == 0 else "on a second, smaller model with other adapter names: "
        if "error" in case and "returned" not in case:
            return False, f"{where}your function raised {case['error']}"
        if case.get("returned") == "None":
            return False, f"{where}your function returns None: return the model with both adapters loaded."
        if case.get("returned") != "module":
            return False, f"{where}return the model (a torch module), not a {case.get('returned')}."
        if case.get("nested"):
            return False, (f"{where}your model is a PeftModel inside a PeftModel: get_peft_model or a second "
                           "PeftModel.from_pretrained on a model that already has an adapter wraps it again. Load "
                           "the first adapter with `PeftModel.from_pretrained(base, folder, adapter_name=name)` and "
                           "each further one into that model with `model.load_adapter(folder, adapter_name=name)`.")
        overrides = SWITCH_MODELS[i]
        ids = _switch_ids(overrides)
        wants = {name: _logits_summary(_logits_of(adapter_model(overrides, config,
                                                                weights=case["adapters"].get(name)), ids))
                 for name, config in zip(SWITCH_NAMES[i], SWITCH_ADAPTERS, strict=True)}
        base_model = _base(overrides)
        base_logits = _logits_summary(_logits_of(base_model, ids))
        switches = case.get("switches")
        if not isinstance(switches, list) or not switches:
            raise _malformed()
        for switch in switches:
            if not isinstance(switch, dict) or switch.get("name") not in wants:
                raise _malformed()
            name = switch["name"]
            if "error" in switch:
                err = str(switch["error"])
                hint = ""
                if "has no attribute 'set_adapter'" in err or "No adapter loaded" in err:
                    hint = (" A merged model (merge_and_unload) is a plain transformers model again: it can no "
                            "longer switch. Keep the adapters separate, in one PeftModel.")
                elif "set_adapter" in err:
                    hint = (" Load every adapter under its own name: `adapter_name=name` in "
                            "`PeftModel.from_pretrained` for the first and in `model.load_adapter` for the others.")
                return False, f"{where}{err}.{hint}"
            got = switch.get("logits")
            if _close_logits(got, wants[name]):
                continue
            other = next(n for n in wants if n != name)
            if _close_logits(got, wants[other]):
                return False, (f"{where}after set_adapter({name!r}) the model still computes with {other!r}: each "
                               "name must select its own folder's adapter (load each under the name it has in "
                               "adapter_dirs).")
            if _close_logits(got, base_logits):
                return False, (f"{where}after set_adapter({name!r}) your model gives the *base* model's outputs: "
                               "the saved weights were not loaded (get_peft_model creates fresh adapters, B = 0). "
                               "Load them from the folders.")
            return False, (f"{where}after set_adapter({name!r}) the outputs match neither the base with that "
                           "adapter nor the base alone: load each saved adapter, unchanged, onto the base model you "
                           "are given." + (" Your function must work for any model, not one size." if i else ""))
        base_n = sum(p.numel() for p in base_model.parameters()) + sum(b.numel() for b in base_model.buffers())
        adapters_n = sum(len(values) for w in case["adapters"].values() for _, values in w)
        held = case.get("held")
        if type(held) is not int or held < 0:
            return False, f"{where}the parameters of the model your function returned could not be counted."
        if held > SWITCH_SLACK * (base_n + adapters_n):
            return False, (f"{where}your model holds {held:,} parameters and buffers, {held / base_n:.1f}x the base's "
                           f"{base_n:,}: it keeps more than one copy of the base. The point of adapters is one base "
                           "in memory and a small adapter per task: load both onto the model you are given.")
    return True, ("each name selects its own adapter (switched both ways), on two model sizes, with one copy of the "
                  "base in memory. `set_adapter` switches in place; serving a second fine-tune costs its adapter, "
                  "not another base.")
