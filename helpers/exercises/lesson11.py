"""Lesson 11 — Memory when generating.

Exercise 1 predicts the bytes of a ``DynamicCache`` before the lesson measures that very generation (the target comes
from the course model's config, ``course_dims``); exercise 2 works out one request's cache for a model the lesson did
not run (the shipped Qwen2.5-7B config); exercise 3 diagnoses a serving set-up that does not fit, each option judged
by ``helpers.planner.plan_generation`` on the shipped Mistral-7B config.
"""

from __future__ import annotations

from ..checks import AnswerError, as_number, close, exercise, human_bytes
from ..estimate import Dims
from ..generation import cached_tokens_after_generate, gqa_saving, kv_cache_bytes, quantized_kv_cache_bytes

LESSON = "11_memory_when_generating"
# Exercise 1: the generation the lesson measures after the prediction (a configuration no cell above it runs).
PREDICT_PROMPT, PREDICT_NEW, PREDICT_BATCH = 100, 20, 3
# Exercise 2: a model and a context the lesson does not run.
CALC_MODEL, CALC_CONTEXT = "qwen2.5-7b", 32_768
# Exercise 3: Mistral-7B in bf16 on an A10G, requests of 8k tokens, loaded with attn_implementation="eager".
DIAGNOSE = {"model": "mistral-7b", "gpu": "A10G", "context": 8192, "dtype": "bf16", "want": 5}
FIXES = ("sdpa", "static_cache", "quantized_cache", "one_request", "fp32")


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims()}


def _qwen_context() -> dict:
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(CALC_MODEL))}


def _unit_hints(value: float, want: float) -> str | None:
    for other, hint in ((8 * want, "that looks like bits; give bytes."), (want / 2**20, "that looks like MiB; give "
                                                                                       "bytes."),
                        (want / 1e6, "that looks like MB; give bytes."), (want / 2**30, "that looks like GiB; give "
                                                                                        "bytes.")):
        if close(value, other, 0.01):
            return hint
    return None


def _cache_mistakes(d: Dims, tokens: int, batch: int, dtype: str) -> list[tuple[float, str]]:
    """Plausible wrong cache sizes for ``tokens`` positions of ``batch`` sequences, each with what it missed."""
    want = kv_cache_bytes(d, tokens, batch, dtype)
    size = 4 if dtype == "fp32" else 2
    out = [(want * d.heads / d.kv_heads, f"that counts a key and a value head for every query head ({d.heads}); "
                                         f"grouped-query attention keeps only {d.kv_heads} key-value heads."),
           (want / 2, "a cache keeps a key *and* a value per head: the factor 2."),
           (want / d.layers, f"that is one layer; every one of the {d.layers} layers keeps its own keys and values."),
           (want / batch, f"every one of the {batch} sequences keeps its own cache."),
           (want * (2 if size == 2 else 0.5), f"check the bytes per value: the cache is in the model's dtype "
                                              f"({dtype}, {size} bytes)."),
           (want * d.heads * d.head_dim / d.hidden / d.kv_heads if d.heads * d.head_dim != d.hidden else -1,
            "use head_dim, not hidden / heads.")]
    return [(v, h) for v, h in out if v > 0 and not close(v, want, 1e-9)]


