"""bitsandbytes' packed CPU inference layout never reaches a model the course trains, on any CPU.

On a CPU with AVX512-BF16 these tests run the real library. Elsewhere the ``avx512bf16`` fixture
(``as_on_avx512bf16``) simulates it, following the library source (``Linear4bit.__init__`` asks
``has_avx512bf16()``; ``Linear4bit.forward`` packs in eval mode without grad; ``matmul_4bit`` then calls
``gemv_4bit``, whose CPU kernel has no autograd formula), so a helper that let the packing happen fails here too.
"""

import warnings

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from helpers.cpu_packing import (
    PackedWeightsError,
    as_on_avx512bf16,
    ensure_trainable,
    is_packed,
    packed_layers,
    packing_supported,
    prevent_packing,
)
from helpers.data import Corpus, heldout_perplexity
from helpers.finetune import evaluate_perplexity, fine_tune
from helpers.models import load_model, tiny_model
from helpers.train import make_forward, make_train_step

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama whose every linear layer can be packed (out % 32 == 0, in % 64 == 0), with the course vocabulary."""
    folder = tmp_path_factory.mktemp("tiny-packable")
    tiny_model(vocab_size=49152, intermediate_size=128).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpus(course_tokenizer):
    return Corpus(course_tokenizer, max_chars=60_000)


def quantized(checkpoint):
    """What a practitioner writes: from_pretrained with a 4-bit config, no course helper in between."""
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=NF4, device_map="cpu")


def eval_forward(model, ids):
    """The trap: any evaluation in eval mode without gradients (a perplexity loop, Trainer.evaluate, generate)."""
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)


def test_the_library_packs_on_an_eval_forward_and_the_packed_layer_has_no_backward(avx512bf16):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(128, 64, bias=False).state_dict())
    layer = layer.to("cpu")  # quantizes
    assert layer.support_avx512bf16_for_cpu and not is_packed(layer)
    x = torch.randn(5, 128)
    with torch.no_grad():
        unpacked = layer(x)  # train mode: no packing
        assert not is_packed(layer) and layer.weight.shape == (128 * 64 // 2, 1)
        layer.eval()
        packed = layer(x)
    state = layer.weight.quant_state
    assert is_packed(layer) and layer.weight.shape == (64, 64)  # [out, in / 2]
    assert state.absmax.dtype == torch.bfloat16 and not state.nested  # de-nested, bf16 constants
    assert (packed - unpacked).norm() / unpacked.norm() < 0.02  # the same product, in bf16

    layer.train()  # training mode does not undo it
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: no autograd kernel registered for gemv_4bit
        layer(x).sum().backward()
    assert x.grad is None  # the gradient stops at the packed layer


def test_a_plain_eval_forward_packs_a_4bit_model_and_training_it_is_refused(avx512bf16, tiny_checkpoint):
    model = quantized(tiny_checkpoint)
    ids = torch.arange(3, 35).view(1, 32)
    eval_forward(model, ids)
    packed = packed_layers(model)
    assert len(packed) == 3 * 7 and packed[0].endswith("layers.0.self_attn.q_proj")
    with pytest.raises(PackedWeightsError, match="no backward"):
        ensure_trainable(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(PackedWeightsError, match="prevent_packing"):
        make_train_step(model, optimizer, {"input_ids": ids, "labels": ids})


def test_prevent_packing_keeps_the_layout_through_an_eval_forward(avx512bf16, tiny_checkpoint):
    model = quantized(tiny_checkpoint)
    assert prevent_packing(model) == 3 * 7
    eval_forward(model, torch.arange(3, 35).view(1, 32))
    assert packed_layers(model) == []
    assert prevent_packing(tiny_model()) == 0  # nothing to do without 4-bit layers


def with_adapters(model):
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))


# Every course path that evaluates a model which may be trained afterwards, run on a freshly loaded model.
PATHS = {
    "load_model": lambda model, corpus, checkpoint: load_model(checkpoint, quantization_config=NF4),
    "heldout_perplexity": lambda model, corpus, _: heldout_perplexity(model, corpus, max_chunks=2) and model,
    "evaluate_perplexity": lambda model, corpus, _: evaluate_perplexity(with_adapters(model), corpus, max_chunks=2)
    and model,
    "make_forward": lambda model, corpus, _: make_forward(model, corpus.train_batch(1, 32))() and model,
    "fine_tune": lambda model, corpus, _: fine_tune(with_adapters(model), corpus, steps=1, lr=1e-3, batch_size=1,
                                                    seq_len=32, eval_chunks=2) and model,
}


@pytest.mark.parametrize("path", list(PATHS))
def test_no_course_path_leaves_a_model_packable(avx512bf16, tiny_checkpoint, corpus, path):
    model = PATHS[path](quantized(tiny_checkpoint), corpus, tiny_checkpoint)
    assert packed_layers(model) == [], path
    eval_forward(model, corpus.train_batch(1, 32)["input_ids"])  # the learner's own evaluation, afterwards
    assert packed_layers(model) == [], path


def test_a_model_that_trains_after_a_course_evaluation_gets_gradients_at_the_bottom(avx512bf16, tiny_checkpoint,
                                                                                    corpus):
    model = with_adapters(quantized(tiny_checkpoint))
    heldout_perplexity(model, corpus, max_chunks=2)
    batch = corpus.train_batch(1, 32)
    seen = {}
    bottom = model.base_model.model.model.layers[0].self_attn.o_proj.base_layer
    bottom.register_forward_hook(lambda module, args, out: seen.update(x=args[0]) or args[0].retain_grad())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    make_train_step(model, optimizer, batch)()
    assert seen["x"].grad is not None and seen["x"].grad.abs().sum() > 0  # the base layer passes the gradient on


def test_a_simulation_nests_and_ends_cleanly():
    if packing_supported():
        pytest.skip("this CPU packs for real: nothing is simulated")
    def stand_in_registered():
        return "cpu_packing" in torch._C._dispatch_dump("bitsandbytes::gemv_4bit")

    with as_on_avx512bf16():
        with as_on_avx512bf16():
            assert bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu and stand_in_registered()
        # the inner block left the outer one intact
        assert bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu and stand_in_registered()
    assert not bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu and not stand_in_registered()
