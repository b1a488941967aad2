"""Lesson 02 — freezing parameters."""

from __future__ import annotations

from ..checks import as_number, close, exercise, human_bytes, ratio_hint

LESSON = "02_freezing_parameters"
TINY_LAYERS = 5  # the fresh tiny model the function checks run on (never the lesson's model)


def _tiny(**overrides):
    from ..models import tiny_model

    return tiny_model(num_hidden_layers=TINY_LAYERS, **overrides)


def _trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _expected_names(model, k: int) -> set[str]:
    """Every parameter of the last ``k`` blocks, plus the final norm."""
    n = len(model.model.layers)
    names = {name for name, _ in model.named_parameters()
             if (_block_of(name) is not None and _block_of(name) >= n - k)}
    return names | {name for name, _ in model.named_parameters() if name.startswith("model.norm.")}


def _count(model, names: set[str]) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name in names)


def _diagnose_freeze(got: set[str], want: set[str], k: int, model) -> str:
    """A hint for the most likely mistake behind a wrong trainable set on the tiny model."""
    every = {name for name, _ in model.named_parameters()}
    n = len(model.model.layers)
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
    if k and blocks == set(range(min(k, n))):
        return ("you unfroze the *first* k blocks (nearest the input); the exercise asks for the last k, "
                "nearest the output.")
    if blocks == set(range(max(0, n - k - 1), n)) or blocks == set(range(max(0, n - k + 1), n)):
        return (f"off by one: {len(blocks)} blocks train for k={k}. `model.model.layers[-k:]` selects "
                "exactly the last k.")
    missing, extra = sorted(want - got), sorted(got - want)
    detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
    return (f"the trainable set is not the last {k} blocks plus the final norm ({detail}): whole blocks "
            "should train, every parameter in them.")


@exercise("freeze_all_but_last", lesson=LESSON)
def freeze_all_but_last(answer, model=None, k: int | None = None):
    """A function ``f(model, k)`` that leaves only the last k blocks and the final norm trainable.

    It is called on fresh tiny models built here (never on the lesson's ``model``), for several k;
    ``model`` and ``k`` from the lesson are only used to say what the function does there.
    """
    if not callable(answer):
        return False, ("give the function itself, `freeze_all_but_last` (no parentheses), "
                       f"not its result ({type(answer).__name__}).")
    for trial in (2, 0, TINY_LAYERS, 1):
        tiny = _tiny()
        try:
            answer(tiny, trial)
        except Exception as err:  # the learner's code: explain, do not raise
            return False, (f"calling it on a small model with k={trial} raised {type(err).__name__}: {err}. "
                           "It should work for every k from 0 to the number of blocks.")
        got, want = _trainable_names(tiny), _expected_names(tiny, trial)
        if got != want:
            n_got, n_want = _count(tiny, got), _count(tiny, want)
            counts = (f"the right number of parameters ({n_got:,}) but not the right ones" if n_got == n_want
                      else f"{n_got:,} parameters, not {n_want:,}")
            return False, (f"on a {TINY_LAYERS}-block test model with k={trial} it trains {counts}: "
                           + _diagnose_freeze(got, want, trial, tiny))
    tiny = _tiny()
    answer(tiny, 3)
    answer(tiny, 1)  # applied twice: the second call must undo the first
    if _trainable_names(tiny) != _expected_names(tiny, 1):
        return False, ("called twice (k=3, then k=1), blocks from the first call still train: freeze "
                       "everything at the start of the function, then unfreeze.")
    message = f"right for every k from 0 to {TINY_LAYERS} on a {TINY_LAYERS}-block test model"
    if model is not None and k is not None:
        from ..estimate import Dims, Recipe, trainable_params

        d = Dims.of(model.config)
        n = trainable_params(d, Recipe(trainable_blocks=k))
        message += (f"; on the lesson's model, k={k} trains {n:,} of {d.params:,} parameters "
                    f"({n / d.params:.1%})")
    return True, message + "."


