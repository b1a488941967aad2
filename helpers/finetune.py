"""A short, real fine-tune with Hugging Face's ``Trainer`` on the course corpus, written once.

    args = training_arguments(steps=12, lr=1e-3, batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=TrainChunks(corpus, 2, 128, steps=12),
                      eval_dataset=HeldOutChunks(corpus, 16), callbacks=[StepTimer()])
    trainer.train()
    math.exp(trainer.evaluate()["eval_loss"])           # held-out perplexity; or evaluate_perplexity(model, corpus)

or, for sweeps, ``fine_tune(model, corpus, steps=12, lr=1e-3)``, which does exactly that and returns
the perplexity before and after, the losses and the median time per step.

Batches are the same ones ``Corpus.train_batch(batch_size, seq_len, step=i)`` gives, in order, so every
run in a lesson sees the same tokens. The held-out set is the corpus's held-out chunks (whole 128-token
chunks), so ``Trainer``'s evaluation loss equals ``helpers.data.heldout_loss`` on the same chunks.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .cpu_packing import ensure_trainable, prevent_packing
from .data import Corpus
from .progress import TrainerProgress


class TrainChunks(torch.utils.data.Dataset):
    """``steps`` training batches of ``batch_size`` x ``seq_len``, one example at a time, in order."""

    def __init__(self, corpus: Corpus, batch_size: int, seq_len: int, steps: int):
        self.corpus, self.batch_size, self.seq_len, self.steps = corpus, batch_size, seq_len, steps

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __getitem__(self, i: int) -> dict:
        batch = self.corpus.train_batch(self.batch_size, self.seq_len, step=i // self.batch_size)
        return {k: v[i % self.batch_size] for k, v in batch.items()}


class HeldOutChunks(torch.utils.data.Dataset):
    """The first ``max_chunks`` held-out chunks, with labels, for ``Trainer.evaluate``."""

    def __init__(self, corpus: Corpus, max_chunks: int | None = None):
        self.rows = corpus.heldout[:max_chunks]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, step); ``median`` skips the first (warm-up)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)

    @property
    def median(self) -> float:
        timed = self.seconds[1:] or self.seconds
        return statistics.median(timed) if timed else float("nan")


def training_arguments(steps: int, lr: float, batch_size: int = 2, output_dir: str | None = None,
                       gradient_accumulation_steps: int = 1, **overrides) -> TrainingArguments:
    """The course's ``TrainingArguments``: a constant learning rate for ``steps`` steps on the CPU (or the
    GPU when there is one), no checkpoints written, no logging service; the loss is logged as text four
    times a run instead of Trainer's progress bar, so executed notebooks stay readable (``fine_tune`` adds
    ``helpers.progress.TrainerProgress``, a bar shown only in a live notebook).

    ``batch_size`` is the rows of one optimizer step, as everywhere in the course: ``Trainer`` gets it as
    ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size = batch_size //
    gradient_accumulation_steps`` rows."""
    if gradient_accumulation_steps < 1 or batch_size % gradient_accumulation_steps:
        raise ValueError(f"batch_size {batch_size} (rows per optimizer step) does not split into "
                         f"{gradient_accumulation_steps} equal micro-batches: gradient_accumulation_steps must "
                         "divide it")
    settings = dict(output_dir=output_dir or tempfile.mkdtemp(prefix="course-trainer-"),
                    per_device_train_batch_size=batch_size // gradient_accumulation_steps,
                    gradient_accumulation_steps=gradient_accumulation_steps, per_device_eval_batch_size=8,
                    max_steps=steps,
                    learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    logging_steps=max(1, steps // 4), save_strategy="no", report_to="none", seed=0,
                    prediction_loss_only=True,  # evaluation keeps the loss, not every logit (400 MB here)
                    use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def evaluate_perplexity(model, corpus: Corpus, max_chunks: int = 16) -> float:
    """Held-out perplexity through ``Trainer.evaluate`` (the same number as ``helpers.data.heldout_perplexity``)."""
    prevent_packing(model)  # evaluation must not leave 4-bit layers untrainable (helpers.cpu_packing)
    trainer = Trainer(model=model, args=training_arguments(steps=1, lr=0.0),
                      eval_dataset=HeldOutChunks(corpus, max_chunks))
    trainer.remove_callback(PrinterCallback)  # the caller prints what matters
    return math.exp(trainer.evaluate()["eval_loss"])


def fine_tune(model, corpus: Corpus, steps: int, lr: float, batch_size: int = 2, seq_len: int = 128,
              eval_chunks: int = 16, evaluate_before: bool = True, **training_overrides) -> dict:
    """Evaluate, train ``steps`` steps with ``Trainer``, evaluate again (``training_overrides`` go to
    ``TrainingArguments``, e.g. ``optim="paged_adamw_8bit"``). Returns a dict with
    ``ppl_before`` (None with ``evaluate_before=False``), ``ppl_after``, ``losses`` (training loss per
    logged step) and ``seconds_per_step``."""
    ensure_trainable(model)  # Trainer.evaluate would pack 4-bit layers on some CPUs (helpers.cpu_packing)
    timer = StepTimer()
    trainer = Trainer(model=model, args=training_arguments(steps, lr, batch_size, **training_overrides),
                      train_dataset=TrainChunks(corpus, batch_size, seq_len, steps),
                      eval_dataset=HeldOutChunks(corpus, eval_chunks),
                      callbacks=[timer, TrainerProgress("fine-tune")])  # after the timer: not timed
    trainer.remove_callback(PrinterCallback)  # the caller prints what matters
    before = math.exp(trainer.evaluate()["eval_loss"]) if evaluate_before else None
    trainer.train()
    after = math.exp(trainer.evaluate()["eval_loss"])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    model.eval()
    return {"ppl_before": before, "ppl_after": after, "losses": losses, "seconds_per_step": timer.median}
