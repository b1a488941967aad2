"""Lesson 00 — where the memory goes."""

from __future__ import annotations

from ..checks import as_number, close, exercise, human_bytes, ratio_hint

LESSON = "00_where_the_memory_goes"


@exercise("weights_7b", lesson=LESSON)
def weights_7b(answer, params: float = 7e9):
    """(bf16 bytes, nf4 bytes) for a 7-billion-parameter model's weights."""
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return False, "give two numbers, `(bf16_bytes, nf4_bytes)`, in bytes."
    bf16, nf4 = as_number(answer[0], "bytes for bf16"), as_number(answer[1], "bytes for nf4")
    bf16_target = 2 * params
    hints = {2.0: "that is fp32 (4 bytes per parameter); bf16 stores 2.",
             8.0: "that looks like bits, not bytes: divide by 8.",
             0.5: "that is 1 byte per parameter (int8); bf16 stores 2.",
             2**-30: "that looks like GiB; the exercise asks for bytes.",
             1e-9: "that looks like GB; the exercise asks for bytes."}
    if not close(bf16, bf16_target, 0.02):
        hint = ratio_hint(bf16, bf16_target, hints) or "bf16 stores each parameter in 2 bytes."
        return False, f"bf16: you said {human_bytes(bf16)}; {hint}"
    # nf4: half a byte per weight, plus one fp32 absmax per 64 weights (0.0625 B) unless you ignore it
    low, high = 0.5 * params * 0.98, (0.5 + 4 / 64) * params * 1.02
    if not low <= nf4 <= high:
        hint = ratio_hint(nf4, 0.5 * params, {
            2.0: "that is 1 byte per parameter (int8); 4-bit is half a byte.",
            4.0: "that is bf16; nf4 stores 4 bits per weight.",
            8.0: "that is 4 bytes per parameter (or bits counted as bytes): 4 bits = 0.5 bytes.",
            2**-30: "that looks like GiB; the exercise asks for bytes."}, rel=0.15)
        return False, f"nf4: you said {human_bytes(nf4)}; " + (
            hint or "4 bits per weight is 0.5 byte; block constants add about 4/64 byte more.")
    return True, (f"bf16 {human_bytes(bf16)}, nf4 {human_bytes(nf4)}: 4x smaller than bf16 before "
                  "the quantization constants, which add about 12 % (one fp32 absmax per 64 weights).")


@exercise("adamw_state_bytes", lesson=LESSON)
def adamw_state_bytes(answer, n_params: int | None = None):
    """AdamW's state for the lesson's model (``n_params`` parameters), trained in full, in fp32."""
    if n_params is None:
        return False, "run the cells above first: the check needs `n_params` (pass n_params=n_params)."
    value = as_number(answer, "a number of bytes")
    params = int(n_params)
    target = 8 * params
    if close(value, target, 0.01):
        return True, (f"{human_bytes(value)}: two fp32 moments (exp_avg, exp_avg_sq) per parameter, "
                      f"8 bytes x {params:,} parameters — twice the weights.")
    hint = ratio_hint(value, target, {
        0.5: "that is one fp32 moment per parameter; AdamW keeps two (m and v).",
        1.5: "that adds an fp32 master copy: only mixed precision keeps one beside the optimizer.",
        2.0: "that counts weights and gradients too; the question is the optimizer state only.",
        0.25: "that is 2 bytes per parameter: the moments are fp32 (4 bytes each) for fp32 training.",
        1 / 8: "that is the number of parameters: multiply by the bytes each one costs.",
        2**-20: "that looks like MiB; the exercise asks for bytes.",
        2**-30: "that looks like GiB; the exercise asks for bytes.",
        1e-9: "that looks like GB; the exercise asks for bytes."})
    return False, f"you said {human_bytes(value)}. " + (
        hint or "count the parameters (sum of p.numel()) and the bytes AdamW keeps for each.")


CATEGORY_WORDS = {
    "weights": {"weights", "weight", "parameters", "params", "model"},
    "gradients": {"gradients", "gradient", "grads", "grad"},
    "optimizer": {"optimizer", "optimizer state", "optimiser", "optimiser state", "state", "adam"},
    "activations": {"activations", "activation", "activations and temporaries", "temporaries", "acts"},
}


@exercise("largest_category", lesson=LESSON)
def largest_category(answer, report=None):
    """Name the largest category of a measured report."""
    if report is None:
        return False, "run the measurement cell above first: the check reads `report` from it."
    if not isinstance(answer, str):
        return False, f"answer with a string such as 'weights' (you gave a {type(answer).__name__})."
    said = answer.strip().strip(".!'\"` ").lower()
    category = next((c for c, words in CATEGORY_WORDS.items() if said in words), None)
    if category is None:
        return False, "answer with one of 'weights', 'gradients', 'optimizer', 'activations'."
    right = report.largest()
    sizes = {c: getattr(report, c) / 2**20 for c in CATEGORY_WORDS}
    if category == right:
        return True, f"{right}: {sizes[right]:,.0f} MiB of the {report.peak / 2**20:,.0f} MiB peak."
    return False, (f"at the peak, {category} held {sizes[category]:,.0f} MiB; another category held "
                   f"more. Print `report` and compare the four numbers.")


@exercise("logits_bytes", lesson=LESSON)
def logits_bytes(answer, vocab: int | None = None, hidden: int | None = None,
                 batch_size: int = 8, seq_len: int = 256):
    """Bytes of the fp32 logits tensor for one batch of the lesson's model (vocabulary ``vocab``)."""
    if vocab is None:
        return False, "run the cells above first: the check needs the vocabulary size (vocab=dims.vocab)."
    value = as_number(answer, "a number of bytes")
    target = batch_size * seq_len * vocab * 4
    if value == target:
        return True, f"{human_bytes(value)}: batch x sequence x vocabulary x 4 bytes."
    hints = {
        0.25: (f"that is a quarter of it: the number of elements (each fp32 element is 4 bytes), or the "
               f"4 x 128 batch from above instead of {batch_size} x {seq_len}."),
        0.5: "that is 2 bytes per element; the loss works on fp32 logits (4 bytes).",
        2**-20: "that looks like MiB; the exercise asks for bytes.",
        1 / batch_size: "that is one sequence; multiply by the batch size.",
        (seq_len - 1) / seq_len: "the logits cover every position, including the last (the loss shifts the labels)."}
    if hidden:
        hints[hidden / vocab] = "that uses the hidden size; logits have one score per vocabulary entry."
    hint = ratio_hint(value, target, hints, rel=0.001)
    return False, f"you said {human_bytes(value)}. " + (hint or "logits have shape (batch, sequence, vocabulary).")
