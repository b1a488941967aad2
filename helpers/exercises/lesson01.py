"""Lesson 01 — loading in 8-bit and 4-bit."""

from __future__ import annotations

from ..checks import as_number, exercise, human_bytes, ratio_hint

LESSON = "01_loading_in_8bit_and_4bit"


@exercise("qlora_quantization_config", lesson=LESSON)
def qlora_quantization_config(answer):
    """A BitsAndBytesConfig for NF4 weights, double quantization and bf16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    if not isinstance(answer, BitsAndBytesConfig):
        return False, f"build a `BitsAndBytesConfig(...)` (you gave a {type(answer).__name__})."
    if getattr(answer, "load_in_8bit", False):
        return False, "that config loads 8-bit weights (LLM.int8); the exercise asks for 4-bit: load_in_4bit=True."
    if not answer.load_in_4bit:
        return False, "the weights are not loaded in 4 bit: set load_in_4bit=True."
    if answer.bnb_4bit_quant_type != "nf4":
        return False, (f"bnb_4bit_quant_type is {answer.bnb_4bit_quant_type!r}: NF4 ('nf4') places its 16 levels "
                       "where normally distributed weights are dense; fp4 is the other 4-bit format.")
    if not answer.bnb_4bit_use_double_quant:
        return False, "double quantization is off: bnb_4bit_use_double_quant=True also quantizes the absmax constants."
    if answer.bnb_4bit_compute_dtype != torch.bfloat16:
        return False, (f"the compute dtype is {answer.bnb_4bit_compute_dtype}: the matmuls should run in bf16 "
                       "(bnb_4bit_compute_dtype=torch.bfloat16).")
    return True, "NF4 storage, double-quantized constants, bf16 matmuls: the QLoRA recipe's quantization."


@exercise("nf4_footprint", lesson=LESSON)
def nf4_footprint(answer, quantized_params: int | None = None, other_params: int | None = None,
                  linear_layers: int | None = None, measured: int | None = None):
    """Predict the nf4 footprint (no double quantization, unquantized modules in fp32)."""
    if None in (quantized_params, other_params, linear_layers):
        return False, "run the cells above first: the check needs quantized_params, other_params and linear_layers."
    value = as_number(answer, "a number of bytes")
    codes = quantized_params / 2
    absmax = quantized_params / 64 * 4
    tables = linear_layers * 16 * 4
    target = codes + absmax + tables + other_params * 4
    if abs(value / target - 1) <= 0.02:
        tail = f" Measured: {human_bytes(measured)}." if measured else ""
        return True, (f"{human_bytes(value)}: half a byte per quantized weight, 4/64 byte of absmax, "
                      f"the rest in fp32.{tail}")
    hint = ratio_hint(value, target, {
        (codes + other_params * 4) / target: "add the quantization constants: one fp32 absmax per 64 weights.",
        (codes + absmax + tables + other_params * 2) / target: "bitsandbytes leaves the embedding and norms in the "
                                                                "dtype you loaded (fp32 here: 4 bytes), not 16 bit.",
        (quantized_params + other_params) * 0.5 / target: "only the linear layers inside the blocks are quantized; "
                                                         "the embedding (= lm_head) and the norms are not.",
        (codes + absmax + tables) / target: "the embedding (= lm_head) and the norms still take memory: "
                                            "add them in fp32.",
        2**-20: "that looks like MiB; the exercise asks for bytes.",
    }, rel=0.02)
    return False, f"you said {human_bytes(value)}. " + (
        hint or "count the 4-bit codes (half a byte per weight), absmax (4 bytes per 64), and the unquantized rest.")


@exercise("smallest_within_5_percent", lesson=LESSON)
def smallest_within_5_percent(answer, results: dict | None = None):
    """The name of the smallest configuration whose perplexity is within 5 % of fp32's."""
    if not results:
        return False, "run the loading cell above first: the check reads `results` from it."
    if not isinstance(answer, str):
        return False, ("answer with a configuration's name from the table, e.g. 'int8' "
                       f"(you gave a {type(answer).__name__}).")
    name = answer.strip()
    if name not in results:
        return False, f"{name!r} is not in the table; the names are: {', '.join(results)}."
    base = results["fp32"]["perplexity"]
    ok = {k: v for k, v in results.items() if v["perplexity"] <= 1.05 * base}
    best = min(ok, key=lambda k: results[k]["bytes"])
    chosen = results[name]
    if name == best:
        return True, (f"{name}: {human_bytes(chosen['bytes'])} at perplexity {chosen['perplexity']:.2f} "
                      f"(fp32: {base:.2f}).")
    if chosen["perplexity"] > 1.05 * base:
        return False, (f"{name} has perplexity {chosen['perplexity']:.2f}, more than 5 % above fp32's {base:.2f}: "
                       "it is out.")
    return False, (f"{name} qualifies ({chosen['perplexity']:.2f}), but another qualifying configuration is "
                   "smaller: sort the qualifying rows by bytes.")