# ------------------------------------------------------------------------------------------------
# Exercise 1: predict the DynamicCache of one generation (measured after the prediction)
# ------------------------------------------------------------------------------------------------
@exercise("dynamic_cache_bytes", lesson=LESSON, context=_course_context, kind="predict", tolerance=0.0)
def dynamic_cache_bytes(answer, dims):
    """Bytes of the ``DynamicCache`` that ``generate`` returns for ``PREDICT_BATCH`` prompts of ``PREDICT_PROMPT``
    tokens and ``max_new_tokens=PREDICT_NEW`` (greedy, no early stop) on the fp32 course model. Exact: it is a whole
    number of bytes the formula gives."""
    d = Dims.of(dims)
    value = as_number(answer, "a number of bytes")
    tokens = cached_tokens_after_generate(PREDICT_PROMPT, PREDICT_NEW)
    want = kv_cache_bytes(d, tokens, PREDICT_BATCH, "fp32")
    if abs(value - want) < 0.5:
        return True, (f"{want:,} bytes ({human_bytes(want)}): {tokens} positions x {PREDICT_BATCH} sequences x "
                      f"{d.layers} layers x 2 x {d.kv_heads} kv heads x {d.head_dim} x 4 bytes. The last generated "
                      "token is returned but never run through the model, so its keys and values never exist.")
    per = kv_cache_bytes(d, 1, PREDICT_BATCH, "fp32")
    for n, hint in ((tokens + 1, "one position too many: the last generated token is returned, never fed back through "
                                 "the model, so the cache holds prompt + new tokens - 1."),
                    (PREDICT_PROMPT, "that is the prompt's cache only: every generated token but the last adds one "
                                     "position."),
                    (PREDICT_NEW, "that counts the new tokens only: the prompt's keys and values are cached too.")):
        if abs(value - n * per) < 0.5:
            return False, f"you said {value:,.0f}: {hint}"
    for other, hint in _cache_mistakes(d, tokens, PREDICT_BATCH, "fp32"):
        if close(value, other, 1e-6) or close(value, other * (tokens + 1) / tokens, 1e-6):
            return False, f"you said {value:,.0f}: {hint}"
    hint = _unit_hints(value, want)
    if hint:
        return False, f"you said {value:,.0f}: {hint}"
    if close(value, want, 0.02):
        return False, (f"you said {value:,.0f}: close ({100 * (value / want - 1):+.2f} %), but a cache is a whole "
                       "number of bytes you can count exactly: do not round.")
    return False, (f"you said {value:,.0f}. Bytes = positions x batch x layers x 2 (key, value) x kv heads x head dim "
                   "x bytes per value; count the positions the cache holds at the end.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: one request's cache on a model the lesson did not run, and what GQA saves there
# ------------------------------------------------------------------------------------------------
def _two(answer):
    if not isinstance(answer, dict):
        raise AnswerError("give a dict {'bytes_per_request': ..., 'gqa_saving': ...} (you gave a "
                          f"{type(answer).__name__}).")
    named = {"".join(c for c in k.lower() if c.isalnum()): v for k, v in answer.items()}
    missing = [k for k in ("bytesperrequest", "gqasaving") if k not in named]
    if missing:
        raise AnswerError("the dict needs both keys 'bytes_per_request' and 'gqa_saving'.")
    if any(named[k] is None for k in ("bytesperrequest", "gqasaving")):
        raise AnswerError("some values are still None: fill in both.")
    return (as_number(named["bytesperrequest"], "a number of bytes for bytes_per_request"),
            as_number(named["gqasaving"], "a number (how many times smaller) for gqa_saving"))


@exercise("long_context_cache", lesson=LESSON, context=_qwen_context, kind="calculate", tolerance=0.0)
def long_context_cache(answer, dims):
    """{"bytes_per_request": KV cache bytes of one ``CALC_CONTEXT``-token request of the ``CALC_MODEL`` config in bf16,
    "gqa_saving": how many times larger it would be with one key-value head per query head}. Bytes exact, the
    saving within 1 %."""
    d = Dims.of(dims)
    got, saving = _two(answer)
    want, factor = kv_cache_bytes(d, CALC_CONTEXT, 1, "bf16"), gqa_saving(d)
    bytes_ok, saving_ok = abs(got - want) < 0.5, close(saving, factor, 0.01)
    if bytes_ok and saving_ok:
        return True, (f"{want:,} bytes ({want / 2**30:.2f} GiB) for one request of {CALC_CONTEXT:,} tokens: "
                      f"{d.layers} layers x 2 x {d.kv_heads} kv heads x {d.head_dim} x 2 bytes = "
                      f"{want // CALC_CONTEXT:,} bytes a token. Full multi-head attention ({d.heads} key-value heads) "
                      f"would need {factor:g} times as much, {want * factor / 2**30:.1f} GiB.")
    if not bytes_ok:
        for other, hint in _cache_mistakes(d, CALC_CONTEXT, 1, "bf16"):
            if close(got, other, 1e-6):
                return False, f"bytes_per_request: you said {got:,.0f}: {hint}"
        hint = _unit_hints(got, want)
        if hint:
            return False, f"bytes_per_request: you said {got:,.0f}: {hint}"
        if abs(got - kv_cache_bytes(d, CALC_CONTEXT - 1, 1, "bf16")) < 0.5:
            return False, "bytes_per_request: count every one of the context's positions (the request is full)."
        return False, (f"bytes_per_request: you said {got:,.0f}. Read the config's num_hidden_layers, "
                       "num_key_value_heads and head_dim (hidden_size / num_attention_heads when it has none), "
                       "then layers x 2 x kv heads x head dim x 2 bytes x tokens.")
    if close(saving, 1 / factor, 0.01):
        return False, (f"gqa_saving: you said {saving:g}: the other way round. How many times *larger* would the "
                       "cache be with one key-value head per query head?")
    if close(saving, d.heads, 0.01) or close(saving, d.kv_heads, 0.01):
        return False, (f"gqa_saving: you said {saving:g}: the saving is the ratio of query heads to key-value heads, "
                       "not either count.")
    return False, f"gqa_saving: you said {saving:g}. Compare the key-value heads with the query heads."


# ------------------------------------------------------------------------------------------------
# Exercise 3: a serving set-up that does not fit; choose the one change that makes it fit
# ------------------------------------------------------------------------------------------------
def _fix_plans() -> dict:
    """What each change gives (trusted: the planner on the shipped config), as plain numbers."""
    from ..planner import GiB, _gpu, plan_generation

    s = DIAGNOSE
    budget = _gpu(s["gpu"]).budget
    eager = plan_generation(s["model"], s["gpu"], s["context"], s["dtype"], attn="eager")
    sdpa = plan_generation(s["model"], s["gpu"], s["context"], s["dtype"])
    fp32 = plan_generation(s["model"], s["gpu"], s["context"], "fp32", attn="eager")
    quantized_per = quantized_kv_cache_bytes(Dims.of(_config(s["model"])), s["context"], 1, 4, 64, 0, s["dtype"])
    quantized_free = budget - eager.weights - eager.temporaries
    return {"budget": budget / GiB, "weights": eager.weights / GiB, "eager_prefill": eager.temporaries / GiB,
            "sdpa_prefill": sdpa.temporaries / GiB, "cache": eager.per_request / GiB,
            "requests": {"sdpa": sdpa.requests, "static_cache": eager.requests, "one_request": eager.requests,
                         "fp32": fp32.requests,
                         "quantized_cache": max(0, int(quantized_free // quantized_per))}}


def _config(name):
    from ..models import reference_config

    return reference_config(name)


@exercise("fix_the_server", lesson=LESSON, context=lambda: {"plans": _fix_plans()}, kind="diagnose")
def fix_the_server(answer, plans):
    """One of ``FIXES``: the single change after which ``DIAGNOSE["want"]`` concurrent requests fit (judged with
    ``plan_generation``); every other option's feedback says why it does not."""
    if not isinstance(answer, str):
        return False, f"give one of {list(FIXES)} as a string (you gave {answer!r:.40})."
    key = answer.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in FIXES:
        return False, f"{answer!r} is not one of the options: choose among {list(FIXES)}."
    want, n = DIAGNOSE["want"], plans["requests"][key]
    if n >= want:
        return True, (f"{key}: SDPA never materialises the {DIAGNOSE['context']:,} x {DIAGNOSE['context']:,} scores, "
                      f"so one prefill needs {plans['sdpa_prefill']:.2f} GiB instead of {plans['eager_prefill']:.2f}; "
                      f"beside {plans['weights']:.2f} GiB of weights, {n} caches of {plans['cache']:.2f} GiB fit the "
                      f"{plans['budget']:.1f} GiB budget.")
    why = {
        "static_cache": "a StaticCache holds the same keys and values (allocated up front instead of grown): the "
                        f"eager prefill's {plans['eager_prefill']:.2f} GiB of scores and mask are still there",
        "quantized_cache": "a 4-bit cache is about a quarter of the bf16 one, but the eager prefill's "
                           f"{plans['eager_prefill']:.2f} GiB of scores and mask do not shrink: weights plus one "
                           f"prefill ({plans['weights'] + plans['eager_prefill']:.2f} GiB) already fill the "
                           f"{plans['budget']:.1f} GiB budget",
        "one_request": "even one request's eager prefill needs its scores and mask "
                       f"({plans['eager_prefill']:.2f} GiB) beside the weights: the number of requests is not the "
                       "problem",
        "fp32": "fp32 doubles the weights, the cache and the scores",
    }[key]
    return False, f"{key}: {why}; {n} requests of {DIAGNOSE['context']:,} tokens fit, not {want}."
