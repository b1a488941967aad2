"""Lesson 02 — freezing parameters.

The two function exercises are judged by their effects: the probe calls the learner's function on fresh tiny
models it builds (two depths, several k, twice on one model) and reports what the models look like afterwards;
the judge builds the same models itself, computes what they should look like, and compares. Neither trusts
what the learner's function returns about itself, nor any model the learner's code has touched.
"""

from __future__ import annotations

import copy
import functools

import torch

from ..checks import AnswerError, as_number, exercise, human_bytes, learner_call, plain, ratio_hint, trusted_dims

LESSON = "02_freezing_parameters"
K = 6  # "the last few blocks" in this lesson (the solution notebook's K must agree: tests/test_checks_lesson02.py)
# Exercise 2: a model and a trainable set the lesson does not run (a config shipped in helpers/model_configs;
# Llama-7B's lm_head is its own weight, not tied to the embedding).
STATE_MODEL, STATE_K = "llama-7b", 4

# Read through the C types' own accessors, captured before any learner code runs: a patched
# ``Module.named_parameters`` or a ``requires_grad`` property on a subclass cannot change what the probe sees.
_REQUIRES_GRAD = torch._C.TensorBase.requires_grad.__get__
_GRAD = torch._C.TensorBase.grad.__get__
_ABS = torch._C.TensorBase.abs
_NUMEL = torch._C.TensorBase.numel
_TO = torch._C.TensorBase.to
_SUM = torch._C.TensorBase.sum
_ITEM = torch._C.TensorBase.item
_DETACH = torch._C.TensorBase.detach
_GETATTR = object.__getattribute__
_ITEMS = dict.items

# freeze_all_but_last: (blocks of the fresh tiny model, the k of each call on that one model). The 5-block model
# is called twice (k=3, then k=1): the second call must undo the first.
FREEZE_TRIALS = ((5, (2,)), (5, (0,)), (5, (5,)), (5, (1,)), (3, (1,)), (3, (3,)), (3, (0,)), (5, (3, 1)),
                 (3, (2, 0)))


def _tiny(layers: int):
    """A fresh tiny course-shaped model, the same in every process. Its norms get seeded weights other than the
    initial ones, so that a freshly built replacement module cannot pass for the original."""
    from ..models import tiny_model

    model = tiny_model(seed=0, num_hidden_layers=layers)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    return model


def _walk(module, prefix: str = ""):
    """(qualified name, module) for ``module`` and every submodule, read from the modules' own dicts."""
    yield prefix, module
    for name, child in _ITEMS(_GETATTR(module, "_modules")):
        if child is not None:
            yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def _parameters(model):
    """(name, parameter) once per tensor, as ``named_parameters()`` lists them, without calling its methods."""
    seen = set()
    for mod_name, module in _walk(model):
        for name, p in _ITEMS(_GETATTR(module, "_parameters")):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mod_name}.{name}" if mod_name else name), p


def model_effects(model) -> dict:
    """Plain data about a model after the learner's code ran on it: its blocks, module types, trainable names,
    and a checksum of every parameter (weights must not change)."""
    params = list(_parameters(model))
    try:
        blocks = len(_GETATTR(_GETATTR(_GETATTR(model, "_modules")["model"], "_modules")["layers"], "_modules"))
    except (KeyError, AttributeError, TypeError):
        blocks = -1
    return {"blocks": blocks,
            "modules": {name or "(model)": type(m).__name__ for name, m in _walk(model)},
            "trainable": sorted(name for name, p in params if _REQUIRES_GRAD(p)),
            "checksums": {name: _ITEM(_SUM(_TO(_DETACH(p), torch.float64))) for name, p in params}}


# ------------------------------------------------------------------------------------------------
# Exercise 1: freeze_all_but_last(model, k)
# ------------------------------------------------------------------------------------------------
def probe_freeze(fn) -> list[dict]:
    """Call ``fn(model, k)`` on fresh tiny models (3 and 5 blocks) for several k, once twice on one model; report
    what each model looks like afterwards. The return value of ``fn`` is ignored."""
    trials = []
    for layers, ks in FREEZE_TRIALS:
        model = _tiny(layers)
        error = None
        for k in ks:
            ok, result = learner_call(fn, model, k)
            if not ok:
                error = f"k={k}: {result}"
                break
        trials.append({"layers": layers, "ks": list(ks), "error": error, **model_effects(model)})
    return trials


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


