"""Plan a run before starting it: will it fit this GPU, and what is the cheapest recipe that does?

    plan("llama-3-8b", "T4", batch_size=4, seq_len=1024, lora=True, weights="nf4")   # a Plan: peak, fits, headroom
    cheapest_fit("llama-3-8b", "L4", batch_size=8, seq_len=1024)   # the first recipe on the cost ladder that fits
    planner()                                                      # the same, as widgets (Jupyter)
    largest_batch(model.config, Recipe(seq_len=128), budget)      # the largest batch_size that fits a byte budget

Nothing runs on a device: every answer is ``helpers.estimate.predict``, so it is as good as the prediction for
that recipe (lessons 00 to 09 put it beside measurements). Models are the configs shipped in
``helpers/model_configs`` (``MODELS``), no download; any transformers config works too.

GPU budgets (``GPUS``). A card sold as "16 GB" does not give you 16 GB: the driver shows PyTorch a little less
(``torch.cuda.get_device_properties(0).total_memory`` is 15,102 MiB, about 15.8e9 bytes, on a T4; an H200 sold as
141 GB shows 143,156 MiB), and before the first tensor the CUDA context, cuBLAS workspaces and the caching
allocator's slack take their share. One convention here: the label read in decimal gigabytes (16 GB = 16e9 bytes),
of which ``USABLE`` (90 %) is the budget. A T4's budget is 14.4e9 bytes, 13.4 GiB. Numbers are shown in GiB.
The 10 % left is the headroom "fits" keeps for what the predictor does not count, on a T4: the label's 16e9 bytes
against the 15.8e9 the driver shows (1 %), the CUDA context and cuBLAS workspaces (about 0.3 to 0.5 GiB, 2 to 3 %),
and the caching allocator's fragmentation (blocks reserved but not allocated, typically a few percent of the peak).
A plan that fits with less than a few hundred MiB to spare can still fail: ``Plan.headroom`` says how much is left.

QLoRA rows. ``prepare_model_for_kbit_training`` (lesson 05, the capstone) casts every parameter bitsandbytes left
unquantized (embeddings, lm_head, norms) to fp32, so ``unquantized="fp32"`` is the default; ``unquantized="bf16"``
(or "fp16") plans a model loaded with ``dtype=torch.bfloat16`` and not prepared. On Llama-3-8B the difference is its
1 B embedding and lm_head parameters: about 2 GiB.

Several GPUs (``gpus=N``, ``sharding=``): the per-GPU peak of data parallel training (lesson 09), with each engine's
own buffers as ``helpers.estimate`` models them: "ddp", "zero1", "zero2", "zero3" (DeepSpeed, with the HF Trainer's
``"auto"`` bucket sizes, as in ``configs/deepspeed``) or "fsdp" (FSDP2 full shard). ``batch_size`` is then each
GPU's rows per optimizer step.

Batch sizes mean what ``helpers.estimate.Recipe``'s do: ``batch_size`` is the rows of one optimizer step, split into
``gradient_accumulation_steps`` micro-batches of ``batch_size // gradient_accumulation_steps`` rows
(``Recipe.micro_batch_size``), one forward and backward each.

The cost ladder (``cheapest_fit``, every candidate in order: ``ladder``). Techniques are ordered by what they
cost you, and the cheapest recipe is the first that fits:

    rung   adds                                   costs
    1      nothing: full fine-tune, fp32, AdamW   nothing
    2      gradient checkpointing                 about 30 % more time (each block's forward runs twice)
    3      paged 8-bit AdamW                      a little quality risk (the moments are quantized)
    4      checkpointing and 8-bit AdamW          both
    5-8    rungs 1-4 as LoRA (rank 16, every linear layer) over 16-bit weights: far fewer weights train
    9-12   rungs 1-4 as QLoRA: LoRA over nf4 weights (double quantization): quantization error, slower steps

Each technique costs more than every combination of the cheaper ones, so the ladder counts in binary. Two things
cost nothing and are tried on every rung before the next: gradient accumulation (the same batch in micro-batches
of batch, batch/2, ... 1: no quality lost, only GPU efficiency) and, for a full fine-tune, mixed
precision (autocast in the GPU's 16-bit type, after plain fp32 at each micro-batch; on tensor cores it is faster).
For inference (``training=False``) the ladder is the weight format: fp32, 16-bit, int8, nf4. The ladder plans one
GPU; ``plan(..., gpus=N, sharding="zero3")`` plans several (CPU offload is out of scope).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from functools import cache

from .constants import GiB
from .estimate import Dims, Recipe, predict
from .memory_report import CATEGORIES, LABELS, MemoryReport

USABLE = 0.90  # the share of a card's label the planner budgets (see the module docstring)
LORA_RANK = 16  # lora=True: rank 16 on every linear layer, the QLoRA paper's targets
TECHNIQUES = ("weights", "unquantized", "autocast", "lora", "gradient_checkpointing", "optimizer",
              "gradient_accumulation_steps", "loss_chunk", "training", "gpus", "sharding")  # the toggles plan() takes
SHARDING = {"ddp": ("torch", 0), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3),
            "fsdp": ("torch", 3)}  # sharding= -> (Recipe.engine, Recipe.zero_stage)

# Smallest first: the order of the widget's list.
MODELS = ("smollm2-135m", "smollm2-360m", "smollm2-1.7b", "mistral-7b", "qwen2.5-7b", "llama-3-8b", "qwen2.5-14b",
          "llama-3-70b", "qwen2.5-72b")


@dataclass(frozen=True)
class GPU:
    """A GPU preset: its label in GB and the 16-bit type its tensor cores run (a T4 has no bf16)."""

    name: str
    gb: float
    half: str = "bf16"

    @property
    def budget(self) -> int:
        """Bytes the planner lets a run use: the label in decimal GB, times ``USABLE``."""
        return int(self.gb * 1e9 * USABLE)

    def __str__(self) -> str:
        return f"{self.name} ({self.gb:g} GB, budget {self.budget / GiB:.1f} GiB)"


GPUS = {g.name: g for g in (
    GPU("8 GB", 8), GPU("12 GB", 12),  # consumer cards (RTX 3060 to 4070 class)
    GPU("T4", 16, half="fp16"), GPU("V100 16GB", 16, half="fp16"), GPU("L4", 24), GPU("A10G", 24),
    GPU("RTX 4090", 24), GPU("V100 32GB", 32, half="fp16"), GPU("A100 40GB", 40), GPU("L40S", 48),
    GPU("A100 80GB", 80), GPU("H100", 80), GPU("H200", 141))}


def _gib(n: float) -> str:
    return f"{n / GiB:,.3f} GiB"


# ------------------------------------------------------------------------------------------------
# The batch planner: a byte budget and a recipe
# ------------------------------------------------------------------------------------------------
def fits(config, recipe: Recipe, budget_bytes: float) -> bool:
    """Whether the predicted peak of ``recipe`` stays within ``budget_bytes``."""
    return predict(config, recipe).peak <= budget_bytes


def largest_batch(config, recipe: Recipe, budget_bytes: float, max_batch: int = 256) -> int:
    """The largest ``batch_size`` (rows per optimizer step) whose predicted peak fits ``budget_bytes``, everything
    else as in ``recipe``, its ``gradient_accumulation_steps`` included.

    ``config`` is a transformers config, a dict or ``helpers.estimate.Dims``; ``recipe`` gives the sequence
    length, optimizer, weight format, trainable set, checkpointing and accumulation steps k (its own
    ``batch_size`` is ignored). Batches are tried in whole micro-batches, k, 2k, 3k... rows (micro-batches of
    1, 2, 3... rows), and the search stops at the first one that does not fit, so the next one is predicted not
    to fit whenever the answer is below ``max_batch``. The answer is capped at ``max_batch`` rows (rounded down
    to a multiple of k).

    Raises ``ValueError`` with the predicted peak when even micro-batches of one row do not fit, and for a
    budget that is not positive or a ``max_batch`` below k.
    """
    k = recipe.gradient_accumulation_steps
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    if int(max_batch) != max_batch or max_batch < k:
        raise ValueError(f"max_batch must be a whole number of at least gradient_accumulation_steps ({k}), "
                         f"got {max_batch!r}")
    first = predict(config, recipe.but(batch_size=k))
    if first.peak > budget_bytes:
        smallest = "batch 1" if k == 1 else f"batch {k} (micro-batches of 1 row)"
        raise ValueError(
            f"even {smallest} does not fit: its predicted peak is {_gib(first.peak)} (at {first.moment}), "
            f"above the budget of {_gib(budget_bytes)}. Weights {_gib(first.weights)}, gradients "
            f"{_gib(first.gradients)}, optimizer state {_gib(first.optimizer)} and activations "
            f"{_gib(first.activations)} at that moment: shorten seq_len (now {recipe.seq_len}), turn on "
            "gradient_checkpointing, or shrink the weights, gradients or optimizer state.")
    best = k
    for batch in range(2 * k, int(max_batch) + 1, k):
        if not fits(config, recipe.but(batch_size=batch), budget_bytes):
            break
        best = batch
    return best


# ------------------------------------------------------------------------------------------------
# The memory planner: a model, a GPU, a recipe
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """One recipe for one model on one GPU, with its predicted peak by category."""

    model: str
    gpu: GPU
    batch_size: int  # rows per optimizer step (per GPU): recipe.micro_batch_size x gradient_accumulation_steps
    seq_len: int
    recipe: Recipe
    report: MemoryReport = field(repr=False)
    note: str = ""  # what cheapest_fit found, in a sentence

    @property
    def peak(self) -> int:
        return self.report.peak

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu.budget

    @property
    def headroom(self) -> int:
        """Bytes left under the budget at the peak; negative when it does not fit."""
        return self.gpu.budget - self.peak

    @property
    def label(self) -> str:
        return describe(self.recipe)

    def __str__(self) -> str:
        parts = ", ".join(f"{LABELS[c]} {getattr(self.report, c) / GiB:,.2f}" for c in CATEGORIES)
        moment = f" at {self.report.moment}" if self.report.moment else ""  # which moment of the step
        verdict = (f"fits, {self.headroom / GiB:,.2f} GiB to spare" if self.fits
                   else f"does not fit, {-self.headroom / GiB:,.2f} GiB over")
        text = (f"{self.model} on {self.gpu}: batch {self.batch_size} x {self.seq_len:,} tokens, {self.label}. "
                f"Predicted peak {self.peak / GiB:,.2f} GiB{moment} ({parts} GiB): {verdict}.")
        return text + (f"\n{self.note}" if self.note else "")

    def __repr__(self) -> str:
        return f"<Plan {self}>"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{LABELS[c]}</td><td style='text-align:right'>{getattr(self.report, c) / GiB:,.2f}"
                       "</td></tr>" for c in CATEGORIES)
        colour, word = ("green", "fits") if self.fits else ("#b00", "does not fit")
        spare = f"{abs(self.headroom) / GiB:,.2f} GiB {'to spare' if self.fits else 'over'}"
        note = f"<p>{self.note}</p>" if self.note else ""
        return (f"<p><b>{self.model}</b> on <b>{self.gpu}</b>: batch {self.batch_size} &times; {self.seq_len:,} "
                f"tokens, {self.label}</p><table><tr><th>category</th><th>GiB at peak</th></tr>{rows}"
                f"<tr><td><b>peak</b></td><td style='text-align:right'><b>{self.peak / GiB:,.2f}</b></td></tr>"
                f"</table><p style='color:{colour}'><b>{word}</b>: {spare}</p>{note}")

    def plot(self, ax=None):
        """A stacked bar by category against the GPU's budget line."""
        from .plots import plan_bars

        return plan_bars({"this recipe": self}, ax=ax)


