"""Lesson 09 — Sharding across processes: Accelerate, FSDP, DeepSpeed ZeRO.

Every exercise is a configuration the lesson's runs did not use (they train a 4-block model on 2 ranks in fp32):
exercise 1 the shipped Qwen2.5-14B config on a node of 8 GPUs of 80 GB; exercise 2 the full course model on
``ZERO2_RANKS`` ranks in bf16; exercise 3 a DeepSpeed config for ``CONFIG_SCENARIO`` (4 ranks, a global batch the
learner must split), judged by DeepSpeed's own config class.
"""

from __future__ import annotations

import difflib
import json
import logging
import math

from ..checks import AnswerError, as_number, close, exercise, human_bytes
from ..distributed.launch import zero_model_states
from ..planner import USABLE

LESSON = "09_sharding"
GB = 1e9

# Exercise 1: Qwen2.5-14B, mixed-precision AdamW, one node of 8 GPUs of 80 GB. The budget per GPU is the part of
# the card the course counts as usable (USABLE, 90 %: the CUDA context, cuBLAS workspace and allocator slack take
# the rest, lesson 00), less 25 % of that for activations and communication buffers: 54 GB. Stage 2 needs 55.4 GB
# (it would fit the whole 80 GB less 25 %: the mistake of forgetting the context), stage 3 29.5 GB.
SCENARIO_MODEL = "qwen2.5-14b"
SCENARIO = {"gpu_bytes": 80 * GB, "gpus": 8, "usable": USABLE, "headroom": 0.25}
# Exercise 2: the full course model, bf16 mixed precision, DeepSpeed ZeRO-2 on ZERO2_RANKS ranks (the runs: 2).
ZERO2_RANKS = 4
# Exercise 2's honest answers: 12 x params / ranks exactly, or plus the 4-byte step counter, or a MiB figure read
# to one decimal (0.03 %). 0.05 % allows those; MB for MiB (4.9 %), a forgotten master copy (33 %), bf16 moments
# (50 %) or the lesson's 2 ranks (100 %) fail.
OPTIMIZER_TOLERANCE = 5e-4
# The runs' mid-size model (shard_worker's --layers default): a learner who counts it instead of the course model.
MID_LAYERS = 4
# Exercise 3: the scenario the config is written for. The script calls deepspeed.initialize itself (no Trainer,
# so nothing fills "auto") and lets DeepSpeed build the optimizer from the config.
CONFIG_SCENARIO = {"world_size": 4, "micro_batch": 8, "global_batch": 128}


def _scenario_context() -> dict:
    from ..estimate import Dims
    from ..models import reference_config

    return {"params": Dims.of(reference_config(SCENARIO_MODEL)).params, **SCENARIO}


def _course_context() -> dict:
    from ..capstone import course_dims

    return {"params": course_dims().params, "world_size": ZERO2_RANKS}


# ------------------------------------------------------------------------------------------------
# Exercise 1: the ZeRO stage for a model, a GPU size and a GPU count
# ------------------------------------------------------------------------------------------------
def stage_budget(gpu_bytes: float, usable: float, headroom: float) -> float:
    """Bytes of model states one GPU may hold: the usable part of the card, less ``headroom`` of it."""
    return gpu_bytes * usable * (1 - headroom)


def fitting_stage(params: int, gpu_bytes: float, gpus: int, usable: float, headroom: float) -> int | None:
    """The lowest ZeRO stage (least communication) whose mixed-precision model states fit ``stage_budget``;
    None if even stage 3 does not."""
    budget = stage_budget(gpu_bytes, usable, headroom)
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