@functools.cache
def _untouched(layers: int) -> dict:
    """The effects of a fresh, untouched model (the judge's own build; cached: it never changes)."""
    return model_effects(_tiny(layers))


def expected_freeze(layers: int, k: int) -> tuple[set[str], dict]:
    """(names that should train, effects of an untouched model), from a model the judge builds itself."""
    effects = copy.deepcopy(_untouched(layers))
    every = effects["checksums"]
    want = {n for n in every
            if (_block_of(n) is not None and _block_of(n) >= layers - k) or n.startswith("model.norm.")}
    return want, effects


def _diagnose_freeze(got: set[str], want: set[str], every: set[str], k: int, n: int) -> str:
    """A hint for the most likely mistake behind a wrong trainable set on an ``n``-block test model."""
    blocks = {_block_of(name) for name in got} - {None}
    has_norm = any(name.startswith("model.norm.") for name in got)
    has_embedding = any("embed_tokens" in name or "lm_head" in name for name in got)
    if got == every:
        return ("nothing is frozen: every parameter still trains. Start with `model.requires_grad_(False)`, "
                "and make sure your function changes the `model` it is given.")
    if not got:
        return ("nothing trains: after freezing everything, unfreeze the last k blocks "
                "(`block.requires_grad_(True)`) and the final norm.")
    if k == 0 and blocks == set(range(n)):
        return ("with k=0 every block trains: `layers[-0:]` is the *whole* list, not an empty one. "
                "Use `layers[len(layers) - k:]`, or handle k=0 separately.")
    if has_embedding:
        return ("the embedding trains (it is the same tensor as `lm_head`: the weights are tied). Freeze "
                "everything first, then unfreeze only the blocks and the final norm.")
    if blocks == set(range(max(0, n - k), n)) and not has_norm:
        return "the right blocks train, but the final norm (`model.model.norm`) does not: unfreeze it too."
    if k and k < n and blocks == set(range(min(k, n))):
        return ("you unfroze the *first* k blocks (nearest the input); the exercise asks for the last k, "
                "nearest the output.")
    if blocks == set(range(max(0, n - k - 1), n)) or blocks == set(range(max(0, n - k + 1), n)):
        return (f"off by one: {len(blocks)} blocks train for k={k}. `model.model.layers[-k:]` selects "
                "exactly the last k (except for k=0).")
    missing, extra = sorted(want - got), sorted(got - want)
    detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
    return (f"the trainable set is not the last {k} blocks plus the final norm ({detail}): whole blocks "
            "should train, every parameter in them.")


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"dims": course_dims(), "k": K}


def _state_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"dims": Dims.of(reference_config(STATE_MODEL)), "k": STATE_K}


def _trials(data) -> list[dict]:
    if not isinstance(data, list) or len(data) != len(FREEZE_TRIALS) or not all(isinstance(t, dict) for t in data):
        raise AnswerError("the check could not read what your function did: give the function itself.")
    return data