def describe(recipe: Recipe) -> str:
    """A recipe in words: "LoRA r16 over nf4 (double quant) weights, gradient checkpointing, AdamW"."""
    base = recipe.weights + (" (double quant)" if recipe.double_quant and recipe.weights in ("nf4", "fp4") else "")
    if recipe.weights in ("int8", "nf4", "fp4"):
        base += f" weights (the rest {recipe.unquantized})"
    else:
        base += " weights"
    if not recipe.training:
        return f"inference, {base}"
    if recipe.lora_rank:
        words = [f"LoRA r{recipe.lora_rank} over {base}"]
    elif recipe.trainable_blocks is not None:
        words = [f"{recipe.trainable_at} {recipe.trainable_blocks} blocks trained, {base}"]
    else:
        words = [f"full fine-tune, {base}"]
    if recipe.autocast:
        words.append(f"{recipe.autocast} autocast")
    if recipe.gradient_checkpointing:
        words.append("gradient checkpointing")
    words.append({"adamw": "AdamW", "adamw8bit": "8-bit AdamW", "paged_adamw8bit": "paged 8-bit AdamW",
                  "adafactor": "Adafactor"}.get(recipe.optimizer, recipe.optimizer))
    if recipe.gradient_accumulation_steps > 1:
        words.append(f"micro-batch {recipe.micro_batch_size} x {recipe.gradient_accumulation_steps} accumulation steps")
    if 0 < recipe.loss_chunk < recipe.seq_len:
        words.append(f"the loss in chunks of {recipe.loss_chunk:,} positions")
    if recipe.world_size > 1:
        engine = next(k for k, v in SHARDING.items() if v == (recipe.engine, recipe.zero_stage))
        words.append(f"{engine.upper() if engine in ('ddp', 'fsdp') else 'ZeRO-' + engine[-1]} over "
                     f"{recipe.world_size} GPUs" + (" (optimizer offloaded)" if recipe.offload_optimizer else ""))
    return ", ".join(words)


