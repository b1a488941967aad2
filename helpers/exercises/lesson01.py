"""Lesson 01 — loading in 8-bit and 4-bit.

Targets come from trusted configs (the course model's, or a shipped reference config), never from the learner's
variables; the one exception is ``smallest_within_5_percent``, a prediction judged against the lesson's own
measured table (``measured=("results",)``).

Where each exercise sits in the notebook, so that nothing above it answers it:
1. ``smallest_within_5_percent`` (predict): before any configuration is loaded or evaluated.
2. ``nf4_footprint`` (calculate): Llama-3-8B, untied lm_head, loaded in bf16: a model the lesson does not load.
3. ``qlora_quantization_config`` (code): judged by what the config would do to the course model; the lesson's
   own configs never set a compute dtype.
"""

from __future__ import annotations

import inspect

from ..checks import AnswerError, as_number, exercise, human_bytes, ratio_hint

LESSON = "01_loading_in_8bit_and_4bit"
WITHIN = 0.05  # smallest_within_5_percent: perplexity at most 5 % above fp32's
NF4_MODEL = "llama-3-8b"  # nf4_footprint: a shipped config (helpers/model_configs): untied lm_head, 128k vocabulary
REST_DTYPE, REST_BYTES = "bf16", 2  # nf4_footprint: loaded with dtype=torch.bfloat16, as QLoRA users load it
# nf4_footprint's judge allows the rotary embedding's fp32 buffers and less than the final norm (absolute bytes: see
# the judge); for Llama-3-8B that is 4.2e-7 of the answer. The exercise declares this bound (a test checks it).
NF4_TOLERANCE = 1e-6


def _course_config():
    from transformers import AutoConfig

    from ..models import resolve

    return AutoConfig.from_pretrained(resolve())


