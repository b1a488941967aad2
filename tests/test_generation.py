"""helpers.generation: the KV cache formula against real transformers caches (tiny models), the grouped-query saving,
the quantized layout, and the predicted peak of generate."""

import ast
from pathlib import Path

import pytest
import torch
from casebook import COURSE

from helpers import generation
from helpers.generation import (
    cache_bytes,
    cached_tokens_after_generate,
    eager_scores_bytes,
    generation_peak,
    gqa_saving,
    kv_bytes_per_token,
    kv_cache_bytes,
    mha_kv_bytes_per_token,
    prefill_temporaries_bytes,
    quantized_kv_cache_bytes,
    quantized_residual_after_generate,
)
from helpers.models import tiny_model


def test_the_course_model_by_hand():
    assert kv_bytes_per_token(COURSE, "fp32") == 30 * 2 * 3 * 64 * 4 == 46_080
    assert kv_bytes_per_token(COURSE, "bf16") == 23_040
    assert kv_cache_bytes(COURSE, 1000, 4, "bf16") == 4000 * 23_040
    assert mha_kv_bytes_per_token(COURSE) == 3 * kv_bytes_per_token(COURSE) and gqa_saving(COURSE) == 3.0
    assert eager_scores_bytes(COURSE, 512) == 9 * 512 * 512 * 4
    assert eager_scores_bytes(COURSE, 1, 100, batch=2, dtype="bf16") == 2 * 9 * 100 * 2


def test_no_torch_at_module_level():
    """Arithmetic only: torch is imported inside the functions that read a real cache, never at the top."""
    tree = ast.parse(Path(generation.__file__).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names}
    names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in names and "memory" not in names


@pytest.mark.parametrize("bad", [dict(tokens=-1), dict(batch=1.5), dict(dtype="int3"), dict(dtype=True)])
def test_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        kv_cache_bytes(COURSE, **{"tokens": 10, "batch": 1, "dtype": "fp32", **bad})


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("prompt,new,batch", [(5, 4, 1), (12, 3, 3)])
def test_dynamic_cache_after_generate_is_the_formula(kv_heads, prompt, new, batch, one_thread):
    model = tiny_model(num_key_value_heads=kv_heads, use_cache=True)
    ids = torch.randint(3, 500, (batch, prompt))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, return_dict_in_generate=True)
    tokens = cached_tokens_after_generate(prompt, new)
    assert tokens == prompt + new - 1 and out.past_key_values.get_seq_length() == tokens
    assert cache_bytes(out.past_key_values) == kv_cache_bytes(model.config, tokens, batch, "fp32")


def test_static_cache_holds_its_whole_length(one_thread):
    model = tiny_model(use_cache=True)
    ids = torch.randint(3, 500, (2, 6))
    for max_cache_len, want in ((None, 9), (32, 32)):
        extra = {"max_cache_len": max_cache_len} if max_cache_len else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, return_dict_in_generate=True, cache_implementation="static", **extra)
        assert cached_tokens_after_generate(6, 4, "static", max_cache_len) == want
        assert cache_bytes(out.past_key_values) == kv_cache_bytes(model.config, want, 2, "fp32")


def test_quantized_layout_and_residual():
    fp32 = kv_cache_bytes(COURSE, 256, 1, "fp32")
    q4 = quantized_kv_cache_bytes(COURSE, 256, 1, nbits=4, group=64)
    assert q4 == fp32 // 8 + 2 * fp32 // 4 // 64 * 4  # half a byte a value, two fp32 numbers per 64 values
    assert quantized_kv_cache_bytes(COURSE, 256, 1, residual=256) == fp32
    with pytest.raises(ValueError):
        quantized_kv_cache_bytes(COURSE, 10, residual=11)
    assert quantized_residual_after_generate(64, 16, 128) == 15
    assert quantized_residual_after_generate(64, 130, 128) == 1  # flushed once at 128, one more since
    assert quantized_residual_after_generate(64, 1, 128) == 0


def test_generation_peak_adds_up_and_eager_grows_with_the_square():
    p = generation_peak(COURSE, 256, 8, 2)
    assert p["peak"] == p["weights"] + p["cache"] + p["temporaries"]
    assert p["activations"] == p["cache"] + p["temporaries"]
    assert p["cache"] == kv_cache_bytes(COURSE, 256, 2)  # the prefill's moment: the prompt's cache
    sdpa = [prefill_temporaries_bytes(COURSE, n, attn="sdpa") for n in (1024, 2048)]
    eager = [prefill_temporaries_bytes(COURSE, n, attn="eager") for n in (1024, 2048)]
    assert sdpa[1] == 2 * sdpa[0] and 3.5 < eager[1] / eager[0] <= 4
    static = generation_peak(COURSE, 64, 4, 1, cache="static", max_cache_len=512)
    assert static["cache"] == kv_cache_bytes(COURSE, 512)