@exercise("freeze_all_but_last", lesson=LESSON, context=_course_context, probe=probe_freeze, kind="code")
def freeze_all_but_last(data, dims, k):
    """A function ``f(model, k)`` after which only the last k blocks and the final norm are trainable."""
    from ..estimate import Recipe, trainable_params

    for (layers, ks), trial in zip(FREEZE_TRIALS, _trials(data), strict=True):
        last = ks[-1]
        where = (f"called twice on a {layers}-block test model (k={ks[0]}, then k={ks[1]})," if len(ks) > 1
                 else f"on a {layers}-block test model with k={last}")
        if trial.get("error"):
            return False, (f"{where} it raised {trial['error']}. It should work for every k from 0 to the number "
                           "of blocks.")
        want, untouched = expected_freeze(layers, last)
        if trial.get("blocks") != layers or trial.get("modules") != untouched["modules"]:
            return False, (f"{where} the model no longer has the same modules ({trial.get('blocks')} blocks, not "
                           f"{layers}): freeze parameters with `requires_grad_(False)`; do not delete or replace "
                           "blocks.")
        sums = trial.get("checksums")
        if not isinstance(sums, dict) or set(sums) != set(untouched["checksums"]) or any(
                not isinstance(sums[n], (int, float)) or abs(sums[n] - v) > 1e-9 * max(1.0, abs(v))
                for n, v in untouched["checksums"].items()):
            return False, (f"{where} it changed the model's weights or parameters: freezing only switches "
                           "`requires_grad`; it never touches the values.")
        got = set(trial.get("trainable") or [])
        every = set(untouched["checksums"])
        if got != want:
            if len(ks) > 1 and got - want and want <= got:
                return False, (f"{where} blocks from the first call still train: freeze everything at the start of "
                               "the function, then unfreeze.")
            return False, f"{where} the trainable set is wrong: " + _diagnose_freeze(got, want, every, last, layers)
    d = dims
    n = trainable_params(d, Recipe(trainable_blocks=k))
    return True, (f"right for k from 0 to the depth on 3- and 5-block test models, and when called twice; on the "
                  f"course model, k={k} trains {n:,} of {d.params:,} parameters ({n / d.params:.1%}).")