@exercise("zero_stage_choice", lesson=LESSON, context=_scenario_context, kind="calculate")
def zero_stage_choice(answer, params, gpu_bytes, gpus, usable, headroom):
    """The lowest ZeRO stage whose per-GPU model states (bf16 weights and gradients, fp32 Adam: 2 + 2 + 12 bytes
    per parameter) fit ``stage_budget``: the usable part of one GPU less ``headroom`` of it (activations)."""
    stage = _as_stage(answer)
    want = fitting_stage(params, gpu_bytes, gpus, usable, headroom)
    budget = stage_budget(gpu_bytes, usable, headroom)
    whole_card = gpu_bytes * (1 - headroom)  # the budget of a learner who forgets the CUDA context and allocator
    need = {s: sum(zero_model_states(params, s, gpus).values()) for s in range(4)}
    table = "; ".join(f"stage {s}: {human_bytes(b)}" for s, b in need.items())
    how = (f"{1 - headroom:.0%} of the {usable:.0%} of {human_bytes(gpu_bytes)} the CUDA context and the allocator "
           "leave usable")
    if stage == want:
        if want is None:
            return True, (f"right: even stage 3 needs {human_bytes(need[3])} per GPU, over the {human_bytes(budget)} "
                          f"budget ({how}): add GPUs, or offload (ZeRO-Offload / ZeRO-Infinity).")
        return True, (f"stage {want}: {human_bytes(need[want])} of model states per GPU fits the {human_bytes(budget)} "
                      f"budget ({how}), and no lower stage does ({table}). Each stage shards more, and stage 3 adds "
                      "a parameter all-gather in every forward and backward: take the lowest stage that fits.")
    if stage is None:
        return False, f"a stage does fit: per GPU, {table}; the budget is {human_bytes(budget)} ({how})."
    if need[stage] > budget:
        if need[stage] <= whole_card:
            return False, (f"stage {stage} needs {human_bytes(need[stage])} per GPU: under {1 - headroom:.0%} of the "
                           f"whole {human_bytes(gpu_bytes)}, but not of the usable {usable:.0%} "
                           f"({human_bytes(budget)}). The CUDA context, cuBLAS workspace and the caching allocator's "
                           "slack take their share before your first tensor (lesson 00).")
        return False, (f"stage {stage} needs {human_bytes(need[stage])} of model states per GPU: over the "
                       f"{human_bytes(budget)} budget ({how}). Use the ZeRO formulas: stage 1 4Ψ + 12Ψ/N, stage 2 "
                       "2Ψ + 14Ψ/N, stage 3 16Ψ/N.")
    if want is None:  # pragma: no cover (a stage that fits makes want a stage)
        return False, "no stage fits this scenario."
    return False, (f"stage {stage} fits ({human_bytes(need[stage])} per GPU), but stage {want} already fits "
                   f"({human_bytes(need[want])}) with less communication; choose the lowest stage that fits.")


# ------------------------------------------------------------------------------------------------
# Exercise 2: the per-rank optimizer state of ZeRO-2 for another model, precision and world size
# ------------------------------------------------------------------------------------------------
@exercise("zero2_optimizer_bytes", lesson=LESSON, context=_course_context, kind="calculate",
          tolerance=OPTIMIZER_TOLERANCE)
def zero2_optimizer_bytes(answer, params, world_size):
    """Bytes of optimizer state one rank holds under DeepSpeed ZeRO-2 with bf16 weights and AdamW: DeepSpeed keeps
    an fp32 master copy and fp32 moments whatever the weights' dtype, 12 bytes per parameter over the ranks,
    within ``OPTIMIZER_TOLERANCE``."""
    import dataclasses

    from ..capstone import course_dims

    value = as_number(answer, "a number of bytes")
    want = 12 * params / world_size
    if close(value, want, OPTIMIZER_TOLERANCE):
        return True, (f"{want:,.0f} bytes ({human_bytes(want)}, {want / 2**20:,.1f} MiB): the fp32 master copy "
                      f"(4 bytes) and AdamW's two fp32 moments (8 bytes) of each of the {params:,} parameters, each "
                      f"rank keeping 1/{world_size} of them. bf16 weights do not make the state 16-bit: DeepSpeed "
                      "keeps it in fp32 (K = 12 in the ZeRO paper). Add AdamW's 4-byte step counter to match a "
                      "measurement to the byte.")
    mid = dataclasses.replace(course_dims(), layers=MID_LAYERS).params if params == course_dims().params else None
    hints = [(6 * params / world_size, "that keeps the master copy and the moments in bf16 (2 bytes each): "
                                       "DeepSpeed's mixed-precision optimizer keeps all three in fp32, whatever "
                                       "the weights' dtype."),
             (4 * params / world_size, "that keeps the moments in bf16 and no master copy: DeepSpeed keeps an fp32 "
                                       "master copy and fp32 moments, 12 bytes per parameter."),
             (8 * params / world_size, "you left out DeepSpeed's fp32 master partition: it keeps one (4 bytes per "
                                       "parameter, sharded like the moments) besides AdamW's two moments."),
             (12 * params / 2, f"that divides by 2 ranks, the lesson's runs: this job has {world_size}."),
             (12 * params, f"that is every parameter's state: ZeRO-1 and up shard the optimizer state over the "
                           f"{world_size} ranks."),
             (8 * params, "that is AdamW's moments for every parameter: they are sharded, and DeepSpeed adds an fp32 "
                          "master partition."),
             (14 * params / world_size, "that adds the bf16 gradient partition (2 bytes per parameter): the "
                                        "question asks for optimizer state only."),
             (16 * params / world_size, "that adds an fp32 gradient partition (4 bytes per parameter, what "
                                        "DeepSpeed's own estimator also counts): the question asks for optimizer "
                                        "state only."),
             (want / 2**20 * 1e6, "that looks like MiB multiplied by 10^6: a MiB is 2^20 bytes (4.9 % more)."),
             (want / 1e6 * 2**20, "that looks like MB multiplied by 2^20: a MB is 10^6 bytes."),
             (8 * want, "that looks like bits; give bytes."),
             (want / 2**20, "that looks like MiB; give bytes."),
             (want / 1e6, "that looks like MB; give bytes.")]
    if mid:
        hints.append((12 * mid / world_size, f"that is the runs' {MID_LAYERS}-block model: the question is about "
                                             "the full course model."))
    for other, hint in hints:
        if close(value, other, 0.005):
            return False, f"you said {value:,.0f}: {hint}"
    return False, (f"you said {value:,.0f}. Count the bytes per parameter DeepSpeed's optimizer keeps (master "
                   "weights and Adam's two moments, in fp32 whatever the weights are), times the parameters, over "
                   "the ranks.")


