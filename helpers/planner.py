"""Plan a run before starting it: the largest batch that fits a memory budget, from the predictor.

    budget = int(2.25 * 2**30)                                    # 2.25 GiB
    largest_batch(model.config, Recipe(seq_len=128), budget)      # course model, fp32 AdamW: 3
    largest_batch(model.config, Recipe(seq_len=128, gradient_checkpointing=True), budget)   # 9

Nothing runs on a device: every candidate batch is a call to ``helpers.estimate.predict``, so the
answer is as good as the prediction for that recipe. Confirm it by measuring the batch it returns.
"""

from __future__ import annotations

from .estimate import Recipe, predict

GiB = 2**30


def _gib(n: float) -> str:
    return f"{n / GiB:,.3f} GiB"


def fits(config, recipe: Recipe, budget_bytes: float) -> bool:
    """Whether the predicted peak of ``recipe`` stays within ``budget_bytes``."""
    return predict(config, recipe).peak <= budget_bytes


def largest_batch(config, recipe: Recipe, budget_bytes: float, max_batch: int = 256) -> int:
    """The largest ``batch_size`` whose predicted peak fits ``budget_bytes``, everything else as in ``recipe``.

    ``config`` is a transformers config, a dict or ``helpers.estimate.Dims``; ``recipe`` gives the sequence
    length, optimizer, weight format, trainable set and checkpointing (its own ``batch_size`` is ignored).
    Batches are tried from 1 upwards and the search stops at the first one that does not fit, so batch
    ``b + 1`` is predicted not to fit whenever the answer ``b`` is below ``max_batch``. The answer is
    capped at ``max_batch``: if that many fit, ``max_batch`` is returned.

    Raises ``ValueError`` with the predicted peak when even batch 1 does not fit, and for a budget that
    is not positive or a ``max_batch`` below 1.
    """
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    if int(max_batch) != max_batch or max_batch < 1:
        raise ValueError(f"max_batch must be a whole number of at least 1, got {max_batch!r}")
    first = predict(config, recipe.but(batch_size=1))
    if first.peak > budget_bytes:
        raise ValueError(
            f"even batch 1 does not fit: its predicted peak is {_gib(first.peak)} (at {first.result}), "
            f"above the budget of {_gib(budget_bytes)}. Weights {_gib(first.weights)}, gradients "
            f"{_gib(first.gradients)}, optimizer state {_gib(first.optimizer)} and activations "
            f"{_gib(first.activations)} at that moment: shorten seq_len (now {recipe.seq_len}), turn on "
            "gradient_checkpointing, or shrink the weights, gradients or optimizer state.")
    best = 1
    for batch in range(2, int(max_batch) + 1):
        if not fits(config, recipe.but(batch_size=batch), budget_bytes):
            break
        best = batch
    return best
