"""Lesson 09 — Sharding across processes: Accelerate, FSDP, DeepSpeed ZeRO.

Targets come from the lesson's fixed inputs: the shipped LLaMA 13B config and the scenario below
(exercise 1), the course model's config with the runs' ``MID_LAYERS`` blocks and ``WORLD_SIZE`` ranks
(exercise 2), and DeepSpeed's own config classes (exercise 3).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from types import SimpleNamespace

from ..checks import AnswerError, as_number, close, exercise, human_bytes
from ..sharding import WORLD_SIZE, zero_model_states

LESSON = "09_sharding"
GB = 1e9

# Exercise 1: LLaMA 13B, mixed-precision AdamW, one node of 8 GPUs of 80 GB, 25 % kept for activations.
SCENARIO_MODEL = "llama-13b"
SCENARIO = {"gpu_bytes": 80 * GB, "gpus": 8, "headroom": 0.25}
# Exercise 2: the runs' mid-size model, mid_size_model(layers=MID_LAYERS) (shard_worker's --layers default).
MID_LAYERS = 4
# Exercise 2's honest answers: 12 x params / ranks exactly, the same plus the 4-byte step counter the ranks
# measure, or the measured table read in MiB to one decimal (0.02 %). 0.05 % allows those; MB for MiB
# (4.9 %), a forgotten master copy (33 %) or an unsharded state fail.
OPTIMIZER_TOLERANCE = 5e-4
# Exercise 3: 'auto' values are filled as the HF Trainer fills them for a run like the lesson's: WORLD_SIZE
# ranks, micro-batches of one row (unless the config gives its own), the course model's width.
TRAINER_STEPS = 100


def _scenario_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"params": Dims.of(reference_config(SCENARIO_MODEL)).params, **SCENARIO}


def _mid_size_context() -> dict:
    import dataclasses

    from ..capstone import course_dims

    return {"params": dataclasses.replace(course_dims(), layers=MID_LAYERS).params, "world_size": WORLD_SIZE}


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


_NO_STAGE = {"none", "no", "nostage", "offload", "nothing", "neither"}


def _as_stage(answer):
    """0-3 from 2, 2.0, '2', 'stage 2', 'ZeRO-2', 'zero2', 'ZeRO stage 2', 'Stage-2'; None for 'none'."""
    if isinstance(answer, str):
        text = "".join(ch for ch in answer.strip().lower() if ch.isalnum() or ch == ".")
        for word in ("zero", "stage", "deepspeed"):
            text = text.replace(word, "")
        if text in _NO_STAGE:
            return None
        if not text.isdigit():
            raise AnswerError(f"{answer!r} is not a ZeRO stage: answer 0, 1, 2 or 3 (or 'stage 2', 'ZeRO-2'), "
                              "or None if no stage fits.")
        answer = int(text)
    value = as_number(answer, "a ZeRO stage: 0, 1, 2 or 3 (or None if no stage fits)")
    if value not in (0, 1, 2, 3):
        raise AnswerError(f"a ZeRO stage is 0, 1, 2 or 3, not {value:g}.")
    return int(value)


@exercise("zero_stage_choice", lesson=LESSON, context=_scenario_context)
def zero_stage_choice(answer, params, gpu_bytes, gpus, headroom):
    """The lowest ZeRO stage whose per-GPU model states (bf16 weights and gradients, fp32 Adam: 2 + 2 + 12 bytes
    per parameter) fit in the part of one GPU left after ``headroom`` (kept for activations)."""
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
    if want is None:  # pragma: no cover (a stage that fits makes want a stage)
        return False, "no stage fits this scenario."
    return False, (f"stage {stage} fits ({human_bytes(need[stage])} per GPU), but stage {want} already fits "
                   f"({human_bytes(need[want])}) with less communication; choose the lowest stage that fits.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: predict the per-rank optimizer state of the ZeRO-2 run
# ------------------------------------------------------------------------------------------------
@exercise("zero2_optimizer_bytes", lesson=LESSON, context=_mid_size_context)
def zero2_optimizer_bytes(answer, params, world_size):
    """Bytes of optimizer state one rank of the DeepSpeed ZeRO-2 run holds (fp32 weights, torch AdamW; DeepSpeed
    adds its fp32 master partition): 12 bytes per parameter over the ranks, within ``OPTIMIZER_TOLERANCE``."""
    value = as_number(answer, "a number of bytes")
    want = 12 * params / world_size
    if close(value, want, OPTIMIZER_TOLERANCE):
        return True, (f"{want:,.0f} bytes ({human_bytes(want)}, {want / 2**20:,.1f} MiB): the fp32 master copy "
                      f"(4 bytes) and AdamW's two moments (8 bytes) of each of the {params:,} parameters, each rank "
                      f"keeping 1/{world_size} of them. The ranks measure 4 bytes more: AdamW's step counter.")
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
             (want / 2**20 * 1e6, "that looks like MiB multiplied by 10^6: a MiB is 2^20 bytes (4.9 % more)."),
             (want / 1e6 * 2**20, "that looks like MB multiplied by 2^20: a MB is 10^6 bytes."),
             (8 * want, "that looks like bits; give bytes."),
             (want / 2**20, "that looks like MiB; give bytes."),
             (want / 1e6, "that looks like MB; give bytes.")]
    for other, hint in hints:
        if close(value, other, 0.005):
            return False, f"you said {value:,.0f}: {hint}"
    return False, (f"you said {value:,.0f}. Count the bytes per parameter DeepSpeed's optimizer keeps (master "
                   "weights and Adam's two moments), times the parameters, over the ranks.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: a DeepSpeed config for ZeRO-2 with the optimizer offloaded to CPU memory
# ------------------------------------------------------------------------------------------------
class _Rejected(Exception):
    """A config DeepSpeed (or the HF integration filling it) would not run; the message says why."""


class _Reads(dict):
    """The config as DeepSpeedConfig reads it, remembering which top-level keys it looked at."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set = set()

    def __copy__(self):  # DeepSpeedConfig parses a copy: keep recording
        return self

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _whole(value) -> int | None:
    return value if type(value) is int and value >= 1 else None


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in _autos(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [key for i, v in enumerate(node) for key in _autos(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def _fill_auto(config: dict, world_size: int, hidden: int) -> dict:
    """``config`` with its "auto" values filled the way the HF Trainer fills them (transformers'
    HfTrainerDeepSpeedConfig, given TrainingArguments that agree with the config's own numbers)."""
    import dataclasses

    import transformers.integrations.deepspeed as hf_ds
    from transformers import TrainingArguments

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)
                if f.default is not dataclasses.MISSING}
    micro, accumulation = (_whole(config.get(k)) for k in ("train_micro_batch_size_per_gpu",
                                                            "gradient_accumulation_steps"))
    total = _whole(config.get("train_batch_size"))
    accumulation = accumulation or 1
    if micro is None:
        micro = total // (accumulation * world_size) if total and total % (accumulation * world_size) == 0 else 1
    args = SimpleNamespace(**{**defaults, "world_size": world_size, "per_device_train_batch_size": micro,
                              "gradient_accumulation_steps": accumulation,
                              "get_warmup_steps": lambda steps: 0})
    saved = hf_ds._hf_deepspeed_config_weak_ref  # the HF integration keeps a global; leave it as it was
    try:
        filled = hf_ds.HfTrainerDeepSpeedConfig(config)
        # Only fill: the stand-in TrainingArguments are not the learner's, so a mismatch with them says nothing.
        filled.fill_match = lambda key, value, hf_key=None, must_match=True: filled.fill_only(key, value)
        filled.trainer_config_process(args)
        filled.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=hidden)),
                                       TRAINER_STEPS)
        return filled.config
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


