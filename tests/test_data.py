"""The offline corpus: deterministic, disjoint split, fixed-length batches, perplexity."""

import math

import torch

from helpers.data import Corpus, corpus_text, heldout_loss, heldout_perplexity
from helpers.models import tiny_model


class CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 511) for c in text]}


def test_corpus_is_real_text():
    text = corpus_text()
    assert len(text) > 400_000 and "the \"for\" statement" in text.lower()


def test_split_is_deterministic_and_disjoint():
    a, b = Corpus(CharTokenizer(), max_chars=50_000), Corpus(CharTokenizer(), max_chars=50_000)
    assert torch.equal(a.heldout_index, b.heldout_index)
    assert not set(a.heldout_index.tolist()) & set(a.train_index.tolist())
    assert 0.04 < len(a.heldout_index) / len(a.chunks) < 0.08


def test_batches_are_fixed_length_and_repeatable():
    c = Corpus(CharTokenizer(), max_chars=50_000)
    b1, b2 = c.train_batch(4, 64, step=3), c.train_batch(4, 64, step=3)
    assert b1["input_ids"].shape == (4, 64) and torch.equal(b1["input_ids"], b2["input_ids"])
    assert not torch.equal(b1["input_ids"], c.train_batch(4, 64, step=4)["input_ids"])
    assert c.train_batch(2, 300)["input_ids"].shape == (2, 300)
    held = set(map(tuple, c.heldout.tolist()))
    assert not any(tuple(row) in held for row in c.train_batch(8, c.chunk)["input_ids"].tolist())


def test_perplexity_is_exp_of_loss_and_does_not_build_a_graph():
    c = Corpus(CharTokenizer(), max_chars=50_000)
    model = tiny_model()
    loss = heldout_loss(model, c, max_chunks=4)
    assert math.isclose(heldout_perplexity(model, c, max_chunks=4), math.exp(loss), rel_tol=1e-6)
    assert 0.5 * math.log(512) < loss < 2 * math.log(512)  # a random model is near uniform
    assert all(p.grad is None for p in model.parameters())