# ------------------------------------------------------------------------------------------------
# Exercise 1: the QLoRA quantization config, judged by what it would quantize
# ------------------------------------------------------------------------------------------------
def bnb_config(data):
    """Rebuild a ``BitsAndBytesConfig`` from its plain fields (only the constructor's own arguments)."""
    from transformers import BitsAndBytesConfig

    if not isinstance(data, dict) or data.get("__class__") != "BitsAndBytesConfig":
        got = data.get("__class__", "dict") if isinstance(data, dict) else type(data).__name__
        raise AnswerError(f"build a `BitsAndBytesConfig(...)` from transformers (you gave a {got}).")
    known = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    try:
        return BitsAndBytesConfig(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as err:
        raise AnswerError(f"transformers rejects that config: {err}") from None


def quantized_layout(config, quantization) -> dict[str, dict]:
    """What loading ``config``'s model with ``quantization`` on the CPU (``device_map="cpu"``, as the course
    does) turns into bitsandbytes layers: {module name: {"kind", "quant_type", "double_quant", "compute_dtype",
    "quant_storage"}}. transformers' own code decides (its skip list, then ``replace_with_bnb_linear``) on a
    meta-device model: no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if quantization.quantization_method() is None:  # neither 8- nor 4-bit: nothing is replaced
        return {}
    skip = HfQuantizer.get_modules_to_not_convert(model, quantization.llm_int8_skip_modules,
                                                  model._keep_in_fp32_modules)
    if quantization.llm_int8_enable_fp32_cpu_offload:
        skip.append("")  # device_map={"": "cpu"}: every module is "on the CPU", kept in fp32
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quantization)
    out = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "Linear4bit":
            out[name] = {"kind": "4-bit", "quant_type": module.weight.quant_type,
                         "double_quant": bool(module.weight.compress_statistics),
                         "compute_dtype": str(module.compute_dtype).removeprefix("torch."),
                         "quant_storage": str(module.weight.quant_storage).removeprefix("torch.")}
        elif kind == "Linear8bitLt":
            out[name] = {"kind": "8-bit"}
    return out


def _block_linears(config) -> set[str]:
    from ..estimate import LINEAR_NAMES, Dims

    d = Dims.of(config)
    return {f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}"
            for i in range(d.layers) for n in LINEAR_NAMES}


@exercise("qlora_quantization_config", lesson=LESSON, context=lambda: {"config": _course_config()}, kind="code")
def qlora_quantization_config(data, config):
    """A BitsAndBytesConfig for NF4 weights, double quantization and bf16 compute, judged by what it would do
    to the course model: every linear layer inside the blocks in 4-bit NF4 with those settings, nothing else."""
    quantization = bnb_config(data)
    layout = quantized_layout(config, quantization)
    if any(v["kind"] == "8-bit" for v in layout.values()):
        return False, "that config loads 8-bit weights (LLM.int8); the exercise asks for 4-bit: load_in_4bit=True."
    if not quantization.load_in_4bit:
        return False, "the weights are not loaded in 4 bit: set load_in_4bit=True."
    want = _block_linears(config)
    got = set(layout)
    if quantization.llm_int8_enable_fp32_cpu_offload and not got:
        return False, ("llm_int8_enable_fp32_cpu_offload=True keeps every module placed on the CPU in fp32: "
                       "loaded on the CPU as in this course, nothing would be quantized. Leave it out.")
    missing, extra = sorted(want - got), sorted(got - want)
    if missing:
        return False, (f"{len(missing)} of the {len(want)} linear layers inside the blocks would stay unquantized "
                       f"(e.g. {missing[0]}): llm_int8_skip_modules keeps every module it matches out of 4 bit. "
                       "QLoRA quantizes all of them: leave llm_int8_skip_modules out.")
    if extra:
        return False, (f"{extra[0]} would be quantized too: a llm_int8_skip_modules list replaces transformers' "
                       "default skip list, which keeps the lm_head (tied to the embedding here) out of 4 bit. Leave "
                       "it out.")
    settings = layout[min(want)]
    if any(v != settings for v in layout.values()):  # one BitsAndBytesConfig gives every layer the same settings
        return False, "the quantized layers do not share one setting: build one plain BitsAndBytesConfig(...)."
    if settings["quant_type"] != "nf4":
        return False, (f"bnb_4bit_quant_type is {settings['quant_type']!r}: NF4 ('nf4') places its 16 levels "
                       "where normally distributed weights are dense; fp4 is the other 4-bit format.")
    if not settings["double_quant"]:
        return False, "double quantization is off: bnb_4bit_use_double_quant=True also quantizes the absmax constants."
    if settings["compute_dtype"] != "bfloat16":
        return False, (f"the compute dtype is {settings['compute_dtype']}: the matmuls should run in bf16 "
                       "(bnb_4bit_compute_dtype=torch.bfloat16).")
    if settings["quant_storage"] != "uint8":
        return False, (f"bnb_4bit_quant_storage={settings['quant_storage']} packs the 4-bit codes into another "
                       "dtype (FSDP needs that, this lesson does not): leave it at its default, uint8.")
    return True, (f"all {len(want)} linear layers inside the blocks in NF4 with double-quantized constants and bf16 "
                  "matmuls, the embedding (= lm_head) and norms left as loaded: the QLoRA recipe's quantization.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: the nf4 footprint of a model the lesson does not load, from its config
# ------------------------------------------------------------------------------------------------
def footprint_terms(dims) -> dict[str, int]:
    """The parts of the plain-nf4 footprint of a model of shape ``dims``."""
    from ..estimate import LINEAR_NAMES, Dims

    if not isinstance(dims, Dims):
        raise TypeError("the context's dims must be a helpers.estimate.Dims")
    quantized = dims.layers * dims.block_linear_params
    return {"quantized_params": quantized, "other_params": dims.params - quantized,
            "linear_layers": dims.layers * len(LINEAR_NAMES)}


def nf4_target(dims) -> float:
    """Plain nf4 (no double quantization), everything bitsandbytes leaves alone in ``REST_DTYPE``."""
    t = footprint_terms(dims)
    q = t["quantized_params"]
    return q / 2 + q / 64 * 4 + t["linear_layers"] * 16 * 4 + t["other_params"] * REST_BYTES


def _nf4_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(NF4_MODEL))}


@exercise("nf4_footprint", lesson=LESSON, context=_nf4_context, kind="calculate", tolerance=NF4_TOLERANCE)
def nf4_footprint(data, dims):
    """The plain-nf4 footprint of Llama-3-8B loaded with dtype=torch.bfloat16 (no double quantization)."""
    from ..estimate import Recipe, rotary_buffer_bytes, weight_bytes

    terms = footprint_terms(dims)
    q, other, layers = terms["quantized_params"], terms["other_params"], terms["linear_layers"]
    value = as_number(data, "a number of bytes")
    codes, absmax, tables = q / 2, q / 64 * 4, layers * 16 * 4
    rest = other * REST_BYTES
    target = codes + absmax + tables + rest
    # Exact up to the rotary embedding's two small fp32 buffers (helpers.estimate.weight_bytes counts them) and a
    # quarter of the final norm (hidden x 2 bytes; the code tables are more), so that forgetting the code tables or
    # a norm fails.
    tolerance = rotary_buffer_bytes(dims) + dims.hidden // 2
    if abs(value - target) <= tolerance:
        head = "" if dims.tied else " (the embedding and the untied lm_head)"
        return True, (f"{human_bytes(value)}: half a byte per quantized weight, 4 bytes of absmax per 64 (fp32 "
                      f"whatever the dtype), a 16-entry fp32 code table per layer, and {other:,} unquantized "
                      f"parameters{head} in bf16, {human_bytes(rest)} of it.")
    embedding = dims.embedding_params
    everything = (q + other) * 0.5  # a slip: the whole model in 4 bit (with or without constants)
    slips = [  # (hint, what the slip gives, how close counts as that slip)
        ("the quantization constants are missing: one fp32 absmax per 64 weights.", codes + tables + rest, 0),
        ("add the quantization constants: one fp32 absmax per 64 weights and each layer's code table.",
         codes + rest, 0),
        (f"add the code tables: each of the {layers} quantized layers keeps 16 fp32 levels (64 bytes).",
         codes + absmax + rest, 0),
        ("the absmax constants stay fp32 (4 bytes per 64 weights) even when the model is loaded in bf16.",
         codes + q / 64 * 2 + tables + rest, 0),
        ("the model is loaded with dtype=torch.bfloat16: what bitsandbytes leaves unquantized (embedding, lm_head, "
         "norms) is 2 bytes per parameter, not 4.", codes + absmax + tables + other * 4, 0),
        ("the embedding, lm_head and norms still take memory: add them, in bf16.", codes + absmax + tables, 0),
        ("that is the double-quantized footprint; the exercise asks for plain nf4.",
         weight_bytes(dims, Recipe(weights="nf4", double_quant=True, unquantized=REST_DTYPE, training=False)), 0),
        ("only the linear layers inside the blocks are quantized; the embedding, lm_head and norms are not.",
         everything, 0.02),
        ("only the linear layers inside the blocks are quantized; the embedding, lm_head and norms are not.",
         everything * (1 + 1 / 8), 0.02),
    ]
    if not dims.tied:
        slips.append(("this model's lm_head is not tied to its embedding: it is a second vocabulary x hidden matrix, "
                      "and transformers keeps it out of 4 bit too.", target - embedding * REST_BYTES, 0))
        slips.append(("transformers keeps the lm_head out of 4 bit (its default skip list): it stays in bf16.",
                      target - embedding * REST_BYTES + embedding * (0.5 + 4 / 64), 0))
    hint = next((h for h, v, rel in slips if abs(value - v) <= max(tolerance, rel * v)), None)
    hint = hint or ratio_hint(value, target, {
        2**-20: "that looks like MiB; the exercise asks for bytes.",
        1e-6: "that looks like MB; the exercise asks for bytes.",
        2**-30: "that looks like GiB; the exercise asks for bytes.",
        1e-9: "that looks like GB; the exercise asks for bytes.",
        8.0: "that counts bits, not bytes.",
        2**20 / 1e6: "that mixes MB and MiB: give the number of bytes itself.",
        2**30 / 1e9: "that mixes GB and GiB: give the number of bytes itself."}, rel=0.002)
    return False, f"you said {human_bytes(value)}. " + (
        hint or "count the 4-bit codes (half a byte per weight), absmax (4 bytes per 64), the code tables, "
                "and the unquantized rest in bf16.")


# ------------------------------------------------------------------------------------------------
# Exercise 1: predict, before anything is loaded, the smallest configuration within 5 % of fp32
# ------------------------------------------------------------------------------------------------
def _measured_rows(results) -> dict[str, dict[str, float]]:
    if not isinstance(results, dict) or "fp32" not in results:
        raise AnswerError("the check needs the lesson's `results` (a dict of rows with 'bytes' and 'perplexity', "
                          "fp32 among them): run the loading cell above and pass results=results.")
    rows = {}
    for name, row in results.items():
        if not isinstance(row, dict):
            raise AnswerError(f"results[{name!r}] is not a row of the table: pass the lesson's `results`.")
        rows[name] = {"bytes": as_number(row.get("bytes"), f"results[{name!r}]['bytes']"),
                      "perplexity": as_number(row.get("perplexity"), f"results[{name!r}]['perplexity']")}
    return rows


@exercise("smallest_within_5_percent", lesson=LESSON, measured=("results",), kind="predict")
def smallest_within_5_percent(data, results):
    """Predicted before the lesson loads anything: the name of the smallest configuration whose measured
    perplexity is within 5 % of fp32's."""
    rows = _measured_rows(results)
    if not isinstance(data, str):
        return False, ("answer with a configuration's name from the table, e.g. 'int8' "
                       f"(you gave a {type(data).__name__}).")
    said = " ".join(data.split())
    if said not in rows:  # accept another case or spacing of a name in the table
        said = next((n for n in rows if " ".join(n.split()).lower() == said.lower()), said)
    if said not in rows:
        return False, f"{data.strip()!r} is not in the table; the names are: {', '.join(rows)}."
    base = rows["fp32"]["perplexity"]
    limit = (1 + WITHIN) * base
    ok = {k: v for k, v in rows.items() if v["perplexity"] <= limit}
    best = min(ok, key=lambda k: ok[k]["bytes"])
    chosen = rows[said]
    if said == best:
        return True, (f"{said}: {human_bytes(chosen['bytes'])} at perplexity {chosen['perplexity']:.2f} "
                      f"(fp32: {base:.2f}).")
    if chosen["perplexity"] > limit:
        return False, (f"{said} has perplexity {chosen['perplexity']:.2f}, more than 5 % above fp32's {base:.2f}: "
                       "it is out. Which formats keep more than 16 levels per weight, or keep outliers in 16 bit?")
    return False, (f"{said} qualifies ({chosen['perplexity']:.2f}), but another qualifying configuration is "
                   "smaller: which format stores fewer bytes per weight and still qualifies?")