class _World:
    """What DeepSpeedConfig asks deepspeed.comm: rank 0 of ``size`` ranks (no process group is needed to parse)."""

    def __init__(self, size: int):
        self.size = size

    def get_rank(self, *args, **kwargs):
        return 0

    def get_world_size(self, *args, **kwargs):
        return self.size


def _deepspeed_parse(config: dict, world_size: int):
    """deepspeed.runtime.config.DeepSpeedConfig as each of ``world_size`` ranks builds it: (parsed, {key it did
    not read: the closest key it did read, if any})."""
    import deepspeed.runtime.config as ds_config
    from deepspeed.utils import logger as ds_logger
    from pydantic import ValidationError

    sections = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedFP16Config": "fp16",
                "DeepSpeedBF16Config": "bf16", "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization"}
    reads = _Reads(config)
    saved_dist, saved_level = ds_config.dist, ds_logger.level
    ds_config.dist = _World(world_size)
    ds_logger.setLevel(logging.ERROR)
    try:
        parsed = ds_config.DeepSpeedConfig(reads)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in (sections.get(err.title, err.title), *first["loc"]))
        raise _Rejected(f"DeepSpeed's config class rejects {where}: {first['msg'].rstrip('.')}.") from None
    except Exception as err:  # DeepSpeed asserts and raises on values it cannot use
        raise _Rejected(f"DeepSpeed's config class rejects it ({type(err).__name__}: {str(err)[:300]}).") from None
    finally:
        ds_config.dist = saved_dist
        ds_logger.setLevel(saved_level)
    return parsed, {key: difflib.get_close_matches(key, [k for k in reads.read if isinstance(k, str)], 1)
                    for key in sorted(set(config) - reads.read)}