# ------------------------------------------------------------------------------------------------
# Exercise 3: a DeepSpeed config for ZeRO-2 with the optimizer offloaded to CPU memory, for a scenario
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


def _hint_batch(parsed, world_size: int, micro_batch: int, global_batch: int) -> str | None:
    got = (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps)
    want = (global_batch, micro_batch, global_batch // (micro_batch * world_size))
    if got == want:
        return None
    total, micro, steps = got
    if total != global_batch:
        return (f"DeepSpeed reads a global batch of {total} sequences ({micro} per GPU x {steps} accumulation steps x "
                f"{world_size} GPUs): the job's global batch is {global_batch}.")
    return (f"DeepSpeed reads {micro} sequences per GPU per micro-step: only {micro_batch} fit on a GPU. Set "
            "train_micro_batch_size_per_gpu; DeepSpeed derives the accumulation steps from train_batch_size = "
            "micro-batch x accumulation steps x GPUs.")


@exercise("zero2_offload_config", lesson=LESSON, context=lambda: dict(CONFIG_SCENARIO), kind="code")
def zero2_offload_config(answer, world_size, micro_batch, global_batch):
    """A DeepSpeed config (a dict, as for ``deepspeed.initialize(config=...)`` or a JSON file) for ``CONFIG_SCENARIO``:
    ZeRO-2 with the optimizer state offloaded to CPU memory, bf16, no gradient clipping, the batch split over
    ``world_size`` ranks, and an AdamW optimizer DeepSpeed builds itself (any hyperparameters it accepts).
    Judged by what DeepSpeed's own ``deepspeed.runtime.config.DeepSpeedConfig`` makes of it, as each rank would
    build it."""
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
    left = _autos(answer)
    if left:
        return False, (f"{', '.join(left)} {'is' if len(left) == 1 else 'are'} 'auto': only the HF Trainer and "
                       "Accelerate fill 'auto' in, and this script calls deepspeed.initialize itself: give values.")
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        if key in answer and _whole(answer[key]) is None:
            return False, f"{key} is {answer[key]!r}: a whole number of sequences (1 or more)."
    if not any(k in answer for k in ("train_micro_batch_size_per_gpu", "train_batch_size")):
        return False, ("DeepSpeed needs a batch size: set 'train_batch_size' and/or "
                       "'train_micro_batch_size_per_gpu' (it derives the rest).")
    try:
        parsed, unread = _deepspeed_parse(answer, world_size)
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
    batch = _hint_batch(parsed, world_size, micro_batch, global_batch)
    if batch:
        return False, batch
    if not parsed.bfloat16_config.enabled:
        return False, ("DeepSpeed reads no bf16: mixed precision is DeepSpeed's own section here, "
                       "'bf16': {'enabled': true} (the launcher and the script do not set it).")
    if parsed.gradient_clipping:
        return False, (f"DeepSpeed clips the gradient norm at {parsed.gradient_clipping:g} with this config "
                       "(1.0 is its default when the key is missing): the single-GPU baseline does not clip, so set "
                       "'gradient_clipping': 0.0.")
    name = parsed.optimizer_name
    if name is None:
        return False, ("no optimizer section: the script passes no optimizer, so DeepSpeed must build one from the "
                       "config ('optimizer': {'type': 'AdamW', 'params': {'lr': ...}}). Passing a torch.optim "
                       "optimizer with offload_optimizer is refused unless zero_force_ds_cpu_optimizer is false.")
    problem = _optimizer_problem(parsed) or _scheduler_problem(answer)
    if problem:
        return False, f"deepspeed.initialize would refuse this: {problem}"
    params = dict(parsed.optimizer_params or {})
    if name not in ("adamw", "adam") or (name == "adam" and params.get("adam_w_mode") is False):
        return False, f"DeepSpeed reads optimizer type {name!r}: the job trains with AdamW."
    for key in ("lr", "weight_decay", "eps"):
        if key in params and (type(params[key]) not in (int, float) or params[key] < 0):
            return False, (f"optimizer.params.{key} is {params[key]!r}: DeepSpeedCPUAdam needs a number (0 or more) "
                           "there.")
    steps = global_batch // (micro_batch * world_size)
    return True, (f"DeepSpeed reads ZeRO stage 2 with the optimizer offloaded to the CPU: {micro_batch} sequences "
                  f"per GPU x {steps} accumulation steps x {world_size} GPUs = {global_batch}, bf16, no clipping, "
                  "AdamW built by DeepSpeed (DeepSpeedCPUAdam, since the step runs on the CPU). The fp32 master "
                  "weights, the Adam moments and the gradient partition live in CPU memory; each GPU keeps the bf16 "
                  "weights and the gradient buckets.")
