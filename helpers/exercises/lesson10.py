"""Lesson 10 — The logits and the loss.

Exercise 1 is a prediction asked before the lesson measures the loss at that vocabulary and batch (its target is
``helpers.estimate.loss_bytes``); exercise 2 is code run on tiny models the check builds, judged by the loss it
returns and by how many positions went through the output layer; exercise 3 is a diagnosis of a run the lesson
does not make (a 152 k-token vocabulary on a 24 GB card), judged with the predictor.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..checks import AnswerError, as_number, choice, exercise, human_bytes, learner_call, plain, ratio_hint
from ..constants import GiB
from ..estimate import Dims, Recipe, loss_bytes, predict

LESSON = "10_logits_and_the_loss"

# Exercise 1: the loss of the course model's hidden size over Mistral 7B's 32,000-token vocabulary, 2 x 128 tokens
# (the lesson's sweep measures it next).
PREDICT_VOCAB, PREDICT_ROWS, PREDICT_SEQ = 32_000, 2, 128
PREDICT_TOLERANCE = 0.01  # the formula is exact in bytes; 1 % allows rounding a MiB answer


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


@exercise("loss_bytes_prediction", lesson=LESSON, context=_course_context, kind="predict",
          tolerance=PREDICT_TOLERANCE)
def loss_bytes_prediction(answer, dims):
    """Bytes the plain loss holds at the start of backward for ``PREDICT_VOCAB`` x ``PREDICT_ROWS`` x
    ``PREDICT_SEQ``: 3 x tokens x vocab x 4 (fp32 log-softmax, its gradient, the logits' gradient)."""
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    config = {**d.__dict__, "vocab": PREDICT_VOCAB}
    want = loss_bytes(Dims(**config), PREDICT_ROWS, PREDICT_SEQ)
    tokens = PREDICT_ROWS * PREDICT_SEQ
    if abs(value - want) <= PREDICT_TOLERANCE * want:
        return True, (f"{want:,} bytes ({human_bytes(want)}): 3 x {tokens:,} tokens x {PREDICT_VOCAB:,} x 4 bytes. The "
                      "hidden size does not appear: the logits are as wide as the vocabulary, whatever the model.")
    hint = ratio_hint(value, want, {
        1 / 3: "that is one logits-sized tensor: at the start of backward three are alive (the log-softmax the loss "
               "saved, its gradient, and the gradient of the logits).",
        2 / 3: "two of the three: the log-softmax output is saved for backward, and both its gradient and the "
               "logits' gradient exist at the same moment.",
        4 / 3: "the logits themselves are freed once the loss is computed (nothing keeps the model's output): three, "
               "not four.",
        1 / 4: "the loss computes in fp32: 4 bytes a value.",
        1 / 2: "the loss upcasts the logits to fp32 (4 bytes a value), whatever the model's dtype.",
        d.hidden / PREDICT_VOCAB: "that is the size of the hidden states: the logits have one value per token and "
                                  "vocabulary entry.",
    })
    if hint is None and abs(value - want / 2**20) <= PREDICT_TOLERANCE * want / 2**20:
        hint = "that is the right number of MiB: the answer is in bytes."
    hint = hint or "count the tensors of the logits' size alive at the start of backward, in fp32."
    return False, f"{value:,.0f} bytes is not it: {hint}"


# ------------------------------------------------------------------------------------------------
# Exercise 2: the loss over the answer only, with logits for the answer only
# ------------------------------------------------------------------------------------------------
# (rows, positions, answer_len, vocab): the models and batches the check builds.
ANSWER_CASES = ((2, 24, 4, 300), (3, 17, 1, 512), (1, 30, 9, 257))


def _case_model(vocab: int, seed: int):
    from ..models import tiny_model

    return tiny_model(seed=seed, vocab_size=vocab)


def _case_batch(rows: int, positions: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, vocab, (rows, positions), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def reference_answer_losses(model, batch: dict, answer_len: int) -> tuple[float, float]:
    """The mean next-token loss over the last ``answer_len`` tokens of every row, from all the logits (slow and
    large, but plainly right): what the learner's cheaper function must return; and the same tokens scored by the
    logits at their own positions, one too late (the off-by-one the check names)."""
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    answer = batch["input_ids"][:, -answer_len:].flatten()

    def loss(scores):
        return float(F.cross_entropy(scores.flatten(0, 1), answer))
    return loss(logits[:, -answer_len - 1:-1]), loss(logits[:, -answer_len:])  # position t predicts token t + 1


def _positions(seen: list, _module, args) -> None:
    seen.append(int(args[0].shape[-2]) if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 else 0)


def probe_answer_loss(fn) -> list[dict]:
    """Run ``fn(model, batch, answer_len)`` on each case's model and batch (built here); record what it returned
    (as plain data), the largest number of positions any call of the output layer saw, and the reference losses."""
    out = []
    for seed, (rows, positions, answer_len, vocab) in enumerate(ANSWER_CASES):
        model, batch = _case_model(vocab, seed), _case_batch(rows, positions, vocab, seed)
        seen: list[int] = []
        handle = model.get_output_embeddings().register_forward_pre_hook(functools.partial(_positions, seen))
        ok, result = learner_call(fn, model, {k: v.clone() for k, v in batch.items()}, answer_len)
        handle.remove()
        try:
            value = plain(result) if ok else None
        except AnswerError as err:
            ok, result, value = False, f"its result cannot be read: {err}", None
        want, misaligned = reference_answer_losses(model, batch, answer_len)
        out.append({"error": None if ok else str(result), "value": value, "positions": max(seen, default=0),
                    "calls": len(seen), "want": want, "misaligned": misaligned})
    return out


@exercise("answer_only_loss", lesson=LESSON, probe=probe_answer_loss, kind="code", points=2)
def answer_only_loss(data):
    """``answer_loss(model, batch, answer_len)``: the mean loss over the last ``answer_len`` tokens of each row,
    equal to the full logits' within fp32 rounding, with at most ``answer_len + 1`` positions through the output
    layer."""
    if not isinstance(data, list) or len(data) != len(ANSWER_CASES) or not all(isinstance(c, dict) for c in data):
        raise AnswerError("the check could not read what your function did: give the function itself.")
    for (rows, positions, answer_len, vocab), case in zip(ANSWER_CASES, data, strict=True):
        label = f"{rows} row(s) of {positions} tokens with a {answer_len}-token answer (vocabulary {vocab})"
        if case.get("error"):
            return False, f"on {label} it raised {case['error']}"
        value, want = case.get("value"), case["want"]
        if type(value) not in (int, float):
            return False, f"on {label} it returned {type(value).__name__}: return the loss, one number (`.item()`)."
        if case["calls"] == 0:
            return False, (f"on {label} it never ran the model's output layer: the loss must come from the model's "
                           "own logits for the answer.")
        if case["positions"] > answer_len + 1:
            return False, (f"on {label} the output layer computed logits for {case['positions']} positions of each "
                           f"row: the answer needs {answer_len + 1} at most. Ask the model for the last ones only "
                           "(`logits_to_keep=`).")
        if abs(value - want) <= 1e-4 * max(1.0, abs(want)):
            continue
        if abs(value - case["misaligned"]) <= 1e-4 * max(1.0, abs(value)):
            return False, (f"on {label} it returns {value:.4f}, not {want:.4f}: the logits at position t predict "
                           "token t + 1, so the answer's tokens are scored by the logits one position earlier "
                           "(keep one more position and drop the last).")
        if abs(value - want * answer_len * rows) <= 1e-3 * abs(value):
            return False, (f"on {label} it returns the summed loss {value:.4f}: return the mean over the answer's "
                           "tokens.")
        return False, f"on {label} it returns {value:.4f}, not {want:.4f}."
    return True, ("the answer's loss equals the full logits' in every case, with logits for at most answer + 1 "
                  "positions: for a 128-token prompt and a 16-token answer, about 8 x fewer logits.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: a long-context QLoRA fine-tune of Qwen2.5-7B on an L4
# ------------------------------------------------------------------------------------------------
SCENARIO_MODEL, SCENARIO_GPU = "qwen2.5-7b", "L4"
SCENARIO = Recipe(batch_size=1, seq_len=8192, weights="nf4", double_quant=True, lora_rank=16,
                  lora_targets="all-linear", gradient_checkpointing=True)
OPTIONS = {"a": {"loss_chunk": 1024}, "b": {"optimizer": "adamw8bit"}, "c": {"unquantized": "bf16"},
           "d": {"lora_rank": 4}}
OPTION_TEXT = {"a": "compute the loss in chunks of 1,024 positions (helpers.loss)",
               "b": "8-bit AdamW for the adapters",
               "c": "keep the embedding and output layer in bf16 instead of fp32",
               "d": "LoRA rank 4 instead of 16"}


def _scenario_context() -> dict:
    from ..models import reference_config
    from ..planner import GPUS

    return {"dims": Dims.of(reference_config(SCENARIO_MODEL)), "budget": GPUS[SCENARIO_GPU].budget}


def scenario_reports(dims) -> dict:
    """The predicted breakdown of the scenario ("before") and of each option."""
    d = Dims.of(dims)
    return {"before": predict(d, SCENARIO), **{k: predict(d, SCENARIO.but(**v)) for k, v in OPTIONS.items()}}


def scenario_peaks(dims) -> dict[str, float]:
    """Predicted peak (bytes) of the scenario and of each option."""
    return {k: report.peak for k, report in scenario_reports(dims).items()}


@exercise("fix_the_long_context_run", lesson=LESSON, context=_scenario_context, kind="diagnose")
def fix_the_long_context_run(answer, dims, budget: int):
    """One letter of ``OPTIONS``: the one change whose predicted peak fits the card's usable memory."""
    d = Dims.of(dims)
    letter = choice(answer, OPTIONS)
    reports = scenario_reports(d)
    before, after = reports["before"], reports[letter]
    loss = loss_bytes(d, SCENARIO.micro_batch_size, SCENARIO.seq_len)
    where = (f"({letter}) predicted peak {after.peak / GiB:,.2f} GiB against {budget / GiB:,.2f} GiB usable "
             f"(before: {before.peak / GiB:,.2f})")
    if after.peak <= budget:
        others = ", ".join(f"({k}) {reports[k].peak / GiB:,.1f}" for k in OPTIONS if k != letter)
        return True, (f"{where}. The loss held {loss / GiB:,.1f} GiB at the start of backward (3 x 8,192 tokens x "
                      f"{d.vocab:,} x 4 bytes), beside {before.weights / GiB:,.1f} GiB of weights. In chunks, one "
                      f"chunk's logits are alive at a time. The other options peak at (GiB) {others}.")
    if letter == "b":
        why = "the adapters' moments are a few hundred MiB; they were never the problem"
    elif letter == "c":
        why = "it saves the unquantized embedding's and output layer's half, but the loss is still whole"
    else:
        why = "fewer adapter parameters shrink gradients and moments a little; the activations stay"
    return False, (f"{where}, still {(after.peak - budget) / GiB:,.2f} GiB over: {why}. Which category is the "
                   "largest at the start of backward, and which term of it grows with the vocabulary?")
