"""Lesson 09 — Sharding across processes: Accelerate, FSDP, DeepSpeed ZeRO."""

from __future__ import annotations

from ..checks import as_number, close, exercise, human_bytes
from ..sharding import zero_model_states

LESSON = "09_sharding"


# ------------------------------------------------------------------------------------------------
# Exercise 1: the ZeRO stage for a model, a GPU size and a GPU count
# ------------------------------------------------------------------------------------------------
def fitting_stage(params: int, gpu_bytes: float, gpus: int, headroom: float) -> int | None:
    """The lowest ZeRO stage (least communication) whose mixed-precision model states fit in ``(1 - headroom)``
    of one GPU; None if even stage 3 does not."""
    budget = gpu_bytes * (1 - headroom)
    for stage in range(4):
        if sum(zero_model_states(params, stage, gpus).values()) <= budget:
            return stage
    return None


def _as_stage(answer):
    if isinstance(answer, str):
        text = answer.strip().lower().replace("zero", "").replace("-", "").replace("_", "").strip()
        if text in ("none", "offload", "no stage"):
            return None
        answer = int(text) if text.isdigit() else answer
    value = as_number(answer, "a ZeRO stage: 0, 1, 2 or 3 (or None if no stage fits)")
    if value not in (0, 1, 2, 3):
        raise ValueError(f"a ZeRO stage is 0, 1, 2 or 3, not {value:g}")
    return int(value)