def _optimizer_problem(parsed) -> str | None:
    """What ``deepspeed.initialize`` would refuse in the config's optimizer section (None if nothing, or none)."""
    import inspect

    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    name = parsed.optimizer_name
    if name is None:  # the Trainer / Accelerate bring AdamW and swap in DeepSpeedCPUAdam for the offload
        return None
    params = dict(parsed.optimizer_params or {})
    if "max_grad_norm" in params:
        return ("'max_grad_norm' is not supported as an optimizer parameter (DeepSpeed): use the top-level "
                "'gradient_clipping'.")
    cpu = {"adam": "DeepSpeedCPUAdam", "adamw": "DeepSpeedCPUAdam", "lion": "DeepSpeedCPULion"}
    if name in cpu and not params.get("torch_adam"):
        from deepspeed.ops import adam, lion

        cls = getattr(adam if cpu[name] == "DeepSpeedCPUAdam" else lion, cpu[name])
        for key in ("adam_w_mode", "torch_adam", "fp32_optimizer_states"):
            params.pop(key, None)
    else:
        if parsed.zero_force_ds_cpu_optimizer:
            return (f"optimizer type {name!r} with ZeRO-Offload: DeepSpeed runs the offloaded step with its CPU "
                    "optimizers (type 'AdamW', 'Adam' or 'Lion') and refuses others unless "
                    "'zero_force_ds_cpu_optimizer' is false.")
        if name in DEEPSPEED_OPTIMIZERS:
            return None
        cls = getattr(torch.optim, name, None)
        if not isinstance(cls, type):
            return (f"optimizer type {name!r} is neither one of DeepSpeed's ({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a "
                    "torch.optim class.")
        params.pop("torch_adam", None)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "model_params"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        return f"{cls.__name__} takes no {', '.join(map(repr, unknown))} (optimizer.params)."
    return None


def _scheduler_problem(config: dict) -> str | None:
    scheduler = config.get("scheduler")
    if scheduler is None:
        return None
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    kind = scheduler.get("type") if isinstance(scheduler, dict) else None
    if kind not in VALID_LR_SCHEDULES:
        return f"scheduler type {kind!r} is not one of DeepSpeed's: {', '.join(VALID_LR_SCHEDULES)}."
    return None


def _course_hidden() -> int:
    from ..capstone import course_dims

    return course_dims().hidden


@exercise("zero2_offload_config", lesson=LESSON,
          context=lambda: {"world_size": WORLD_SIZE, "hidden": _course_hidden()})
