"""Memory when generating: the KV cache and what else a ``generate`` call holds, as arithmetic.

    kv_cache_bytes(config, tokens=1024, batch=4, dtype="bf16")     # the keys and values of every layer
    kv_bytes_per_token(config, "bf16")                              # layers x 2 x kv heads x head dim x bytes
    gqa_saving(config)                                              # heads / kv heads: what grouped-query saves
    eager_scores_bytes(config, q_len=512, kv_len=512, batch=1)      # one layer's attention scores (eager)
    quantized_kv_cache_bytes(config, tokens, batch, nbits=4)        # QuantizedCache (quanto / HQQ layout)
    generation_peak(config, prompt=128, new_tokens=8, batch=1)      # weights + cache + temporaries, by category

Nothing here imports torch at module level: like ``helpers.estimate``, it is arithmetic on a config (a transformers
config, a dict or ``helpers.estimate.Dims``). ``cache_bytes(cache)`` and ``cached_tokens(cache)`` read a real
``transformers`` cache object and import torch only when called.

What a cache holds after ``model.generate(prompt, max_new_tokens=n)`` (transformers 5):

* ``DynamicCache`` (the default): ``prompt + n - 1`` tokens. The last generated token is returned, never fed back
  through the model, so its keys and values are never computed. The tensors grow by ``torch.cat`` each step: for a
  moment one layer's old and new keys (then values) are both alive.
* ``StaticCache`` (``cache_implementation="static"``): ``max_cache_len`` tokens, allocated at the first step and
  written in place; ``max_cache_len`` defaults to ``prompt + n - 1`` (what the generation will write), or is what
  ``generate(..., max_cache_len=...)`` says.
* ``QuantizedCache`` (``cache_implementation="quantized"``): the prompt is quantized at once; new tokens wait in a
  full-precision *residual* until ``residual_length`` of them have gathered, then everything is re-quantized.

The temporaries besides the cache (``generation_peak``) are those of the prefill — the one forward pass over the
whole prompt — in its last block, where the cache of every layer already exists: the residual stream, the MLP's
gate, up and product tensors, and (eager attention only) two copies of the scores ``batch x heads x prompt x
prompt``. The prefill keeps only the last position's logits (``logits_to_keep=1``), upcast to fp32.
"""

from __future__ import annotations

import math

from .estimate import Dims

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1,
               "int8": 1, "float8_e4m3fn": 1}


def dtype_bytes(dtype) -> int:
    """Bytes per element of ``dtype``: a name ("bf16", "fp32", "float16"...), a ``torch.dtype`` or a number."""
    if isinstance(dtype, bool):
        raise ValueError(f"unknown dtype {dtype!r}")
    if isinstance(dtype, (int, float)):
        if dtype <= 0:
            raise ValueError(f"bytes per element must be positive, got {dtype!r}")
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(set(DTYPE_BYTES)))}")
    return DTYPE_BYTES[name]


