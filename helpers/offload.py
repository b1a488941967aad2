"""A model bigger than the device: Accelerate's big-model path (meta device, device maps, CPU and disk offload).

    model = empty_model(path)                              # every tensor on "meta": 0 bytes
    plan = device_map_for(model, {"cpu": "200MiB"})          # where each block would go, nothing loaded
    model = load_offloaded(path, {"cpu": "200MiB"}, "offload")   # transformers: from_pretrained(device_map="auto")
    model = dispatch_offloaded(path, {"cpu": "200MiB"}, "offload")  # the same by hand: Accelerate's own calls
    placement(model)                                       # {"cpu": bytes, "disk": bytes}
    generate_speed(model, input_ids, new_tokens=16)          # greedy ids and tokens per second

Blocks that do not fit the ``max_memory`` budget go to "disk": they stay on the meta device, and an Accelerate
hook reads their weights from a file just before each forward and drops them after it. With a safetensors
checkpoint, transformers 5 reads them from the checkpoint itself (``offload_folder`` stays empty);
``load_checkpoint_and_dispatch`` copies them into ``offload_folder`` as ``.dat`` files plus ``index.json``.
Either way those files must stay where they are for as long as the model is used: ``check_offload`` says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .memory import time_it


def empty_model(config_or_path, include_buffers: bool = True):
    """The model's architecture with every parameter on the meta device: shapes and dtypes, no storage, so
    its size and device map can be worked out for a model that fits nowhere. ``include_buffers=True`` also
    puts buffers on meta (nothing at all is allocated); loading needs ``False``, because buffers that no
    checkpoint holds (the rotary ``inv_freq``) cannot be filled in later. Weights are re-tied after the
    ``with`` block: in transformers 5 the tie is lost inside ``init_empty_weights``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config_or_path if hasattr(config_or_path, "to_dict") else AutoConfig.from_pretrained(config_or_path)
    with init_empty_weights(include_buffers=include_buffers):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model.eval()


def device_map_for(model, max_memory: dict) -> dict:
    """Where each block goes under ``max_memory`` ({"cpu": "200MiB"}): filled in order, never splitting a
    decoder layer (its residual connection needs it whole), keeping tied weights together, then "disk"."""
    from accelerate import infer_auto_device_map

    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)


def load_offloaded(path, max_memory: dict, offload_folder=None, dtype=torch.float32):
    """``from_pretrained(device_map="auto", max_memory=...)``: what transformers does with a model too big for
    the device. Works on a CPU-only machine: what does not fit the "cpu" budget goes to "disk"."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                 offload_folder=offload_folder)
    check_offload(model)
    return model.eval()


def dispatch_offloaded(path, max_memory: dict, offload_folder):
    """The same, by hand, with Accelerate's calls: empty model, device map, then ``load_checkpoint_and_dispatch``
    loads what fits and copies the rest into ``offload_folder``."""
    from accelerate import load_checkpoint_and_dispatch

    model = empty_model(path, include_buffers=False)
    model = load_checkpoint_and_dispatch(model, str(path), device_map=device_map_for(model, max_memory),
                                         offload_folder=offload_folder)
    check_offload(model)
    return model.eval()


def check_offload(model) -> None:
    """Raise a clear error, now rather than deep inside the first forward, if a weight offloaded to disk has
    no stored copy (an untied model) or its file is gone (a deleted or temporary offload folder)."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            loader = getattr(getattr(h, "weights_map", None), "dataset", None)
            if not getattr(h, "offload", False) or loader is None:
                continue
            for name, _ in module.named_parameters(recurse=h.place_submodules):
                key = h.weights_map.prefix + name
                if key in loader.state_dict:
                    continue
                if key not in loader.index:
                    raise ValueError(
                        f"{key} is offloaded to disk but has no stored copy. If it is a tied weight (the lm_head "
                        "shares the embedding), call model.tie_weights() before working out the device map.")
                info = loader.index[key]
                file = info.get("safetensors_file") or os.path.join(loader.save_folder, f"{key}.dat")
                if not Path(file).is_file():
                    raise FileNotFoundError(
                        f"{key} is offloaded to {file}, which no longer exists: the offload folder (and the "
                        "checkpoint) must stay in place while the model is used; load the model again.")


def placement(model, device_map: dict | None = None) -> dict[str, int]:
    """Parameter bytes per device ("cpu", "disk", 0...), from ``device_map`` or the model's ``hf_device_map``
    (which transformers only sets when it dispatched the model); a tied weight is counted once."""
    device_map = device_map if device_map is not None else getattr(model, "hf_device_map", None)
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    out: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in tied:
            continue
        if device_map is None:
            device = str(p.device)
        else:  # the longest module name that contains this parameter ("" is the whole model)
            owner = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
            device = str(device_map[owner])
        out[device] = out.get(device, 0) + p.numel() * p.element_size()
    return out


@torch.no_grad()
def generate_speed(model, input_ids: torch.Tensor, new_tokens: int = 16, repeats: int = 3) -> dict:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (no early stop at end-of-text, so every model
    does the same work), timed after one warm-up: the new token ids and tokens per second."""
    def run():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    ids = run()[:, input_ids.shape[1]:]
    timing = time_it(run, repeats=repeats, warmup=0)
    return {"ids": ids, "seconds": timing["median"], "tokens_per_second": new_tokens / timing["median"]}
