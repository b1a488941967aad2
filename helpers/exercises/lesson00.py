"""Lesson 00 — where the memory goes.

Every target is computed here from the lesson's fixed inputs: the course model's config
(``course_dims``), a shipped reference config (``helpers.models.reference_config``), the lesson's constants
below and ``helpers.estimate.predict``; never from the learner's variables.

Where each exercise sits in the notebook, so that nothing above it answers it:
1. ``weights_7b`` (calculate): a 7B model, which the lesson never loads.
2. ``adamw_state_bytes`` (predict): before the lesson measures any optimizer state.
3. ``largest_category`` (predict): after the 4 x 128 step is measured (where the optimizer state is the largest
   category), before the 8 x 128 step is (where the activations are).
4. ``logits_bytes`` (calculate): Llama-3-8B's logits, a model and batch the lesson does not run.
"""

from __future__ import annotations

from ..checks import as_number, as_pair, close, exercise, human_bytes, ratio_hint, trusted_dims

LESSON = "00_where_the_memory_goes"

PARAMS_7B = 7e9  # exercise 1: "a 7-billion-parameter model"
REPORT_BATCH, REPORT_SEQ = 8, 128  # exercise 3: the training step it predicts (fp32, AdamW)
LOGITS_MODEL = "llama-3-8b"  # exercise 4: a shipped config (helpers/model_configs), 128,256-token vocabulary
LOGITS_BATCH, LOGITS_SEQ = 8, 1024  # exercise 4: the logits of one batch of that model
COURSE_VOCAB = 49_152  # the course model's vocabulary: an answer that uses it took the lesson's dims by mistake

# nf4 bytes per weight that an honest answer may count (the exercise allows either of the first two):
NF4_PER_WEIGHT = {
    "codes": 0.5,  # 4 bits per weight, no constants
    "codes + absmax": 0.5 + 4 / 64,  # + one fp32 absmax per block of 64 weights (plain nf4)
    # double quantization: absmax as uint8 (1 byte per 64 weights) + one fp32 scale per 256 blocks
    "double quant": 0.5 + 1 / 64 + 4 / (64 * 256),
}
# Answers are exact products; 0.2 % leaves room for an answer rounded to three significant digits (and for
# double quantization counted with or without its second-level constants, 0.05 % apart) and for nothing
# else: GB vs GiB is 7.4 %, fp16 absmax 3 %, bits vs bytes 8x.
RELATIVE_ROUNDING = 0.002
# adamw_state_bytes: the two moments exactly, or with PyTorch's 4-byte step counter per tensor on top. The counters
# are 1.0e-6 of the moments for the course model and 9e-5 for the tests' tiny model: never more than this.
ADAMW_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 0.0  # a product of whole numbers: exact


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


@exercise("weights_7b", lesson=LESSON, context=lambda: {"params": PARAMS_7B}, kind="calculate",
          tolerance=RELATIVE_ROUNDING)