# ------------------------------------------------------------------------------------------------
# Exercise 2: AdamW state for the last k blocks, the final norm and the lm_head of another model
# ------------------------------------------------------------------------------------------------
@exercise("optimizer_state_bytes_k", lesson=LESSON, context=_state_context, kind="calculate", tolerance=0.0)
def optimizer_state_bytes_k(data, dims, k):
    """fp32 AdamW state when the last ``k`` blocks, the final norm and the lm_head train (the lm_head is one
    vocab x hidden tensor whether or not it is tied to the embedding; tied, it is the embedding)."""
    from ..estimate import Recipe, trainable_tensors

    d = trusted_dims(dims)
    value = as_number(data, "a number of bytes")
    head = d.vocab * d.hidden
    trainable = k * d.block_params + d.hidden + head
    tensors = trainable_tensors(d, Recipe(trainable_blocks=k)) + 1
    target = 8 * trainable
    # Exact: two fp32 moments per trainable parameter. PyTorch's AdamW also keeps a 4-byte step counter per tensor:
    # counting it is right too. A forgotten final norm (8 x hidden bytes) is more than all the counters together.
    if target <= value <= target + 4 * tensors:
        extra = " (plus a step counter per tensor)" if value > target else ""
        tied = ("it is the embedding itself (tied), so training it also sends gradients to the bottom" if d.tied else
                "it is its own weight, not tied to the embedding, which stays frozen")
        return True, (f"{human_bytes(value)}: 8 bytes (two fp32 moments) for each of the {trainable:,} trainable "
                      f"parameters{extra}. The lm_head alone is {head:,} of them: {tied}.")
    if abs(value - 8 * (trainable - head)) <= 4 * tensors:
        return False, (f"you said {human_bytes(value)}: that leaves out the lm_head ({head:,} parameters), which "
                       "trains too in this exercise.")
    if abs(value - 8 * (trainable - d.hidden)) <= 4 * tensors:
        return False, (f"you said {human_bytes(value)}: the final norm ({d.hidden:,} weights) trains too.")
    hints = {
        0.5: "that is one fp32 moment per parameter; AdamW keeps two (exp_avg and exp_avg_sq).",
        1.5: "that adds the gradients; the question is the optimizer state only.",
        2.0: "that adds the weights and gradients too; the question is the optimizer state only.",
        0.25: "that is 2 bytes per parameter: the moments are fp32 (4 bytes each) when training in fp32.",
        1 / 8: "that is the number of trainable parameters: multiply by the bytes AdamW keeps for each.",
        2**-20: "that looks like MiB; the exercise asks for bytes.",
        2**-30: "that looks like GiB; the exercise asks for bytes.",
        1e-6: "that looks like MB; the exercise asks for bytes.",
        1e-9: "that looks like GB; the exercise asks for bytes.",
        2**20 / 1e6: "that mixes MB and MiB: give the number of bytes itself.",
        1e6 / 2**20: "that mixes MB and MiB: give the number of bytes itself.",
        d.params / trainable: "that is every parameter of the model: only the trainable ones get state.",
    }
    if not d.tied:
        hints[(trainable + head) / trainable] = (
            "that counts the embedding too. This model's lm_head is not tied to its embedding "
            "(`tie_word_embeddings` is false): the embedding is a separate tensor, and it stays frozen.")
    for blocks in (k + 1, k - 1):
        if 0 <= blocks <= d.layers:
            hints[(trainable + (blocks - k) * d.block_params) / trainable] = (
                f"that is {blocks} blocks: train exactly the last k={k}.")
    hint = ratio_hint(value, target, hints, rel=0.001)
    if hint is None and abs(value / target - 1) < 0.01:
        hint = ("close, but not exact: count every trainable parameter (the k blocks, the final norm and the "
                "lm_head), 8 bytes each.")
    return False, f"you said {human_bytes(value)}; " + (
        hint or "count the trainable parameters (the k blocks, the final norm, the lm_head) and the bytes AdamW "
                "keeps for each.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: count_trainable(model)
# ------------------------------------------------------------------------------------------------
COUNTER_CASES = (
    # (label, blocks, how the model is prepared). The partly frozen model first: on it, an inverted condition
    # and a `.grad` test give different numbers.
    ("a 5-block model with only the last block and the final norm trainable", 5, "last"),
    ("a fresh 5-block model (everything trainable)", 5, "all"),
    ("a fully frozen 5-block model", 5, "none"),
    ("a 3-block model with the last 2 blocks and the final norm trainable, after a backward pass and "
     "zero_grad(set_to_none=True)", 3, "last2+backward"),
    ("a 3-block model with only the embedding and the first block trainable, after a backward pass that left "
     "zeroed gradients", 3, "embed+first+zero_grads"),
    ("a 5-block model trained everywhere for one backward pass, then frozen except its last block (the frozen "
     "parameters keep their stale gradients)", 5, "frozen-after-backward"),
)


def counter_model(layers: int, how: str):
    """The model of one counter case, built the same way by the probe and by the judge."""
    model = _tiny(layers)
    if how == "all":
        return model
    if how == "frozen-after-backward":
        ids = torch.arange(16).reshape(2, 8) % model.config.vocab_size
        model(input_ids=ids, labels=ids).loss.backward()  # every parameter gets a gradient
        model.requires_grad_(False)
        model.model.layers[-1].requires_grad_(True)
        return model
    model.requires_grad_(False)
    if how == "last":
        model.model.layers[-1].requires_grad_(True)
        model.model.norm.requires_grad_(True)
    elif how.startswith("last2"):
        for block in model.model.layers[-2:]:
            block.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    elif how.startswith("embed+first"):
        model.model.embed_tokens.requires_grad_(True)
        model.model.layers[0].requires_grad_(True)
    if how.endswith("backward") or how.endswith("zero_grads"):
        ids = torch.arange(16).reshape(2, 8) % model.config.vocab_size
        model(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                if how.endswith("zero_grads"):
                    p.grad.zero_()
                else:
                    p.grad = None
    return model


def _plain_count(result):
    try:
        return plain(result)
    except AnswerError as err:
        return {"unreadable": str(err)}


def gradient_state(model) -> dict[str, float]:
    """{name: sum of |grad|} of the parameters that have a ``.grad``: a counter must leave gradients alone."""
    return {name: _ITEM(_SUM(_ABS(_TO(_DETACH(_GRAD(p)), torch.float64)))) for name, p in _parameters(model)
            if _GRAD(p) is not None}


def probe_count(fn) -> list[dict]:
    """Call ``fn(model)`` twice on each counter case's model; report the counts, and which parameters train and
    which gradients exist afterwards."""
    out = []
    for _label, layers, how in COUNTER_CASES:
        model = counter_model(layers, how)
        counts, error = [], None
        for _ in range(2):
            ok, result = learner_call(fn, model)
            if not ok:
                error = result
                break
            counts.append(_plain_count(result))
        out.append({"counts": counts, "error": error, "trainable_after": model_effects(model)["trainable"],
                    "gradients_after": gradient_state(model)})
    return out


@functools.cache
def counter_reference(layers: int, how: str) -> dict:
    """What a right counter sees on one case's model, and the numbers behind the hints: from the judge's own
    build of the model (cached: it never changes)."""
    model = counter_model(layers, how)
    params = list(_parameters(model))
    trainable = [p for _, p in params if _REQUIRES_GRAD(p)]
    return {"trainable": sorted(name for name, p in params if _REQUIRES_GRAD(p)),
            "gradients": gradient_state(model),
            "want": sum(_NUMEL(p) for p in trainable),
            "everything": sum(_NUMEL(p) for _, p in params),
            "with_duplicates": sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)
                                   if p.requires_grad),
            "tensors": len(trainable),
            "with_grad": sum(_NUMEL(p) for _, p in params if _GRAD(p) is not None)}


