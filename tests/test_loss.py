"""The chunked loss is the plain loss (value and gradients, padding and micro-batch normalisation included), and
what each holds at the start of backward is what ``helpers.estimate.loss_bytes`` says, alone and in a step."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers.estimate import Dims, Recipe, loss_bytes, predict
from helpers.loss import IGNORE, causal_lm_loss, chunked_causal_lm_loss, measure_loss, next_token_targets
from helpers.memory import measure
from helpers.models import tiny_config, tiny_model
from helpers.train import make_train_step

VOCAB = 300


def batch(rows=3, positions=21, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, positions), generator=g)
    labels = ids.clone()
    if pad:
        labels[:, -pad:] = IGNORE  # padding: no targets there
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 4, 7, 21, 64])
@pytest.mark.parametrize("pad", [0, 5])
def test_the_chunked_loss_and_its_gradients_are_the_plain_ones(chunk, pad):
    model = tiny_model(vocab_size=VOCAB)
    data = batch(pad=pad)
    plain = model(**data).loss
    plain.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, data, chunk=chunk)
    loss.backward()
    got = grads(model)
    assert abs(loss.item() - plain.item()) < 1e-5 and set(got) == set(want)
    assert all(torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4) for n in want)


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    model, data = tiny_model(vocab_size=VOCAB), batch()
    want = model(**data, num_items_in_batch=100).loss
    assert abs(causal_lm_loss(model, data, chunk=5, num_items_in_batch=100).item() - want.item()) < 1e-5


def test_targets_are_the_labels_shifted_left():
    labels = torch.tensor([[5, 6, 7], [8, IGNORE, 9]])
    assert next_token_targets(labels).tolist() == [[6, 7, IGNORE], [IGNORE, 9, IGNORE]]


@pytest.mark.parametrize("chunk", [0, -3, 2.5])
def test_a_chunk_must_be_a_positive_whole_number(chunk):
    with pytest.raises(ValueError, match="whole number"):
        chunked_causal_lm_loss(torch.zeros(1, 4, 8), torch.nn.Linear(8, 10), torch.zeros(1, 4, dtype=torch.long),
                               chunk)
    if chunk != 0:
        with pytest.raises(ValueError, match="loss_chunk"):
            Recipe(loss_chunk=chunk)


@pytest.mark.parametrize("rows, positions, chunk", [(1, 64, None), (2, 48, None), (2, 64, 16), (3, 40, 7)])
def test_the_loss_alone_holds_what_loss_bytes_says(rows, positions, chunk):
    hidden = 32
    report = measure_loss(2_000, rows, positions, hidden_size=hidden, chunk=chunk)
    d = Dims(layers=1, hidden=hidden, intermediate=64, heads=2, kv_heads=1, head_dim=16, vocab=2_000, tied=True)
    # the hidden states the measurement holds, then what the loss holds (the hidden states counted once)
    want = rows * positions * hidden * 4 + loss_bytes(d, rows, positions, chunk or 0, head_trains=True)
    assert abs(report.activations / want - 1) < 0.01, (report.activations, want)
    assert report.weights == 2_000 * hidden * 4


def test_chunking_divides_the_loss_term_and_chunks_as_long_as_the_sequence_change_nothing():
    d = Dims.of(tiny_config(vocab_size=30_000))
    plain = loss_bytes(d, 2, 64)
    assert plain == 3 * 2 * 64 * 30_000 * 4 == loss_bytes(d, 2, 64, chunk=64) == loss_bytes(d, 2, 64, chunk=100)
    assert plain / 4 < loss_bytes(d, 2, 64, chunk=16) < plain / 3.9  # a quarter of the logits, and the hidden states


@pytest.mark.parametrize("chunk", [0, 8])
def test_a_lora_step_with_the_loss_in_chunks_is_predicted(chunk):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=4_000)
    model = get_peft_model(tiny_model(vocab_size=4_000), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = {k: v % 4_000 for k, v in batch(rows=2, positions=32).items()}
    step = make_train_step(model, optimizer, data, gradient_checkpointing=True, loss_chunk=chunk or None)
    step()
    measured = measure(step, model, optimizer)
    predicted = predict(config, Recipe(batch_size=2, seq_len=32, lora_rank=4, lora_targets=("q_proj", "v_proj"),
                                       gradient_checkpointing=True, loss_chunk=chunk))
    assert abs(predicted.activations / measured.activations - 1) < 0.03, (predicted, measured)