def weights_7b(data, params: float):
    """(bf16 bytes, nf4 bytes) for the weights of a model with ``params`` parameters."""
    bf16, nf4 = as_pair(data, ("bf16", "nf4"), "give two numbers, `(bf16_bytes, nf4_bytes)`, in bytes.",
                        ("bytes for bf16", "bytes for nf4"))
    bf16_target = 2 * params
    if not close(bf16, bf16_target, RELATIVE_ROUNDING):
        hint = ratio_hint(bf16, bf16_target, {
            2.0: "that is fp32 (4 bytes per parameter); bf16 stores 2.",
            8.0: "that looks like bits, not bytes: divide by 8.",
            0.5: "that is 1 byte per parameter (int8); bf16 stores 2.",
            2**30 / 1e9: ("that is a size in GiB multiplied by 10^9, or in GB by 2^30 (a GiB is 7.4 % more than a "
                          "GB): give the number of bytes itself, 2 x the parameters."),
            2**-30: "that looks like GiB; the exercise asks for bytes.",
            1e-9: "that looks like GB; the exercise asks for bytes."}, rel=0.005)
        return False, f"bf16: you said {human_bytes(bf16)}; " + (hint or "bf16 stores each parameter in 2 bytes.")
    for label, per_weight in NF4_PER_WEIGHT.items():
        if close(nf4, per_weight * params, RELATIVE_ROUNDING):
            counted = {"codes": "the 4-bit codes alone (half a byte per weight)",
                       "codes + absmax": "4-bit codes plus one fp32 absmax per 64 weights (0.5625 byte per weight)",
                       "double quant": "4-bit codes plus double-quantized constants (about 0.516 byte per weight)",
                       }[label]
            return True, (f"bf16 {human_bytes(bf16)}, nf4 {human_bytes(nf4)}: {counted}. 4-bit codes are 4x smaller "
                          "than bf16; plain nf4's fp32 absmax constants add 12.5 % to them, double "
                          "quantization about 3 %.")
    codes = 0.5 * params
    for per_weight in NF4_PER_WEIGHT.values():
        if close(nf4, per_weight * params * 2**30 / 1e9, RELATIVE_ROUNDING):
            return False, (f"nf4: you said {human_bytes(nf4)}: that is a size in GiB multiplied by 10^9, or in GB "
                           "by 2^30 (a GiB is 7.4 % more than a GB). Give the number of bytes itself.")
    hint = ratio_hint(nf4, codes, {
        2.0: "that is 1 byte per parameter (int8); 4-bit is half a byte.",
        4.0: "that is bf16; nf4 stores 4 bits per weight.",
        8.0: "that is 4 bytes per parameter (or bits counted as bytes): 4 bits = 0.5 bytes.",
        (0.5 + 2 / 64) / 0.5: ("the absmax constants are fp32 and bitsandbytes' blocks hold 64 weights: 4 bytes "
                               "per 64 weights (2 bytes per 64, or 4 per 128, is half of that)."),
        (0.5 + 4 / 32) / 0.5: "bitsandbytes' blocks hold 64 weights: one 4-byte absmax per 64 weights, not per 32.",
        2**-30: "that looks like GiB; the exercise asks for bytes.",
        1e-9: "that looks like GB; the exercise asks for bytes."}, rel=0.005)
    return False, f"nf4: you said {human_bytes(nf4)}; " + (
        hint or "4 bits per weight is 0.5 byte; the fp32 absmax constants add 4 bytes per 64 weights, if you count "
                "them.")


@exercise("adamw_state_bytes", lesson=LESSON, context=_course_context, kind="predict", tolerance=ADAMW_TOLERANCE)
def adamw_state_bytes(data, dims):
    """AdamW's state for the course model, every parameter trained in fp32 (predicted before the lesson
    measures any optimizer state)."""
    from ..estimate import Recipe, trainable_tensors

    d = trusted_dims(dims)
    value = as_number(data, "a number of bytes")
    params, tensors = d.params, trainable_tensors(d, Recipe())
    target = 8 * params
    # Exact: two fp32 moments per parameter. PyTorch's AdamW also keeps a 4-byte step counter per tensor
    # (the lesson's measurement shows it): counting it is also right. Nothing else is
    # close: a forgotten final norm is 8 x hidden bytes, more than every counter together.
    if target <= value <= target + 4 * tensors and close(value, target, ADAMW_TOLERANCE):
        extra = " (plus the step counters)" if value > target else ""
        return True, (f"{human_bytes(value)}: two fp32 moments (exp_avg, exp_avg_sq) per parameter, "
                      f"8 bytes x {params:,} parameters{extra} — twice the weights.")
    hint = ratio_hint(value, target, {
        0.5: "that is one fp32 moment per parameter; AdamW keeps two (m and v).",
        1.5: "that adds an fp32 master copy: only mixed precision keeps one beside the optimizer.",
        2.0: "that counts weights and gradients too; the question is the optimizer state only.",
        0.25: "that is 2 bytes per parameter: the moments are fp32 (4 bytes each) for fp32 training.",
        1 / 8: "that is the number of parameters: multiply by the bytes each one costs.",
        2**-20: "that looks like MiB; the exercise asks for bytes.",
        1e-6: "that looks like MB; the exercise asks for bytes.",
        2**-30: "that looks like GiB; the exercise asks for bytes.",
        1e-9: "that looks like GB; the exercise asks for bytes.",
        2**20 / 1e6: "that mixes MB and MiB: give the number of bytes itself.",
        2**30 / 1e9: "that mixes GB and GiB: give the number of bytes itself."}, rel=0.001)
    if hint is None and close(value, target, 0.01):
        hint = ("close, but not exact: 8 bytes for each of the n_params parameters — every one of them, "
                "without rounding.")
    return False, f"you said {human_bytes(value)}. " + (
        hint or "count the parameters (`n_params`) and the bytes AdamW keeps for each.")


CATEGORY_WORDS = {
    "weights": {"weights", "weight", "parameters", "params", "model", "model weights"},
    "gradients": {"gradients", "gradient", "grads", "grad"},
    "optimizer": {"optimizer", "optimizer state", "optimiser", "optimiser state", "state", "adam", "adamw",
                  "adam state", "adamw state", "optimizer states"},
    "activations": {"activations", "activation", "activations and temporaries", "temporaries", "acts"},
}
CLEAR_MARGIN = 1.25  # the largest category exceeds the next by more than the lesson's 10 % measurement tolerance


