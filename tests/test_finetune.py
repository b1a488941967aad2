"""The Trainer-based fine-tune the lessons share: same batches as the corpus, evaluation equal to ours."""

import math

import pytest
import torch

from helpers.data import Corpus, heldout_perplexity
from helpers.finetune import HeldOutChunks, StepTimer, TrainChunks, evaluate_perplexity, fine_tune, training_arguments
from helpers.models import tiny_model


@pytest.fixture(scope="module")
def corpus(course_tokenizer):
    return Corpus(course_tokenizer, max_chars=60_000)


def test_train_chunks_are_the_corpus_batches_in_order(corpus):
    data = TrainChunks(corpus, batch_size=3, seq_len=32, steps=2)
    assert len(data) == 6
    for step in range(2):
        batch = corpus.train_batch(3, 32, step=step)
        for row in range(3):
            item = data[3 * step + row]
            assert torch.equal(item["input_ids"], batch["input_ids"][row]) and item["input_ids"].shape == (32,)
            assert torch.equal(item["labels"], item["input_ids"])


def test_heldout_chunks_and_trainer_evaluation_match_heldout_perplexity(corpus):
    model = tiny_model(vocab_size=49152)
    data = HeldOutChunks(corpus, max_chunks=3)
    assert len(data) == 3 and torch.equal(data[1]["input_ids"], corpus.heldout[1])
    ours = heldout_perplexity(model, corpus, max_chunks=3)
    assert math.isclose(evaluate_perplexity(model, corpus, max_chunks=3), ours, rel_tol=1e-4)


def test_fine_tune_learns_and_reports(corpus):
    model = tiny_model(vocab_size=49152)
    result = fine_tune(model, corpus, steps=4, lr=3e-3, batch_size=2, seq_len=32, eval_chunks=2)
    assert set(result) == {"ppl_before", "ppl_after", "losses", "seconds_per_step"}
    assert result["ppl_after"] < result["ppl_before"] and result["losses"]
    assert 0 < result["seconds_per_step"] < 60
    assert not model.training


def test_step_timer_leaves_out_the_first_step():
    timer = StepTimer()
    timer.seconds = [10.0, 1.0, 2.0, 3.0]
    assert timer.median == 2.0
    assert math.isnan(StepTimer().median)


def test_training_arguments_are_the_course_defaults():
    args = training_arguments(steps=7, lr=1e-3, batch_size=4, logging_steps=3)
    assert (args.max_steps, args.learning_rate, args.per_device_train_batch_size) == (7, 1e-3, 4)
    assert args.lr_scheduler_type == "constant" and args.save_strategy == "no" and args.logging_steps == 3


def test_training_arguments_batch_size_is_the_optimizer_steps():
    """batch_size is the rows of one optimizer step; Trainer gets them as k micro-batches of batch_size // k."""
    args = training_arguments(steps=2, lr=1e-3, batch_size=8, gradient_accumulation_steps=4)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)
    with pytest.raises(ValueError, match="equal micro-batches"):
        training_arguments(steps=2, lr=1e-3, batch_size=6, gradient_accumulation_steps=4)