@exercise("count_trainable", lesson=LESSON, probe=probe_count, kind="code")
def count_trainable(data):
    """A fixed ``count_trainable(model)``: the number of trainable parameters, before or after a backward."""
    if not isinstance(data, list) or len(data) != len(COUNTER_CASES) or not all(isinstance(c, dict) for c in data):
        raise AnswerError("the check could not read what your function did: give the function itself.")
    for (label, layers, how), case in zip(COUNTER_CASES, data, strict=True):
        if case.get("error"):
            return False, f"on {label} it raised {case['error']}."
        ref = counter_reference(layers, how)
        if case.get("trainable_after") != ref["trainable"]:
            return False, (f"on {label} it changed which parameters train: a counter only reads `p.requires_grad`, "
                           "it never sets it.")
        grads, want_grads = case.get("gradients_after"), ref["gradients"]
        if not isinstance(grads, dict) or set(grads) != set(want_grads) or any(
                not isinstance(grads[n], (int, float)) or abs(grads[n] - v) > 1e-9 * max(1.0, abs(v))
                for n, v in want_grads.items()):
            return False, (f"on {label} it changed the model's gradients (a backward pass of its own?): a counter "
                           "only reads `p.requires_grad`; it runs nothing.")
        want = ref["want"]
        for got in case.get("counts") or [None]:
            if isinstance(got, dict) and "unreadable" in got:
                return False, f"on {label} its result cannot be read: {got['unreadable']} Return an int."
            got = as_number(got, "a count of parameters (an int)")
            if got == want:
                continue
            everything, with_duplicates, tensors, with_grad = (
                ref[key] for key in ("everything", "with_duplicates", "tensors", "with_grad"))
            if got == with_grad and got != want:
                hint = ("it counts parameters that have a `.grad`: there is none before the first backward nor after "
                        "`zero_grad(set_to_none=True)`, and a parameter frozen after a backward keeps its old one. "
                        "Decide by what makes a parameter trainable, not by what a backward left behind.")
            elif got == everything - want and got != everything:
                hint = "it counts the frozen parameters: the condition is inverted."
            elif got == everything:
                hint = "it counts every parameter, frozen ones too: keep only those with `p.requires_grad`."
            elif got == tensors:
                hint = "it counts parameter tensors, not numbers: add up `p.numel()`."
            elif got == with_duplicates:
                hint = ("the tied embedding is counted twice (it is also `lm_head.weight`): count "
                        "`model.parameters()`, which lists each tensor once.")
            else:
                hint = "add up `p.numel()` over `model.parameters()` where `p.requires_grad` is true."
            return False, f"on {label} it returns {got:,.0f}, not {want:,}: {hint}"
    return True, ("right on trainable, partly frozen and frozen models of two sizes, before and after a backward "
                  "pass: it no longer depends on whether gradients exist.")