def report_prediction(dims) -> dict[str, int]:
    """Bytes by category at the peak of the step exercise 3 predicts, from the config alone (the lesson then
    measures it and asserts the measurement is within 10 % of this)."""
    from ..estimate import Recipe, predict

    return predict(trusted_dims(dims), Recipe(batch_size=REPORT_BATCH, seq_len=REPORT_SEQ)).as_dict()


@exercise("largest_category", lesson=LESSON, context=_course_context, kind="predict")
def largest_category(data, dims):
    """Predict the largest category at the peak of a training step at batch 8 x 128 (fp32, AdamW), knowing the
    lesson's measurement at 4 x 128, before the lesson measures 8 x 128."""
    if not isinstance(data, str):
        return False, f"answer with a string such as 'weights' (you gave a {type(data).__name__})."
    said = " ".join(data.strip().strip(".!'\"` ").lower().split())
    category = next((c for c, words in CATEGORY_WORDS.items() if said in words), None)
    if category is None:
        return False, "answer with one of 'weights', 'gradients', 'optimizer', 'activations'."
    sizes = report_prediction(dims)
    ranked = sorted(sizes, key=sizes.get, reverse=True)
    right = ranked[0]
    if sizes[right] < CLEAR_MARGIN * sizes[ranked[1]]:  # never for the course model (tested): a bug, said plainly
        raise RuntimeError("largest_category: the two largest categories are too close to call")
    mib = {c: v / 2**20 for c, v in sizes.items()}
    if category == right:
        return True, (f"{right}: about {mib[right]:,.0f} MiB of the {sum(mib.values()):,.0f} MiB peak "
                      f"(the next largest, {ranked[1]}, about {mib[ranked[1]]:,.0f} MiB).")
    half = predict_half(dims)
    hint = (f" At 4 x 128 the {category} held the most, but weights, gradients and optimizer state do not depend "
            "on the batch: which category doubles when the batch does?" if category == max(half, key=half.get)
            else " Which categories depend on the batch, and which do not?")
    return False, f"at the peak, {category} holds about {mib[category]:,.0f} MiB; another category holds more.{hint}"


def predict_half(dims) -> dict[str, int]:
    """The same step at half the batch: what the lesson measured before asking."""
    from ..estimate import Recipe, predict

    return predict(trusted_dims(dims), Recipe(batch_size=REPORT_BATCH // 2, seq_len=REPORT_SEQ)).as_dict()


def _logits_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(LOGITS_MODEL))}


@exercise("logits_bytes", lesson=LESSON, context=_logits_context, kind="calculate", tolerance=LOGITS_TOLERANCE)
def logits_bytes(data, dims):
    """Bytes of one fp32 logits tensor of Llama-3-8B (the shipped config) for a batch of 8 x 1,024 tokens."""
    d = trusted_dims(dims)
    value = as_number(data, "a number of bytes")
    batch, seq = LOGITS_BATCH, LOGITS_SEQ
    target = batch * seq * d.vocab * 4
    if close(value, target, LOGITS_TOLERANCE):  # a product of integers: exact
        return True, (f"{human_bytes(value)}: batch x sequence x vocabulary ({d.vocab:,}) x 4 bytes. Three tensors "
                      "that size are alive at the start of backward.")
    hints = {
        0.25: "that is the number of elements: each fp32 element is 4 bytes.",
        0.5: "that is 2 bytes per element: the loss works on fp32 logits (transformers upcasts them), 4 bytes.",
        2.0: "that is 8 bytes per element; fp32 is 4 bytes.",
        3.0: "that is the three logits-sized tensors alive at the start of backward; the question is one tensor.",
        8.0: "that counts bits, not bytes.",
        2**-20: "that looks like MiB; the exercise asks for bytes.",
        1e-6: "that looks like MB; the exercise asks for bytes.",
        2**-30: "that looks like GiB; the exercise asks for bytes.",
        1e-9: "that looks like GB; the exercise asks for bytes.",
        1 / batch: "that is one sequence; multiply by the batch size.",
        (seq - 1) / seq: "the logits cover every position, including the last (the loss shifts the labels).",
        d.hidden / d.vocab: "that uses the hidden size; logits have one score per vocabulary entry.",
    }
    if d.vocab != COURSE_VOCAB:
        hints[COURSE_VOCAB / d.vocab] = "that uses the course model's vocabulary; this model's is in its config."
    hint = ratio_hint(value, target, hints, rel=0.001)
    return False, f"you said {human_bytes(value)}. " + (hint or "logits have shape (batch, sequence, vocabulary).")
