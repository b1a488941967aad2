"""Real English text that ships with Python, split deterministically, in fixed-length batches.

    corpus = Corpus(tokenizer)                 # CPython's reference manual, tokenized once
    batch = corpus.train_batch(4, 128, step=0) # {"input_ids", "attention_mask", "labels"}
    heldout_perplexity(model, corpus)          # batched, no grad

The corpus is ``pydoc_data.topics.topics``: the 79 reference-manual topics CPython bundles for
``help()`` (about 465 k characters). The token stream is cut into chunks of ``CHUNK`` tokens; a
fixed random 6 % of chunks is held out. Holding out random chunks (rather than whole topics) is what
lets a short fine-tune show a real held-out gain: held-out text shares style and vocabulary with the
training text but no chunk is seen in training.
"""

from __future__ import annotations

import math

import torch

from .cpu_packing import prevent_packing

CHUNK = 128
HELDOUT_FRACTION = 0.06
SPLIT_SEED = 1234


def corpus_text() -> str:
    """The reference-manual topics, in a fixed order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


class Corpus:
    """The tokenized corpus, cut into ``CHUNK``-token chunks and split into train and held-out."""

    def __init__(self, tokenizer, chunk: int = CHUNK, heldout_fraction: float = HELDOUT_FRACTION,
                 seed: int = SPLIT_SEED, max_chars: int | None = None):
        text = corpus_text()[:max_chars]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids) // chunk
        self.chunk = chunk
        self.n_tokens = len(ids)
        self.chunks = torch.tensor(ids[: n * chunk], dtype=torch.long).view(n, chunk)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_held = max(1, round(n * heldout_fraction))
        self.heldout_index = order[:n_held].sort().values
        self.train_index = order[n_held:].sort().values
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def train(self) -> torch.Tensor:
        return self.chunks[self.train_index]

    @property
    def heldout(self) -> torch.Tensor:
        return self.chunks[self.heldout_index]

    def __repr__(self) -> str:
        return (f"Corpus({self.n_tokens:,} tokens: {len(self.train_index)} train and "
                f"{len(self.heldout_index)} held-out chunks of {self.chunk})")

    def train_batch(self, batch_size: int, seq_len: int = CHUNK, step: int = 0, seed: int = 0) -> dict:
        """A fixed-length batch for training step ``step``: same arguments, same batch, every time.

        ``seq_len`` up to ``chunk`` takes the start of each chunk; a longer one joins neighbouring
        training chunks (in the shuffled order), which is fine for measuring memory.
        """
        per_row = math.ceil(seq_len / self.chunk)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        order = self.train_index[torch.randperm(len(self.train_index), generator=g)]
        need = batch_size * per_row
        if need > len(order):
            order = order.repeat(math.ceil(need / len(order)))
        rows = self.chunks[order[:need]].view(batch_size, per_row * self.chunk)[:, :seq_len]
        return {"input_ids": rows.clone(), "attention_mask": torch.ones_like(rows),
                "labels": rows.clone()}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def heldout_loss(model, corpus: Corpus, batch_size: int = 8, max_chunks: int | None = None) -> float:
    """Mean next-token cross-entropy (nats per token) over the held-out chunks; batched, no grad."""
    device = next(model.parameters()).device
    data = corpus.heldout[:max_chunks]
    prevent_packing(model)  # an eval forward must not make a 4-bit model untrainable (helpers.cpu_packing)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(data), batch_size):
            ids = data[i: i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum").item()
            count += target.numel()
    finally:
        model.train(was_training)
    return total / count


def heldout_perplexity(model, corpus: Corpus, batch_size: int = 8, max_chunks: int | None = None) -> float:
    """exp(held-out loss): the number the lessons report for quality."""
    return math.exp(heldout_loss(model, corpus, batch_size, max_chunks))