@exercise("optimizer_state_bytes_k", lesson=LESSON)
def optimizer_state_bytes_k(answer, k: int | None = None, block_params: int | None = None,
                            hidden: int | None = None, embedding_params: int | None = None,
                            n_params: int | None = None):
    """fp32 AdamW state when only the last ``k`` blocks (``block_params`` each) and the final norm
    (``hidden`` weights) train."""
    if None in (k, block_params, hidden):
        return False, ("run the cells above first: the check needs k, block_params and hidden "
                       "(pass k=..., block_params=dims.block_params, hidden=dims.hidden).")
    value = as_number(answer, "a number of bytes")
    trainable = k * block_params + hidden
    target = 8 * trainable  # + a 4-byte step counter per tensor, far below the tolerance
    if close(value, target, 0.01):
        return True, (f"{human_bytes(value)}: 8 bytes (two fp32 moments) for each of the {trainable:,} "
                      f"trainable parameters; frozen parameters get no state at all.")
    hints = {
        0.5: "that is one fp32 moment per parameter; AdamW keeps two (exp_avg and exp_avg_sq).",
        1.5: "that adds the gradients; the question is the optimizer state only.",
        2.0: "that adds the weights and gradients too; the question is the optimizer state only.",
        1 / 8: "that is the number of trainable parameters: multiply by the bytes AdamW keeps for each.",
        (k + 1) / k: f"that is {k + 1} blocks: train exactly the last k={k}.",
        2**-20: "that looks like MiB; the exercise asks for bytes.",
        1e-9: "that looks like GB; the exercise asks for bytes.",
    }
    if k > 1:
        hints[(k - 1) / k] = f"that is {k - 1} blocks: train exactly the last k={k}."
    if embedding_params:
        hints[(trainable + embedding_params) / trainable] = (
            "that includes the embedding (tied to lm_head), which stays frozen in this exercise.")
    if n_params:
        hints[n_params / trainable] = "that is every parameter of the model: only the trainable ones get state."
    hint = ratio_hint(value, target, hints, rel=0.005)
    return False, f"you said {human_bytes(value)}; " + (
        hint or "count the trainable parameters (k blocks and the final norm) and the bytes AdamW keeps for each.")


def _expected_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _counter_cases():
    """(label, model) pairs: everything trainable, the last block + final norm, nothing."""
    full = _tiny()
    last = _tiny()
    last.requires_grad_(False)
    last.model.layers[-1].requires_grad_(True)
    last.model.norm.requires_grad_(True)
    frozen = _tiny()
    frozen.requires_grad_(False)
    # The partly frozen model first: on it, an inverted condition and a `.grad` test give different numbers.
    return [("a model with only the last block and the final norm trainable", last),
            ("a fresh model (everything trainable)", full), ("a fully frozen model", frozen)]


@exercise("count_trainable", lesson=LESSON)
def count_trainable(answer, **_context):
    """A fixed ``count_trainable(model)``: the number of trainable parameters, before any backward."""
    if not callable(answer):
        return False, ("give the fixed function itself, `count_trainable` (no parentheses), "
                       f"not its result ({type(answer).__name__}).")
    for label, model in _counter_cases():
        try:
            got = answer(model)
        except Exception as err:
            return False, f"on {label} it raised {type(err).__name__}: {err}."
        got = as_number(got, "a count of parameters")
        want = _expected_count(model)
        if got == want:
            continue
        everything = sum(p.numel() for p in model.parameters())
        with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)
                              if p.requires_grad)
        tensors = sum(1 for p in model.parameters() if p.requires_grad)
        if got == 0 and want:
            hint = ("a parameter has no `.grad` before the first backward, nor after "
                    "`zero_grad(set_to_none=True)`: decide by `p.requires_grad` instead.")
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
    return True, ("right on a trainable, a partly frozen and a frozen model — and it no longer depends on "
                  "whether a backward pass has run.")