@exercise("zero_stage_choice", lesson=LESSON)
def zero_stage_choice(answer, params=None, gpu_bytes=None, gpus=None, headroom=0.25):
    """The lowest ZeRO stage whose per-GPU model states (bf16 weights and gradients, fp32 Adam: 2 + 2 + 12 bytes
    per parameter) fit in the part of one GPU left after ``headroom`` (kept for activations)."""
    if params is None or gpu_bytes is None or gpus is None:
        return False, "run the cells above first: the check needs params=, gpu_bytes= and gpus=."
    stage = _as_stage(answer)
    want = fitting_stage(params, gpu_bytes, gpus, headroom)
    budget = gpu_bytes * (1 - headroom)
    need = {s: sum(zero_model_states(params, s, gpus).values()) for s in range(4)}
    table = "; ".join(f"stage {s}: {human_bytes(b)}" for s, b in need.items())
    if stage == want:
        if want is None:
            return True, (f"right: even stage 3 needs {human_bytes(need[3])} per GPU, over the {human_bytes(budget)} "
                          "budget: add GPUs, or offload (ZeRO-Offload / ZeRO-Infinity).")
        return True, (f"stage {want}: {human_bytes(need[want])} of model states per GPU fits the {human_bytes(budget)} "
                      f"budget, and no lower stage does ({table}). Each stage further shards more, and stage 3 adds "
                      "a parameter all-gather in every forward and backward: take the lowest stage that fits.")
    if stage is None:
        return False, (f"a stage does fit: per GPU, {table}; the budget is {human_bytes(budget)} "
                       f"({1 - headroom:.0%} of {human_bytes(gpu_bytes)}).")
    if need[stage] > budget:
        return False, (f"stage {stage} needs {human_bytes(need[stage])} of model states per GPU: over the "
                       f"{human_bytes(budget)} budget ({1 - headroom:.0%} of {human_bytes(gpu_bytes)}). Use the "
                       "ZeRO formulas: stage 1 4Ψ + 12Ψ/N, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N.")
    return False, (f"stage {stage} fits ({human_bytes(need[stage])} per GPU), but stage {want} already fits "
                   f"({human_bytes(need[want])}) with less communication; choose the lowest stage that fits.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: predict the per-rank optimizer state of the ZeRO-2 run, then compare with the measurement
# ------------------------------------------------------------------------------------------------
@exercise("zero2_optimizer_bytes", lesson=LESSON)
def zero2_optimizer_bytes(answer, params=None, world_size=None, measured=None):
    """Bytes of optimizer state one rank of the DeepSpeed ZeRO-2 run holds (fp32 weights, torch AdamW; DeepSpeed
    adds its fp32 master partition): 12 bytes per parameter over the ranks, within 1 %."""
    if params is None or world_size is None:
        return False, "run the cells above first: the check needs params= and world_size=."
    value = as_number(answer, "a number of bytes")
    want = 12 * params / world_size
    seen = f" The ranks measured {measured:,.0f} bytes." if measured else ""
    if close(value, want, 0.01):
        return True, (f"{want:,.0f} bytes ({human_bytes(want)}): the fp32 master copy (4 bytes) and AdamW's two "
                      f"moments (8 bytes) of each parameter, each rank keeping 1/{world_size} of them.{seen}")
    hints = [(8 * params / world_size, "you left out DeepSpeed's fp32 master partition: it keeps one (4 bytes per "
                                       "parameter, sharded like the moments) even when the weights are fp32."),
             (12 * params, f"that is every parameter's state: ZeRO-1 and up shard the optimizer state over the "
                           f"{world_size} ranks."),
             (8 * params, "that is AdamW's moments for every parameter: they are sharded, and DeepSpeed adds an fp32 "
                          "master partition."),
             (16 * params / world_size, "that counts the gradient partition too (4 bytes per parameter): the "
                                        "question asks for optimizer state only."),
             (6 * params / world_size, "these weights are fp32, not 16-bit: the master copy and both moments are "
                                       "4 bytes each."),
             (8 * want, "that looks like bits; give bytes.")]
    for other, hint in hints:
        if close(value, other, 0.01):
            return False, f"you said {value:,.0f}: {hint}"
    return False, (f"you said {value:,.0f}. Count the bytes per parameter DeepSpeed's optimizer keeps (master "
                   "weights and Adam's two moments), times the parameters, over the ranks.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: a DeepSpeed config for ZeRO-2 with the optimizer offloaded to CPU memory
# ------------------------------------------------------------------------------------------------
@exercise("zero2_offload_config", lesson=LESSON)
def zero2_offload_config(answer):
    """A DeepSpeed config (a dict, as for ``deepspeed.initialize(config=...)`` or a JSON file) for ZeRO-2 with the
    optimizer state offloaded to CPU memory, that DeepSpeed's own parser accepts."""
    if not isinstance(answer, dict):
        return False, f"give a dict (the JSON file's content), not a {type(answer).__name__}."
    zero = answer.get("zero_optimization")
    if not isinstance(zero, dict):
        return False, ("the ZeRO settings go in a dict under the key 'zero_optimization': "
                       "{'zero_optimization': {'stage': ..., ...}}.")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        parsed = DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return False, f"DeepSpeed's parser rejects zero_optimization.{where}: {first['msg']}."
    if int(parsed.stage) != 2:
        return False, (f"this is stage {int(parsed.stage)}: the exercise asks for ZeRO-2 (optimizer state and "
                       "gradients sharded, parameters replicated).")
    off = parsed.offload_optimizer
    if off is None or str(getattr(off.device, "value", off.device)) != "cpu":
        return False, ("the optimizer is not offloaded to the CPU: add 'offload_optimizer': {'device': 'cpu'} "
                       "under zero_optimization ('nvme' is ZeRO-Infinity's, and needs ZeRO-3).")
    if "offload_param" in zero:
        return False, ("'offload_param' offloads the parameters, which only ZeRO-3 does (stage 2 ignores it "
                       "silently): leave it out.")
    sizes = {k: answer[k] for k in ("train_micro_batch_size_per_gpu", "train_batch_size") if k in answer}
    if not sizes:
        return False, ("DeepSpeed needs a batch size: set 'train_micro_batch_size_per_gpu' (a number, or 'auto' "
                       "under the HF Trainer / Accelerate, which fill it in).")
    for key, value in sizes.items():
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return False, f"{key} is {value!r}: a whole number of sequences (1 or more), or 'auto'."
    return True, ("ZeRO-2 with the fp32 master weights, the Adam moments and the gradient partition in CPU "
                  "memory; the GPU keeps the 16-bit weights and the gradient buckets, and the CPU runs the "
                  "optimizer step (DeepSpeedCPUAdam under the Trainer or Accelerate).")