def zero2_offload_config(answer, world_size, hidden):
    """A DeepSpeed config (a dict, as for ``deepspeed.initialize(config=...)`` or a JSON file) for ZeRO-2 with the
    optimizer state offloaded to CPU memory. Judged by what DeepSpeed makes of it: "auto" values filled as the HF
    Trainer fills them, then parsed by ``deepspeed.runtime.config.DeepSpeedConfig`` as each rank would."""
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except ValueError:
            return False, ("give the config as a dict (or the JSON file's text); a file name cannot be checked: "
                           "json.load(open(path)) gives the dict.")
    if not isinstance(answer, dict):
        return False, f"give a dict (the JSON file's content), not a {type(answer).__name__}."
    zero = answer.get("zero_optimization")
    if zero is None:
        like = difflib.get_close_matches("zero_optimization", [k for k in answer if isinstance(k, str)], 1)
        nested = (" (you put the ZeRO keys at the top level)" if "stage" in answer
                  else f" (not {like[0]!r})" if like else "")
        return False, ("the ZeRO settings go in a dict under the key 'zero_optimization'"
                       f"{nested}: {{'zero_optimization': {{'stage': ..., ...}}}}.")
    if not isinstance(zero, dict):
        return False, ("'zero_optimization' must be a dict of ZeRO settings: "
                       "{'zero_optimization': {'stage': ..., ...}}.")
    try:
        config = _fill_auto(answer, world_size, hidden)
    except Exception as err:  # a section that is not a dict, say: DeepSpeed's own reason is the better hint
        try:
            _deepspeed_parse(answer, world_size)
        except _Rejected as rejected:
            return False, str(rejected)
        return False, f"the HF integration cannot fill this config's 'auto' values ({type(err).__name__}: {err})."
    left = _autos(config)
    if left:
        return False, (f"{', '.join(left)} {'is' if len(left) == 1 else 'are'} 'auto', which neither the HF Trainer "
                       "nor Accelerate fills in: give a value.")
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        if key in answer and answer[key] != "auto" and _whole(answer[key]) is None:
            return False, f"{key} is {answer[key]!r}: a whole number of sequences (1 or more), or 'auto'."
    if not any(k in answer for k in ("train_micro_batch_size_per_gpu", "train_batch_size")):
        return False, ("DeepSpeed needs a batch size: set 'train_micro_batch_size_per_gpu' (a number, or 'auto' "
                       "under the HF Trainer / Accelerate, which fill it in).")
    try:
        parsed, unread = _deepspeed_parse(config, world_size)
    except _Rejected as err:
        return False, str(err)
    if unread:
        key, like = next(iter(unread.items()))
        meant = f" (did you mean {like[0]!r}?)" if like else ""
        return False, (f"DeepSpeed does not read {', '.join(map(repr, unread))}{meant}: it would ignore "
                       f"{'it' if len(unread) == 1 else 'them'} silently. Check the spelling against DeepSpeed's "
                       "config reference.")
    stage = int(parsed.zero_optimization_stage)
    if stage != 2:
        return False, (f"DeepSpeed reads this as stage {stage}: the exercise asks for ZeRO-2 (optimizer state and "
                       "gradients sharded, parameters replicated).")
    off = parsed.zero_config.offload_optimizer
    device = str(getattr(getattr(off, "device", None), "value", getattr(off, "device", "none")))
    if off is None or device != "cpu":
        return False, ("DeepSpeed reads no optimizer offload to the CPU: add 'offload_optimizer': {'device': 'cpu'} "
                       "under zero_optimization ('nvme' is ZeRO-Infinity's, and needs ZeRO-3).")
    if not math.isclose(float(getattr(off, "ratio", 1.0)), 1.0):
        return False, "offload_optimizer.ratio below 1 offloads only part of the optimizer: offload all of it."
    param = parsed.zero_config.offload_param
    if param is not None and str(getattr(param.device, "value", param.device)) != "none":
        return False, ("'offload_param' offloads the parameters, which only ZeRO-3 does (stage 2 ignores it "
                       "silently): leave it out.")
    problem = _optimizer_problem(parsed) or _scheduler_problem(config)
    if problem:
        return False, f"deepspeed.initialize would refuse this: {problem}"
    return True, (f"DeepSpeed reads ZeRO stage 2 with the optimizer offloaded to the CPU (micro-batch "
                  f"{parsed.train_micro_batch_size_per_gpu} per rank, {world_size} ranks). The fp32 master weights, "
                  "the Adam moments and the gradient partition live in CPU memory; the GPU keeps the 16-bit weights "
                  "and the gradient buckets, and the CPU runs the optimizer step (DeepSpeedCPUAdam).")