def _count(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a whole number of at least 0, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------
# The KV cache
# ------------------------------------------------------------------------------------------------
def kv_bytes_per_token(config, dtype="fp32") -> int:
    """Cache bytes for one token of one sequence: layers x 2 (key and value) x kv heads x head dim x bytes."""
    d = Dims.of(config)
    return d.layers * 2 * d.kv_heads * d.head_dim * dtype_bytes(dtype)


def kv_cache_bytes(config, tokens: int, batch: int = 1, dtype="fp32") -> int:
    """Bytes of the keys and values of ``tokens`` positions for ``batch`` sequences (a Dynamic or Static cache)."""
    return _count("tokens", tokens) * _count("batch", batch) * kv_bytes_per_token(config, dtype)


def mha_kv_bytes_per_token(config, dtype="fp32") -> int:
    """What one token would cost with full multi-head attention: one key and value head per query head."""
    d = Dims.of(config)
    return d.layers * 2 * d.heads * d.head_dim * dtype_bytes(dtype)


def gqa_saving(config) -> float:
    """How many times smaller grouped-query attention makes the cache: query heads / key-value heads."""
    d = Dims.of(config)
    return d.heads / d.kv_heads


def cached_tokens_after_generate(prompt: int, new_tokens: int, cache: str = "dynamic",
                                 max_cache_len: int | None = None) -> int:
    """Token positions a cache holds after ``generate(max_new_tokens=new_tokens)`` ran to the end (module text)."""
    prompt, new_tokens = _count("prompt", prompt), _count("new_tokens", new_tokens)
    if cache == "dynamic":
        return prompt + new_tokens - 1
    if cache == "static":
        return max_cache_len or prompt + new_tokens - 1
    raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")


def quantized_kv_cache_bytes(config, tokens: int, batch: int = 1, nbits: int = 4, group: int = 64,
                             residual: int = 0, dtype="fp32") -> int:
    """A ``QuantizedCache`` (quanto or HQQ layout): ``tokens - residual`` positions at ``nbits`` per value plus a scale
    and a zero point (in ``dtype``) per ``group`` values, and ``residual`` positions in ``dtype``."""
    d = Dims.of(config)
    tokens, residual = _count("tokens", tokens), _count("residual", residual)
    if residual > tokens:
        raise ValueError(f"residual ({residual}) cannot exceed tokens ({tokens})")
    values = d.layers * 2 * d.kv_heads * d.head_dim * batch * (tokens - residual)
    packed = math.ceil(values * nbits / 8)
    scales = 2 * math.ceil(values / group) * dtype_bytes(dtype)
    return packed + scales + kv_cache_bytes(d, residual, batch, dtype)


def quantized_residual_after_generate(prompt: int, new_tokens: int, residual_length: int = 128) -> int:
    """Positions left in full precision in a ``QuantizedLayer`` after ``generate`` (transformers' rule: the prompt is
    quantized at once; each later step adds one token to the residual, which is flushed into the quantized part when
    it would reach ``residual_length``)."""
    held = 0
    for _ in range(_count("new_tokens", new_tokens) - 1):  # the last generated token is never fed back
        held = 0 if held + 1 >= residual_length else held + 1
    return held


# ------------------------------------------------------------------------------------------------
# Attention scores and the temporaries of a forward pass
# ------------------------------------------------------------------------------------------------
def eager_scores_bytes(config, q_len: int, kv_len: int | None = None, batch: int = 1, dtype="fp32") -> int:
    """One layer's attention scores in eager attention: batch x heads x q_len x kv_len values. The eager code holds
    two such tensors at once (the product and the scaled, masked or softmaxed copy); SDPA's fused kernels never
    materialise them."""
    d = Dims.of(config)
    kv_len = q_len if kv_len is None else kv_len
    return _count("batch", batch) * d.heads * _count("q_len", q_len) * _count("kv_len", kv_len) * dtype_bytes(dtype)


EAGER_SCORE_COPIES = 2  # matmul x scaling, + mask, softmax: each makes a new tensor while its input is alive


def prefill_temporaries_bytes(config, prompt: int, batch: int = 1, dtype="fp32", attn: str = "sdpa") -> int:
    """Tensors besides the cache alive at the prefill's peak, in its last block. With SDPA that is the MLP: per token
    the residual stream, its normalised copy, the attention output and the residual sum (4 x hidden) and the MLP's
    gate, up and product (3 x intermediate). Eager attention adds a (batch, 1, prompt, prompt) causal mask that lives
    through the whole pass, and in each layer two copies of the scores (``eager_scores_bytes``) beside the queries,
    the keys and values repeated to every head (3 x heads x head dim), the residual and its normalised copy, and the
    keys and values themselves: the larger of the attention moment and the MLP moment. Nothing grows with the
    vocabulary: the prefill keeps only the last position's logits (``logits_bytes``)."""
    d = Dims.of(config)
    b, p, size = _count("batch", batch), _count("prompt", prompt), dtype_bytes(dtype)
    mlp = b * p * (4 * d.hidden + 3 * d.intermediate) * size
    if attn == "sdpa":
        return mlp
    if attn != "eager":
        raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
    mask = b * p * p * size
    attention = (EAGER_SCORE_COPIES * eager_scores_bytes(d, p, p, b, dtype)
                 + b * p * (3 * d.q_dim + 2 * d.hidden + 2 * d.kv_dim) * size)
    return mask + max(mlp, attention)


def logits_bytes(config, batch: int = 1) -> int:
    """The last position's logits, upcast to fp32 by ``generate``."""
    return _count("batch", batch) * Dims.of(config).vocab * 4


def weight_bytes(config, dtype="fp32") -> int:
    """Every parameter in ``dtype`` (the tied embedding counted once)."""
    return Dims.of(config).params * dtype_bytes(dtype)


def generation_peak(config, prompt: int, new_tokens: int, batch: int = 1, dtype="fp32", attn: str = "sdpa",
                    cache: str = "dynamic", max_cache_len: int | None = None) -> dict[str, int]:
    """The predicted peak of ``generate`` by category: {"weights", "cache", "temporaries", "activations", "peak"}
    (``activations`` = cache + temporaries, the meter's "activations and temporaries").

    Two candidate moments: the end of the prefill (cache of the prompt, or the whole static cache, plus the prefill's
    temporaries) and the last decoding step (the full cache, one layer's growing copy for a dynamic cache, and the
    logits). The larger wins."""
    d = Dims.of(config)
    w = weight_bytes(d, dtype)
    final = kv_cache_bytes(d, cached_tokens_after_generate(prompt, new_tokens, cache, max_cache_len), batch, dtype)
    at_prefill = final if cache == "static" else kv_cache_bytes(d, prompt, batch, dtype)
    prefill = at_prefill + prefill_temporaries_bytes(d, prompt, batch, dtype, attn) + logits_bytes(d, batch)
    growing = 2 * kv_cache_bytes(d, cached_tokens_after_generate(prompt, new_tokens), batch, dtype) // d.layers // 2
    decode = final + (growing if cache == "dynamic" else 0) + 2 * logits_bytes(d, batch)
    if prefill >= decode:
        cache_part, temps = at_prefill, prefill - at_prefill
    else:
        cache_part, temps = final, decode - final
    return {"weights": w, "cache": cache_part, "temporaries": temps, "activations": cache_part + temps,
            "peak": w + cache_part + temps}


# ------------------------------------------------------------------------------------------------
# Reading a real cache object (imports torch when called)
# ------------------------------------------------------------------------------------------------
def _inner_tensors(x):
    """Plain tensors inside ``x``: tensors, tuples/lists of them, and tensor subclasses (quanto's packed tensors)."""
    import torch

    if x is None:
        return
    if isinstance(x, (tuple, list)):
        for item in x:
            yield from _inner_tensors(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _inner_tensors(item)
    elif isinstance(x, torch.Tensor):
        flatten = getattr(x, "__tensor_flatten__", None)
        if flatten is not None and type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
            names, _ = flatten()
            for name in names:
                yield from _inner_tensors(getattr(x, name))
        else:
            yield x


def cache_tensors(cache) -> list:
    """Every tensor a transformers cache holds: each layer's keys and values and, for a quantized cache, its
    quantized keys and values (scales and zero points included)."""
    out = []
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            out.extend(_inner_tensors(getattr(layer, attr, None)))
    return out


def cache_bytes(cache) -> int:
    """Exact bytes of the distinct storages a transformers cache holds (``helpers.memory.tensor_bytes``)."""
    from .memory import tensor_bytes

    return tensor_bytes(cache_tensors(cache))


def cached_tokens(cache) -> int:
    """Token positions the cache holds (``get_seq_length`` of its first layer, as an int)."""
    return int(cache.get_seq_length())
