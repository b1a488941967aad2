"""bitsandbytes' packed 4-bit layout for CPU inference, and how the course keeps it away from training.

    prevent_packing(model)          # every 4-bit layer keeps the layout it can be trained through
    packed_layers(model)            # names of the 4-bit layers already packed ([] when none)
    ensure_trainable(model)         # prevent_packing, or PackedWeightsError if it is too late
    packing_supported()             # does bitsandbytes pack 4-bit weights on this CPU?
    with as_on_avx512bf16(): ...    # bitsandbytes as on such a CPU: real there, simulated elsewhere

The library behaviour (bitsandbytes 0.50, ``Linear4bit.forward`` in ``bitsandbytes/nn/modules.py``): on a
CPU with AVX512-BF16, the first forward of a ``Linear4bit`` in **eval mode** on an input that does not
require grad converts its weight **in place** to a layout packed for a fast bf16 kernel
(``_convert_weight_packed_for_cpu``: the 4-bit codes reordered into ``[out, in / 2]`` tiles, the absmax
constants de-nested and stored as bf16). From then on ``bnb.matmul_4bit`` sends that layer through
``F.gemv_4bit``, which has no backward, in training mode too. A QLoRA model evaluated once and then trained
gets no gradient through any base layer, and no error: it simply stops learning. bitsandbytes' inverse
(``_convert_weight_packed_for_cpu_inverse``) re-quantizes the constants, so undoing it changes the model;
the course prevents the packing instead. Each ``Linear4bit`` reads its ``support_avx512bf16_for_cpu``
attribute (set from ``has_avx512bf16()`` when the layer is built) in that forward: setting it to ``False``
is all it takes.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch


class PackedWeightsError(ValueError):
    """A model about to be trained has 4-bit layers already packed for CPU inference."""


def _linear_4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) for every bitsandbytes ``Linear4bit`` in ``model``; none if bitsandbytes was never imported."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")  # no 4-bit layer can exist before bitsandbytes is imported
    if bnb_nn is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb_nn.Linear4bit)]


def is_packed(layer: torch.nn.Module) -> bool:
    """Whether a ``Linear4bit``'s weight is in bitsandbytes' packed CPU inference layout."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def packed_layers(model: torch.nn.Module) -> list[str]:
    """Names of the model's 4-bit layers whose weights bitsandbytes has packed for CPU inference."""
    return [name for name, layer in _linear_4bit_layers(model) if is_packed(layer)]


def prevent_packing(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from packing the model's 4-bit layers for CPU inference (that layout has no backward).

    Returns how many 4-bit layers there are. Layers that are already packed stay packed: see ``ensure_trainable``.
    """
    layers = _linear_4bit_layers(model)
    for _, layer in layers:
        layer.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it packs
    return len(layers)


def ensure_trainable(model: torch.nn.Module) -> None:
    """``prevent_packing``, after making sure no 4-bit layer is packed already (``PackedWeightsError`` if one is)."""
    packed = packed_layers(model)
    if packed:
        raise PackedWeightsError(
            f"{len(packed)} of the model's 4-bit layers (e.g. {packed[0]}) were packed by bitsandbytes for fast CPU "
            "inference: an eval-mode forward without gradients on a CPU with AVX512-BF16 does that, in place. "
            "That layout has no backward, so training it would silently stop learning. Load the model again and "
            "call helpers.cpu_packing.prevent_packing(model) before evaluating it (helpers.models.load_model "
            "does this for you); lesson 05 shows the trap.")
    prevent_packing(model)


def packing_supported() -> bool:
    """Whether bitsandbytes packs 4-bit weights on this CPU (its own AVX512-BF16 test)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception:  # bitsandbytes missing or its native library failed to load
        return False
    return bool(has_avx512bf16())


@torch.no_grad()  # the real kernel writes into a fresh tensor from C: autograd sees no link to the input
def _packed_gemv(A, B, shapeB, absmax, code, blocksize):
    """Plain PyTorch in place of bitsandbytes' AVX512-BF16 kernel for packed weights: the same maths
    (bf16 input and absmax, output in bf16), from the layout ``_convert_weight_packed_for_cpu`` writes."""
    n, k = shapeB
    tiles = B.reshape(-1, 32)  # each row: 32 bytes = 32 low nibbles, then 32 high nibbles, of 64 codes
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # [n/32 * k/2, 64]
    codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k)  # back to [out, in]
    scales = absmax.float().T.repeat_interleave(blocksize, dim=1)  # absmax is [in / blocksize, out]
    weight = (code.float()[codes.long()] * scales).bfloat16()
    return (A.bfloat16().float() @ weight.float().T).bfloat16()


_simulating = False


@contextmanager
def as_on_avx512bf16():
    """Inside the block, bitsandbytes behaves as on a CPU with AVX512-BF16, whatever this CPU is.

    On a CPU that has AVX512-BF16 that is the real library, and nothing changes. Elsewhere the block simulates
    it, following the library: 4-bit layers built inside the block get ``support_avx512bf16_for_cpu = True``
    (``Linear4bit.__init__`` asks ``has_avx512bf16()``), so their forward packs them exactly as on such a CPU;
    and ``gemv_4bit`` gets a CPU kernel registered the way bitsandbytes registers its own (no autograd formula),
    computing the same product in plain PyTorch. Use each model inside the block only. A block nested inside a
    simulation changes nothing.
    """
    global _simulating
    if packing_supported() or _simulating:  # the real thing, or already inside a simulation
        yield
        return
    import bitsandbytes.nn.modules as modules

    library = torch.library.Library("bitsandbytes", "FRAGMENT")
    torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu", _packed_gemv, lib=library)
    original = modules.has_avx512bf16
    modules.has_avx512bf16 = lambda: True
    _simulating = True
    try:
        yield
    finally:
        _simulating = False
        modules.has_avx512bf16 = original
        library._destroy()