@cache
def _config(name: str):
    from .models import reference_config

    return reference_config(name)


def _model(model):
    """(name, config) for a name in MODELS (any shipped config works) or a config given directly."""
    if not isinstance(model, str):
        return getattr(model, "_name_or_path", "") or "custom model", model
    try:
        return model, _config(model.lower())
    except ValueError:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}, "
                         "or pass a transformers config") from None


def _gpu(gpu) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    key = "".join(ch for ch in str(gpu).lower() if ch.isalnum())
    for preset in GPUS.values():
        if "".join(ch for ch in preset.name.lower() if ch.isalnum()) == key:
            return preset
    raise ValueError(f"unknown GPU {gpu!r}: choose one of {', '.join(GPUS)}, or pass GPU(name, gb) for another card")


def _whole(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


def _recipe(gpu: GPU, batch_size: int, seq_len: int, *, training=True, weights="fp32", unquantized="fp32",
            autocast=None, lora=False, gradient_checkpointing=False, optimizer="adamw", gradient_accumulation_steps=1,
            loss_chunk=0, gpus=1, sharding="zero3", config=None) -> Recipe:
    steps = _whole("gradient_accumulation_steps", gradient_accumulation_steps)
    if batch_size % steps:
        raise ValueError(f"batch_size {batch_size} (rows per optimizer step) does not split into {steps} equal "
                         "micro-batches: gradient_accumulation_steps must divide it")
    if autocast is True:  # a checkbox: the GPU's own 16-bit type
        autocast = gpu.half
    rank = LORA_RANK if lora is True else int(lora or 0)
    gpus = _whole("gpus", gpus)
    if sharding not in SHARDING:
        raise ValueError(f"sharding={sharding!r}: choose one of {', '.join(SHARDING)}")
    engine, stage = SHARDING[sharding] if gpus > 1 else ("torch", 0)
    shard = {}
    if engine == "deepspeed":  # the HF Trainer's "auto" values (configs/deepspeed); moments beside the fp32 master
        hidden = Dims.of(config).hidden
        shard = dict(reduce_bucket_size=hidden * hidden, prefetch_bucket_size=int(0.9 * hidden * hidden),
                     param_persistence_threshold=10 * hidden, state_dtype="fp32")
    # A 4-bit base uses double quantization, as in the QLoRA recipe; what bitsandbytes leaves unquantized is fp32
    # after prepare_model_for_kbit_training (module docstring).
    return Recipe(batch_size=batch_size, seq_len=seq_len, training=training, weights=weights,
                  double_quant=weights in ("nf4", "fp4"), unquantized=unquantized,
                  optimizer=optimizer if training else "none", autocast=autocast or None, lora_rank=rank,
                  lora_targets="all-linear", gradient_checkpointing=gradient_checkpointing and training,
                  gradient_accumulation_steps=steps, loss_chunk=int(loss_chunk or 0) if training else 0, device="cuda",
                  world_size=gpus, engine=engine, zero_stage=stage, **shard)


def plan(model, gpu, batch_size: int = 1, seq_len: int = 512, **techniques) -> Plan:
    """Predict one recipe on one GPU: ``plan("smollm2-135m", "T4", batch_size=8, seq_len=512)``.

    ``model``: a name in ``MODELS`` (or a transformers config); ``gpu``: a name in ``GPUS`` (spaces, case and
    dashes do not matter: "a100-80gb") or ``GPU(name, gb)``; ``batch_size``: rows per optimizer step, split into
    ``gradient_accumulation_steps`` micro-batches. Technique toggles, as ``helpers.estimate.Recipe`` has them:
    ``weights`` ("fp32", "bf16", "fp16", "int8", "nf4"), ``unquantized`` (the dtype of what a quantized base leaves
    unquantized: "fp32" after ``prepare_model_for_kbit_training``, the default; "bf16" or "fp16"), ``autocast``
    (None, "bf16", "fp16", or True for the GPU's 16-bit type), ``lora`` (False, True for rank 16 on every linear
    layer, or a rank), ``gradient_checkpointing``,
    ``optimizer`` ("adamw", "adamw8bit", "paged_adamw8bit", "adafactor", "sgd"), ``gradient_accumulation_steps``,
    ``loss_chunk`` (positions of every row per chunk of the loss, lesson 10; 0: the plain loss), ``training``
    (False: one forward pass, no KV cache), and ``gpus`` with ``sharding`` ("ddp", "zero1", "zero2",
    "zero3", "fsdp"): the peak per GPU, ``batch_size`` per GPU. Raises ``ValueError`` naming the valid choices.
    """
    unknown = sorted(set(techniques) - set(TECHNIQUES))
    if unknown:
        raise ValueError(f"plan() has no toggle {', '.join(unknown)}: choose among {', '.join(TECHNIQUES)}")
    name, config = _model(model)
    gpu = _gpu(gpu)
    batch_size, seq_len = _whole("batch_size", batch_size), _whole("seq_len", seq_len)
    recipe = _recipe(gpu, batch_size, seq_len, config=config, **techniques)
    return Plan(name, gpu, batch_size, seq_len, recipe, predict(config, recipe))


def ladder(gpu, batch_size: int, seq_len: int, training: bool = True) -> list[tuple[str, Recipe]]:
    """Every recipe ``cheapest_fit`` tries, cheapest first, each with its rung's name (module docstring)."""
    gpu = _gpu(gpu)
    batch_size, seq_len = _whole("batch_size", batch_size), _whole("seq_len", seq_len)
    if not training:  # loading only: 16-bit costs nothing, int8 time, nf4 some quality
        return [(f"{w} weights", _recipe(gpu, batch_size, seq_len, training=False, weights=w))
                for w in ("fp32", gpu.half, "int8", "nf4")]
    bases = (("full fine-tune", {}), ("LoRA", {"lora": True, "weights": gpu.half}),
             ("QLoRA", {"lora": True, "weights": "nf4"}))
    extras = (("", {}), (" + checkpointing", {"gradient_checkpointing": True}),
              (" + 8-bit AdamW", {"optimizer": "paged_adamw8bit"}),
              (" + checkpointing + 8-bit AdamW", {"gradient_checkpointing": True, "optimizer": "paged_adamw8bit"}))
    micro = [batch_size // k for k in range(1, batch_size + 1) if batch_size % k == 0]  # micro-batch rows, largest 1st
    rungs = []
    for base, base_toggles in bases:
        for extra, extra_toggles in extras:
            for m in micro:
                for amp in ((False, True) if base == "full fine-tune" else (False,)):
                    rungs.append((base + extra, _recipe(gpu, batch_size, seq_len, autocast=amp, **base_toggles,
                                                        **extra_toggles, gradient_accumulation_steps=batch_size // m)))
    return rungs


def cheapest_fit(model, gpu, batch_size: int = 1, seq_len: int = 512, training: bool = True) -> Plan:
    """The first recipe on the cost ladder (``ladder``, module docstring) whose predicted peak fits ``gpu``.

    If nothing fits, the plan with the smallest peak comes back, ``fits`` False, and its ``note`` says so.
    """
    name, config = _model(model)
    gpu = _gpu(gpu)
    candidates = ladder(gpu, batch_size, seq_len, training)
    rungs = list(dict.fromkeys(rung for rung, _ in candidates))
    plans = []
    for rung, recipe in candidates:
        p = Plan(name, gpu, batch_size, seq_len, recipe, predict(config, recipe))
        if p.fits:
            return replace(p, note=f"Cheapest recipe that fits: rung {rungs.index(rung) + 1} of {len(rungs)} on "
                                   f"the cost ladder, {rung}.")
        plans.append(p)
    best = min(plans, key=lambda p: p.peak)
    note = (f"Nothing on the cost ladder fits {gpu.name} at batch {batch_size} x {seq_len:,} tokens: the smallest "
            f"predicted peak is {best.peak / GiB:,.2f} GiB ({best.label}), {-best.headroom / GiB:,.2f} GiB over the "
            f"budget of {gpu.budget / GiB:,.2f} GiB. Shorten seq_len, choose a larger GPU, or shard across several "
            "(lesson 09; plan(..., gpus=8, sharding='zero3')).")
    return replace(best, note=note)


def planner(**start):
    """The interactive planner (ipywidgets, imported only now): ``planner(model="llama-3-8b", gpu="T4")``."""
    from .planner_widget import PlannerApp

    return PlannerApp(**start)



# ------------------------------------------------------------------------------------------------
# Generation: weights plus one KV cache per request (lesson 11)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationPlan:
    """How many requests of ``context`` tokens each can generate at once on one GPU.

    ``weights``: the model in its format; ``per_request``: one request's KV cache at its full context; ``temporaries``:
    the prefill of one request's prompt (requests are prefilled one at a time, as serving engines do; ``generate``
    with a batch prefills them together and needs ``batch`` times that); ``requests``: the most whose caches fit
    beside the rest under the budget (0 when not even one does)."""

    model: str
    gpu: GPU
    context: int
    dtype: str
    attn: str
    weights: int
    per_request: int
    temporaries: int

    @property
    def requests(self) -> int:
        free = self.gpu.budget - self.weights - self.temporaries
        return max(0, free // self.per_request)

    def peak(self, requests: int | None = None) -> int:
        """Predicted bytes with ``requests`` caches full (default: ``self.requests``)."""
        n = self.requests if requests is None else requests
        return self.weights + self.temporaries + n * self.per_request

    def __str__(self) -> str:
        return (f"{self.model} on {self.gpu}, {self.dtype} weights and cache, {self.attn} attention: weights "
                f"{self.weights / GiB:,.2f} GiB, one prefill of {self.context:,} tokens "
                f"{self.temporaries / GiB:,.2f} GiB, KV cache {self.per_request / GiB:,.3f} GiB per request of "
                f"{self.context:,} tokens: {self.requests} concurrent request{'s' if self.requests != 1 else ''} fit.")

    def __repr__(self) -> str:
        return f"<GenerationPlan {self}>"


def plan_generation(model, gpu, context: int = 8192, dtype: str = "bf16", attn: str = "sdpa",
                    weights: str | None = None) -> GenerationPlan:
    """How many concurrent ``context``-token requests fit ``gpu``: ``plan_generation("llama-3-8b", "L4").requests``.

    ``dtype``: the model's compute type ("bf16", "fp16", "fp32"), which is the cache's; ``weights``: the weight format
    if different ("int8", "nf4": quantized weights, the rest in ``dtype``); ``attn``: "sdpa" (fused, no score
    matrix) or "eager" (the scores and a causal mask of context x context, ``helpers.generation``). The budget is
    the card's ``USABLE`` share, as for training."""
    from . import generation

    name, config = _model(model)
    gpu = _gpu(gpu)
    context = _whole("context", context)
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"dtype={dtype!r}: choose bf16, fp16 or fp32 (the cache's type)")
    fmt = weights or dtype
    w = predict(config, Recipe(training=False, weights=fmt, unquantized=dtype, optimizer="none", batch_size=1,
                               seq_len=1, device="cuda")).weights
    temps = (generation.prefill_temporaries_bytes(config, context, 1, dtype, attn)
             + generation.logits_bytes(config, 1))
    return GenerationPlan(name, gpu, context, dtype, attn, w, generation.kv_cache_bytes(config, context, 1, dtype),
                          temps)
