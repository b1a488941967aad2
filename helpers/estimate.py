"""Predict memory by category from a model config and a recipe, without running the model.

    predict(config, Recipe(batch_size=4, seq_len=128))                  # fp32 AdamW full fine-tune
    predict(config, Recipe(training=False, weights="nf4"))               # 4-bit inference
    predict(config, Recipe(lora_rank=16, lora_targets=("q_proj", "v_proj")))   # LoRA adapters only
    predict(config, Recipe(weights="nf4", double_quant=True, lora_rank=16, lora_targets="all-linear",
                           gradient_checkpointing=True, optimizer="paged_adamw8bit"))   # QLoRA
    predict(config, Recipe(batch_size=8, autocast="bf16"))              # mixed precision, fp32 master weights
    predict(config, Recipe(batch_size=8, gradient_accumulation_steps=4, optimizer="adafactor"))   # 4 x 2 rows
    predict(config, Recipe(engine="deepspeed", zero_stage=2, world_size=8))   # per rank, lesson 09

The prediction uses the same categories as ``helpers.memory`` and the same moment: the peak of one
steady-state training step (optimizer state already allocated, gradients freed by
``zero_grad(set_to_none=True)``), or of one forward pass without gradients for inference.

Every term is a count of tensors the PyTorch / transformers code keeps alive, written out below for a
Llama-style decoder (SmolLM2, Llama, Mistral, Qwen2): nothing is fitted to measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .memory_report import CATEGORIES, MemoryReport

BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
QUANTIZED = ("int8", "nf4", "fp4")
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4, "sgd_momentum": 4, "sgd_plain": 0, "none": 0}
# bitsandbytes' 8-bit AdamW (paged or not): two uint8 moments per parameter, each with one fp32 absmax per
# block of 256; tensors under 4,096 elements keep two fp32 moments. Paging changes where the state lives
# (CUDA unified memory, evicted to CPU RAM under pressure), not its size; on the CPU it is not paged at all.
EIGHT_BIT_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit")
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256
BNB_QMAPS = 2 * 256 * 4  # the two 256-entry fp32 code tables, shared by every parameter
# Adafactor as ``TrainingArguments(optim="adafactor")`` builds it (transformers' Adafactor, no first moment):
# a matrix keeps one fp32 second-moment value per row and per column instead of one per element, a vector
# keeps a full fp32 second moment; each tensor also keeps an fp32 RMS scalar. torch.optim.Adafactor stores
# the same bytes (a step tensor instead of the RMS).
ADAFACTOR = "adafactor"
# GaLore's AdamW (galore-torch; TrainingArguments(optim="galore_adamw", optim_target_modules=["attn", "mlp"])): each
# decoder-block matrix keeps its moments in a rank-r projection of its gradient — (out x r) when out >= in, else
# (r x in) — plus the projection, r x min(out, in). For fp32 weights that projection is a slice of the gradient's
# SVD factor, and a slice keeps its whole storage alive: min(out, in)^2 values, whatever r. Every other parameter
# keeps two full moments. Its step counter is a Python int: no bytes.
GALORE = "galore_adamw"
OPTIMIZERS = (*OPTIMIZER_STATE_BYTES, *EIGHT_BIT_OPTIMIZERS, ADAFACTOR, GALORE)  # every Recipe(optimizer=...) name
# The linear layers of a Llama-style block, in the order of ``Dims.linear_shapes``, by their module names.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Dims:
    """The shapes that decide memory, read from a transformers config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> Dims:
        if isinstance(config, Dims):
            return config
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(layers=get("num_hidden_layers"), hidden=hidden,
                   intermediate=get("intermediate_size"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or hidden // heads, vocab=get("vocab_size"),
                   tied=bool(get("tie_word_embeddings", False)))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def named_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``linear_shapes`` by module name: {"q_proj": (out, in), ...}."""
        return dict(zip(LINEAR_NAMES, self.linear_shapes(), strict=True))

    def lora_params(self, rank: int, targets=LINEAR_NAMES) -> int:
        """Adapter parameters in one block: r x (in + out) for each targeted linear layer (A is r x in, B out x r)."""
        return sum(rank * (o + i) for name, (o, i) in self.named_linear_shapes().items() if name in targets)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of the linear layers in one decoder block."""
        h, i = self.hidden, self.intermediate
        return [(self.q_dim, h), (self.kv_dim, h), (self.kv_dim, h), (h, self.q_dim),
                (i, h), (i, h), (h, i)]

    @property
    def block_linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes())

    @property
    def block_params(self) -> int:
        return self.block_linear_params + 2 * self.hidden  # + two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def unquantized_params(self) -> int:
        """What bitsandbytes leaves unquantized: the embedding (and an untied lm_head) and every RMSNorm."""
        return self.embedding_params * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.layers * self.block_params + self.hidden + self.embedding_params + head


@dataclass(frozen=True)
class Recipe:
    """How the model is run. Defaults: fp32 weights, AdamW, every parameter trained."""

    batch_size: int = 1  # rows per optimizer step (per rank under data parallelism)
    seq_len: int = 128
    training: bool = True
    weights: str = "fp32"  # fp32 | bf16 | fp16 | int8 | nf4 | fp4
    double_quant: bool = False  # 4-bit only: quantize the quantization constants too
    unquantized: str = "fp32"  # dtype bitsandbytes leaves embeddings, norms and lm_head in
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit | adafactor | sgd (momentum) | sgd_plain | none
    state_dtype: str | None = None  # the moments' dtype; None: the trainable parameters' own (PyTorch's default)
    trainable_blocks: int | None = None  # None: everything; k: only the last k blocks + final norm
    trainable_at: str = "top"  # with trainable_blocks=k: "top" (last k + final norm) or "bottom" (first k only)
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1  # micro-batches per step, of micro_batch_size rows each; gradients summed
    device: str = "cpu"  # cpu | cuda: PyTorch's default optimizer implementation differs
    autocast: str | None = None  # "bf16" | "fp16": the forward under torch.autocast, fp32 master weights (lesson 06)
    lora_rank: int = 0  # > 0: train only LoRA adapters of this rank (peft); the base model is frozen
    lora_targets: tuple[str, ...] | str = LINEAR_NAMES  # module names, or "all-linear" as in LoraConfig
    lora_dropout: float = 0.0  # > 0 makes each adapter keep its own dropped-out copy of its input
    # Data parallel over ``world_size`` ranks (lesson 09); the prediction is per rank and ``batch_size`` is each
    # rank's rows per optimizer step. ``zero_stage`` 0 replicates everything (DDP), 1 shards optimizer state, 2 also
    # gradients, 3 also weights (FSDP full shard is stage 3). ``engine="deepspeed"`` adds DeepSpeed's fp32 master
    # partition to the optimizer state (it keeps one whatever the weights' dtype) and steps its flat partition as
    # one tensor. ``offload_optimizer`` moves optimizer state and gradient partition to CPU memory (nothing moves
    # when the device is the CPU). DeepSpeed at zero_stage=0 is plain data parallel, like DDP.
    zero_stage: int = 0
    world_size: int = 1
    engine: str = "torch"  # torch (DDP, FSDP) | deepspeed
    offload_optimizer: bool = False
    optimizer_in_backward: bool = False  # each parameter stepped inside backward as its gradient arrives (lesson 08)
    galore_rank: int = 128  # optimizer="galore_adamw": the projection's rank (HF Trainer's default)
    # > 0: the loss computed ``loss_chunk`` positions of every row at a time, each chunk's logits recomputed in
    # backward (``helpers.loss.chunked_causal_lm_loss``, lesson 10); 0: transformers' loss over the whole batch.
    loss_chunk: int = 0
    # The engines' own buffers (``_shard``), each setting with its library's default. DDP: its all-reduce buckets
    # hold every gradient whatever ``bucket_cap_mb`` (which only groups them), beside the .grads unless each .grad
    # is a view into its bucket. FSDP2: each block's full parameters are gathered for its forward and backward and
    # freed after, unless ``reshard_after_forward=False`` keeps them from forward to backward. DeepSpeed (element
    # counts, as in its config): the gradient reduction bucket, the stage-3 prefetch, the parameters too small to
    # partition, and how far ahead a gathered parameter that will be used again is kept.
    gradient_as_bucket_view: bool = False  # DistributedDataParallel(gradient_as_bucket_view=...)
    reshard_after_forward: bool = True  # fully_shard(..., reshard_after_forward=...)
    reduce_bucket_size: int = 500_000_000  # zero_optimization.reduce_bucket_size
    overlap_comm: bool | None = None  # zero_optimization.overlap_comm; None: DeepSpeed's default (stage 3 only)
    prefetch_bucket_size: int = 50_000_000  # zero_optimization.stage3_prefetch_bucket_size
    param_persistence_threshold: int = 100_000  # zero_optimization.stage3_param_persistence_threshold
    max_reuse_distance: int = 1_000_000_000  # zero_optimization.stage3_max_reuse_distance

    def __post_init__(self):
        if self.lora_targets == "all-linear":
            object.__setattr__(self, "lora_targets", LINEAR_NAMES)
        elif isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", (self.lora_targets,))
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        unknown = [t for t in self.lora_targets if t not in LINEAR_NAMES]
        if unknown or (self.lora_rank and not self.lora_targets):
            raise ValueError(f"Recipe(lora_targets={self.lora_targets!r}): choose among {', '.join(LINEAR_NAMES)} "
                             "or 'all-linear'")
        if int(self.lora_rank) != self.lora_rank or self.lora_rank < 0:
            raise ValueError(f"Recipe(lora_rank={self.lora_rank!r}): a whole number, 0 for no LoRA")
        if self.lora_rank and self.trainable_blocks is not None:
            raise ValueError("Recipe: give lora_rank or trainable_blocks, not both (LoRA freezes every base weight)")
        formats = (*BYTES, *QUANTIZED)
        if self.weights not in formats:
            raise ValueError(f"Recipe(weights={self.weights!r}): choose one of {', '.join(formats)}")
        if self.unquantized not in BYTES:
            raise ValueError(f"Recipe(unquantized={self.unquantized!r}): choose one of {', '.join(BYTES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Recipe(optimizer={self.optimizer!r}): choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.state_dtype is not None and self.state_dtype not in BYTES:
            raise ValueError(f"Recipe(state_dtype={self.state_dtype!r}): None or one of {', '.join(BYTES)}")
        steps = self.gradient_accumulation_steps
        if int(steps) != steps or steps < 1:
            raise ValueError(f"Recipe(gradient_accumulation_steps={steps!r}): a whole number, 1 for none")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"Recipe(batch_size={self.batch_size!r}): a whole number of rows per optimizer step, "
                             "1 or more")
        if self.batch_size % steps:
            raise ValueError(f"Recipe(batch_size={self.batch_size}, gradient_accumulation_steps={steps}): the batch "
                             f"does not split into {steps} equal micro-batches; batch_size is the rows of one "
                             "optimizer step, so make it a multiple of gradient_accumulation_steps")
        if self.autocast is not None:
            if self.autocast not in ("bf16", "fp16"):
                raise ValueError(f"Recipe(autocast={self.autocast!r}): None, 'bf16' or 'fp16'")
            if self.weights != "fp32" or self.lora_rank or self.trainable_blocks is not None:
                raise ValueError("Recipe(autocast=...): modelled for full training with fp32 (master) weights only; "
                                 "16-bit weights without autocast are weights='bf16'")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"Recipe(zero_stage={self.zero_stage!r}): 0 (plain data parallel), 1, 2 or 3")
        if int(self.world_size) != self.world_size or self.world_size < 1:
            raise ValueError(f"Recipe(world_size={self.world_size!r}): a whole number of ranks, 1 or more")
        if self.engine not in ("torch", "deepspeed"):
            raise ValueError(f"Recipe(engine={self.engine!r}): 'torch' (DDP, FSDP) or 'deepspeed'")
        if self.engine == "torch" and self.zero_stage in (1, 2):
            raise ValueError("Recipe(engine='torch'): DDP is zero_stage=0 and FSDP full shard zero_stage=3; "
                             "stages 1 and 2 are engine='deepspeed'")
        if self.offload_optimizer and (self.engine != "deepspeed" or not self.zero_stage):
            raise ValueError("Recipe(offload_optimizer=True): ZeRO-Offload needs engine='deepspeed' and "
                             "zero_stage >= 1")
        for name in ("reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold",
                     "max_reuse_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"Recipe({name}={value!r}): a whole number of elements, as in the DeepSpeed config")
        if int(self.loss_chunk) != self.loss_chunk or self.loss_chunk < 0:
            raise ValueError(f"Recipe(loss_chunk={self.loss_chunk!r}): a whole number of positions, 0 for the plain "
                             "loss")
        if self.optimizer_in_backward and (self.gradient_accumulation_steps > 1 or self.world_size > 1):
            raise ValueError("Recipe(optimizer_in_backward=True): each gradient is consumed the moment it is ready, "
                             "so there is nothing to accumulate or all-reduce (gradient_accumulation_steps and "
                             "world_size must be 1)")
        if self.trainable_at not in ("top", "bottom"):
            raise ValueError(f"Recipe(trainable_at={self.trainable_at!r}): choose one of top, bottom")

    @property
    def micro_batch_size(self) -> int:
        """Rows in one forward and backward: ``batch_size // gradient_accumulation_steps``."""
        return self.batch_size // self.gradient_accumulation_steps

    def but(self, **changes) -> Recipe:
        return replace(self, **changes)


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def _quantized_linear_bytes(out_f: int, in_f: int, recipe: Recipe) -> int:
    n = out_f * in_f
    if recipe.weights == "int8":
        return n + 4 * out_f  # int8 weight + one fp32 scale per output row (SCB)
    blocks = -(-n // 64)  # 4-bit: blocks of 64 weights share one absmax
    codes = -(-n // 2)  # two 4-bit codes per byte
    table = 16 * 4  # each layer's 16-entry fp32 lookup table (NF4 or FP4 levels)
    if not recipe.double_quant:
        return codes + 4 * blocks + table
    # Double quantization: absmax stored as uint8, itself scaled by one fp32 per 256 blocks
    # (plus a 256-entry code table and an fp32 offset).
    return codes + blocks + 4 * (-(-blocks // 256)) + 256 * 4 + 4 + table


def rotary_buffer_bytes(d: Dims) -> int:
    """The rotary embedding's two fp32 buffers of inverse frequencies (head_dim / 2 each)."""
    return 2 * (d.head_dim // 2) * 4


def weight_bytes(config, recipe: Recipe = Recipe()) -> int:
    """Parameters and quantization constants, as stored."""
    d = Dims.of(config)
    if recipe.weights in QUANTIZED:
        linear = sum(_quantized_linear_bytes(o, i, recipe) for o, i in d.linear_shapes())
        return d.layers * linear + d.unquantized_params * BYTES[recipe.unquantized] + rotary_buffer_bytes(d)
    return d.params * BYTES[recipe.weights] + rotary_buffer_bytes(d)


def lora_bytes(config, recipe: Recipe) -> int:
    """The adapters' weights: fp32 (peft's default, whatever the base model's dtype)."""
    d = Dims.of(config)
    return d.layers * d.lora_params(recipe.lora_rank, recipe.lora_targets) * 4


def trainable_params(config, recipe: Recipe = Recipe()) -> int:
    return sum(trainable_tensor_sizes(config, recipe))


def trainable_tensors(config, recipe: Recipe = Recipe()) -> int:
    """How many parameter tensors train (each gets its own optimizer step counter)."""
    return len(trainable_tensor_sizes(config, recipe))


def trainable_tensor_sizes(config, recipe: Recipe = Recipe()) -> list[int]:
    """The number of elements of every trainable tensor (what per-tensor optimizer rules need)."""
    return [math.prod(shape) for shape in trainable_tensor_shapes(config, recipe)]


def trainable_tensor_shapes(config, recipe: Recipe = Recipe()) -> list[tuple[int, ...]]:
    """The shape of every trainable tensor (Adafactor's factored state needs rows and columns)."""
    d = Dims.of(config)
    if not recipe.training:
        return []
    if recipe.lora_rank:
        shapes = d.named_linear_shapes()
        r = recipe.lora_rank
        per_block = [s for t in recipe.lora_targets for s in ((r, shapes[t][1]), (shapes[t][0], r))]
        return per_block * d.layers  # A (r x in) and B (out x r) of each adapter
    block = list(d.linear_shapes()) + [(d.hidden,), (d.hidden,)]
    if recipe.trainable_blocks is None:
        head = [] if d.tied else [(d.vocab, d.hidden)]
        return block * d.layers + [(d.vocab, d.hidden), (d.hidden,)] + head
    final_norm = [(d.hidden,)] if recipe.trainable_at == "top" else []
    return block * min(recipe.trainable_blocks, d.layers) + final_norm


def optimizer_state_bytes(config, recipe: Recipe = Recipe()) -> int:
    """Optimizer state once allocated (after the first step): moments, plus Adam's fp32 step counter per
    tensor in PyTorch; bitsandbytes' 8-bit AdamW as described at ``EIGHT_BIT_OPTIMIZERS``; Adafactor as
    described at ``ADAFACTOR``."""
    if recipe.optimizer == ADAFACTOR:
        return sum(4 * (shape[0] + shape[1] if len(shape) == 2 else math.prod(shape)) + 4
                   for shape in trainable_tensor_shapes(config, recipe))
    if recipe.optimizer == GALORE:
        projected = set(Dims.of(config).linear_shapes())
        state = 0
        for shape in trainable_tensor_shapes(config, recipe):
            if shape in projected and not recipe.lora_rank:
                r = min(recipe.galore_rank, *shape)
                projection = min(shape) ** 2 if recipe.weights == "fp32" else r * min(shape)
                state += 4 * 2 * max(shape) * r + BYTES[recipe.weights] * projection
            else:
                state += 8 * math.prod(shape)
        return state
    sizes = trainable_tensor_sizes(config, recipe)
    if recipe.optimizer in EIGHT_BIT_OPTIMIZERS:
        small = sum(n for n in sizes if n < BNB_MIN_8BIT_SIZE)
        large = [n for n in sizes if n >= BNB_MIN_8BIT_SIZE]
        return 8 * small + sum(2 * n + 2 * 4 * -(-n // BNB_BLOCK) for n in large) + (BNB_QMAPS if large else 0)
    param_bytes = 4 if recipe.weights in QUANTIZED or recipe.lora_rank else BYTES[recipe.weights]
    moment_bytes = BYTES[recipe.state_dtype] if recipe.state_dtype else param_bytes
    state = sum(sizes) * OPTIMIZER_STATE_BYTES[recipe.optimizer] // 4 * moment_bytes
    if recipe.optimizer in ("adamw", "adam"):
        state += 4 * len(sizes)
    return state


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------
def block_activation_bytes(config, tokens: int, act_bytes: int = 4) -> int:
    """Bytes one decoder block saves for backward (fp32, SDPA attention), per the forward code:
    two RMSNorms save 2 x hidden each (normalised input, scaled output); two residual sums; the
    attention keeps q and k after rotary embedding, v and the output (plus a log-sum-exp per head);
    the MLP keeps gate, up, silu(gate) and their product (4 x intermediate)."""
    d = Dims.of(config)
    per_token = (4 * d.hidden + 2 * d.hidden + 2 * d.q_dim + 2 * d.kv_dim + 4 * d.intermediate) * act_bytes
    return tokens * (per_token + 4 * d.heads)


def autocast_block_activation_bytes(config, tokens: int) -> int:
    """What a decoder block saves for backward when its forward runs under 16-bit autocast with fp32 weights.
    Autocast runs the linear layers in 16 bit and leaves the rest in the input's dtype: the residual stream
    and the RMSNorms stay fp32 (Llama's norm upcasts), so each norm keeps its fp32 input and normalised
    value, but its scaled output is kept only as the 16-bit copy each linear layer makes of its input, one
    per layer (q, k, v read the first norm; gate and up the second). What the linear layers produce (q, k,
    v, the attention output, the MLP's four intermediates) is 16-bit. Not counted here: the 16-bit copy of
    each weight, which the block also keeps until its backward (``predict`` counts it)."""
    d = Dims.of(config)
    per_token = 4 * d.hidden * 4 + 5 * d.hidden * 2 + (2 * d.q_dim + 2 * d.kv_dim + 4 * d.intermediate) * 2
    return tokens * (per_token + 4 * d.heads)


def frozen_block_activation_bytes(config, tokens: int, act_bytes: int = 4) -> int:
    """What a *frozen* decoder block saves when backpropagation must still pass through it (a
    trainable block below it): only what the input's gradient needs. Compared with
    ``block_activation_bytes`` it drops the tensors kept for weight gradients: each RMSNorm's
    normalised input and scaled output (the linear layers' inputs) and the MLP product (the down
    projection's input), 4 x hidden + intermediate per token."""
    d = Dims.of(config)
    return block_activation_bytes(d, tokens, act_bytes) - tokens * (4 * d.hidden + d.intermediate) * act_bytes


def lora_block_activation_bytes(config, tokens: int, recipe: Recipe, act_bytes: int = 4) -> int:
    """What a decoder block with LoRA adapters (frozen base) saves for backward: what a frozen block
    saves, plus what the adapters' weight gradients need. Each adapter keeps the output of its A
    (r numbers per token). Without dropout, A reads the very tensor the base layer reads, so the
    attention's input (for q, k, v), the MLP's input (gate, up) and the MLP product (down) are kept
    once each; o_proj's input, the attention output, is kept by attention anyway. With dropout (on
    the CPU: input x a random scaled mask) each adapter keeps its own dropped-out copy of its input
    and the mask, both in the activations' dtype."""
    d = Dims.of(config)
    targets = recipe.lora_targets
    per_token = len(targets) * recipe.lora_rank * act_bytes
    if recipe.lora_dropout > 0:
        shapes = d.named_linear_shapes()
        per_token += sum(shapes[t][1] * 2 * act_bytes for t in targets)  # in_features of each adapted layer
    else:
        kept = [d.hidden if {"q_proj", "k_proj", "v_proj"} & set(targets) else 0,
                d.hidden if {"gate_proj", "up_proj"} & set(targets) else 0,
                d.intermediate if "down_proj" in targets else 0]
        per_token += sum(kept) * act_bytes
    if recipe.weights == "int8":  # and every int8 layer keeps its input (``int8_kept_bytes``)
        per_token = len(targets) * recipe.lora_rank * act_bytes + (2 * d.hidden + d.intermediate) * act_bytes
        if recipe.lora_dropout > 0:
            shapes = d.named_linear_shapes()
            per_token += sum(shapes[t][1] * 2 * act_bytes for t in targets)
    return frozen_block_activation_bytes(d, tokens, act_bytes) + tokens * per_token


def int8_kept_bytes(config, tokens: int, act_bytes: int = 4) -> int:
    """What a block of bitsandbytes int8 layers keeps for backward outside autograd's saved tensors. Its matmul
    (``MatMul8bitFp`` on the CPU, ``MatMul8bitLt`` on CUDA) stores its input on the autograd context
    (``ctx.A``, ``ctx.tensors``) whenever the input requires grad, even though only the frozen weight is needed
    for the input's gradient. So each layer's input is kept: the attention's input (q, k, v share it), the
    attention output (o_proj), the MLP's input (gate, up) and the MLP product (down). Gradient checkpointing
    drops only saved tensors: these stay for every block."""
    d = Dims.of(config)
    return tokens * (2 * d.hidden + d.q_dim + d.intermediate) * act_bytes


def loss_bytes(config, micro_batch_size: int, seq_len: int, chunk: int = 0, act_bytes: int = 4,
               head_trains: bool = False) -> int:
    """What the causal-LM loss holds at the start of backward, beyond the model's saved activations. The plain
    loss (transformers'): the logits upcast to fp32, their log-softmax (saved for backward), its gradient and the
    logits' gradient are alive together: 3 x rows x positions x vocab x 4 bytes, the rows being one forward's
    (``micro_batch_size``; the logits themselves are freed once the loss is computed, unless the caller keeps the
    model's output). Chunked (``chunk`` positions of every row at a time, ``helpers.loss``): the same three for one
    chunk, which backward recomputes, beside the gradient of the hidden states collected from the chunks done so
    far (the other positions') and the hidden states themselves, which the chunks' checkpoints keep as their inputs
    (a frozen output layer would not have kept them; a trained one keeps them anyway, ``head_trains``)."""
    d = Dims.of(config)
    if not chunk or chunk >= seq_len:
        return 3 * micro_batch_size * seq_len * d.vocab * 4
    hidden = micro_batch_size * seq_len * d.hidden * act_bytes
    others = micro_batch_size * (seq_len - chunk) * d.hidden * act_bytes
    return 3 * micro_batch_size * chunk * d.vocab * 4 + others + (0 if head_trains else hidden)


def _lora_block0_unsaved(d: Dims, tokens: int, recipe: Recipe, a: int) -> int:
    """What block 0 of a LoRA model does not save: the embeddings' output does not require grad, so
    nothing before block 0's first adapter is part of the graph. Its first norm saves nothing, its
    q/k/v dropouts keep no mask, and with no attention adapter the attention saves nothing either."""
    targets = set(recipe.lora_targets)
    qkv = len({"q_proj", "k_proj", "v_proj"} & targets)
    per_token = d.hidden * a * (1 + (qkv if recipe.lora_dropout > 0 else 0))
    if not qkv:  # q, k, v and the log-sum-exp are not kept; nor the attention output without o_proj's adapter
        per_token += (d.q_dim + 2 * d.kv_dim) * a + 4 * d.heads
        if "o_proj" not in targets:
            per_token += (d.q_dim + d.hidden) * a  # the attention output, the second norm's input
    return tokens * per_token


def predict(config, recipe: Recipe = Recipe()) -> MemoryReport:
    """Peak bytes by category for one step of ``recipe`` (see the module docstring)."""
    d = Dims.of(config)
    if recipe.training and recipe.weights in QUANTIZED and not recipe.lora_rank:
        raise ValueError(f"Recipe(weights={recipe.weights!r}) cannot be fine-tuned directly (bitsandbytes "
                         "weights are frozen): use training=False, or train LoRA adapters on top (lesson 05)")
    n = recipe.micro_batch_size * recipe.seq_len  # tokens in one forward and backward
    w = weight_bytes(d, recipe) + (lora_bytes(d, recipe) if recipe.lora_rank else 0)
    a = 4 if recipe.weights in QUANTIZED else BYTES[recipe.weights]

    if not recipe.training:
        # Inference: only the current block's temporaries, then the logits.
        block_tmp = n * (3 * d.intermediate + 2 * d.hidden) * a
        return MemoryReport(weights=w, activations=max(block_tmp, n * d.vocab * a), device=recipe.device)

    p_train = trainable_params(d, recipe)
    grad_bytes = recipe_grad_bytes(recipe)
    state = optimizer_state_bytes(d, recipe)

    # Which blocks backpropagation runs through: down to the lowest trainable one (all of them if the
    # embeddings train). Training the first k blocks runs it through the frozen ones above them too.
    lora = bool(recipe.lora_rank)  # adapters in every block: backpropagation runs through all of them
    k = d.layers if recipe.trainable_blocks is None else min(recipe.trainable_blocks, d.layers)
    bottom = recipe.trainable_blocks is not None and recipe.trainable_at == "bottom"
    embeddings_train = recipe.trainable_blocks is None and not lora
    g_norm = 0 if bottom or lora else d.hidden * grad_bytes  # the final norm trains unless only the bottom does
    amp = recipe.autocast is not None
    if lora:
        block_act = lora_block_activation_bytes(d, n, recipe, a)
    else:
        block_act = autocast_block_activation_bytes(d, n) if amp else block_activation_bytes(d, n, a)
    # Autocast casts each fp32 weight to 16 bit once per forward and the graph keeps the copy until that
    # layer's backward: a block's linear weights, and the lm_head's (the tied embedding's) copy.
    copy = d.block_linear_params * 2 if amp else 0
    head_copy = d.embedding_params * 2 if amp else 0
    saved_input = n * d.hidden * a  # what a checkpointed block keeps: its input
    # The path of backpropagation, top to bottom: (trainable?, what the block saves in the forward).
    path = [(False, frozen_block_activation_bytes(d, n, a))] * (d.layers - k if bottom and k else 0)
    path += [(True, block_act)] * k
    if lora:
        path[-1] = (True, block_act - _lora_block0_unsaved(d, n, recipe, a))
    ckpt = recipe.gradient_checkpointing
    # int8 layers keep their inputs through checkpointing (``int8_kept_bytes``).
    int8_kept = int8_kept_bytes(d, n, a) if ckpt and recipe.weights == "int8" and lora else 0
    saved = [saved_input + int8_kept if ckpt else act + copy for _, act in path]
    # The final norm's input, normalised value and output (under autocast: the output's 16-bit copy for the
    # lm_head); with LoRA (frozen norm and lm_head) only its input.
    head_act = n * d.hidden * (a if lora else 10 if amp else 3 * a)
    g_block = (d.lora_params(recipe.lora_rank, recipe.lora_targets) if lora else d.block_params) * grad_bytes
    g_head = d.embedding_params * grad_bytes if embeddings_train else 0  # tied lm_head / embedding

    phases = {}
    # 1. Start of backward: saved activations + log-softmax output, its gradient and the logits' (``loss_bytes``).
    #    A chunked loss with a trained output layer also sums that layer's gradient over the chunks: the running
    #    sum and the chunk's new one.
    loss = loss_bytes(d, recipe.micro_batch_size, recipe.seq_len, recipe.loss_chunk, a, head_trains=embeddings_train)
    if embeddings_train and 0 < recipe.loss_chunk < recipe.seq_len:
        loss += 2 * g_head
    phases["backward start"] = (0, sum(saved) + head_act + head_copy + loss)
    if amp and ckpt:  # autocast's cache keeps every weight copy until the forward leaves the autocast region
        chunk = min(recipe.loss_chunk or recipe.seq_len, recipe.seq_len)
        in_forward = 2 * recipe.micro_batch_size * chunk * d.vocab * 4  # (a chunk's) logits and their log-softmax
        phases["forward end"] = (0, sum(saved) + head_act + head_copy + d.layers * copy + in_forward)
    # 2. Through the blocks, top to bottom: block j's activations (recomputed if checkpointed) are
    #    alive with those below it; gradients of the trainable blocks above have accumulated. The
    #    lm_head's gradient waits for the embedding's when they are tied.
    done = 0  # trainable blocks above the current one
    act_bytes = 2 if amp else a  # what the MLP's intermediates (and so their gradients) are stored in
    for j, (trains, act) in enumerate(path):
        below = sum(saved[j + 1:])
        current = act + copy + (saved_input + int8_kept if ckpt else 0)
        transient = n * (2 * d.intermediate + d.hidden) * act_bytes  # gradients of the MLP's intermediates
        phases[f"block {len(path) - j}"] = (done * g_block + g_norm, below + current + transient + g_head + head_act)
        done += trains
    # 3. End of backward: the embedding's gradient meets the lm_head's (tied weights) and their sum,
    #    a new tensor, becomes the .grad while both addends are still alive.
    phases["backward end"] = (k * g_block + g_norm + g_head, 2 * g_head)
    # 3b. Gradient accumulation: from the second micro-batch on, every gradient of the first is alive through
    #     the whole forward and backward. New gradients are added into .grad in place, so the extra is the
    #     gradient being added (at most one block's), and at the end the tied embedding's two addends and
    #     their sum before it is added.
    if recipe.gradient_accumulation_steps > 1:
        all_grads = p_train * grad_bytes
        for phase, (_, acts) in list(phases.items()):
            if phase.startswith("block"):
                acts += g_block
            elif phase == "backward end":
                acts += g_head
            phases[phase + ", accumulating"] = (all_grads, acts)
    # 4. Optimizer step with every gradient present. PyTorch's default AdamW on CPU runs parameter by
    #    parameter: sqrt(v) and the bias-corrected denominator of the largest tensor are alive at once.
    #    On CUDA the default foreach path builds them for all parameters together.
    if lora:
        shapes = d.named_linear_shapes()
        largest = max(recipe.lora_rank * max(shapes[t]) for t in recipe.lora_targets)
    else:
        largest = max(d.embedding_params if embeddings_train else 0, max(o * i for o, i in d.linear_shapes()), d.hidden)
    largest *= grad_bytes
    if recipe.optimizer in ("adamw", "adam") and recipe.device == "cuda":
        tmp = p_train * grad_bytes
    else:
        tmp = _one_step_tmp(recipe, largest, grad_bytes)
    phases["optimizer step"] = (p_train * grad_bytes, tmp)
    if recipe.optimizer_in_backward:
        block_tensor = (recipe.lora_rank * max(max(shapes[t]) for t in recipe.lora_targets) if lora
                        else max(o * i for o, i in d.linear_shapes())) * grad_bytes
        phases = _steps_in_backward(phases, block_tensor, _one_step_tmp(recipe, block_tensor, grad_bytes),
                                    g_head, _one_step_tmp(recipe, g_head, grad_bytes))
    if recipe.world_size > 1 or recipe.zero_stage or recipe.engine == "deepspeed":
        w, state, phases = _shard(d, recipe, w, state, phases, p_train)

    name, (grads, acts) = max(phases.items(), key=lambda kv: kv[1][0] + kv[1][1])
    report = MemoryReport(weights=w, gradients=grads, optimizer=state, activations=acts, device=recipe.device)
    report.moment = name
    return report


def _one_step_tmp(recipe: Recipe, tensor_bytes: int, grad_bytes: int) -> int:
    """The temporaries of one parameter's optimizer step, measured per tensor on the CPU (tests/test_estimate.py):
    AdamW 2 x the tensor (sqrt(v) and the bias-corrected denominator); GaLore's HF-style AdamW 2 x (its denominator
    and the update); transformers' Adafactor 2 x in fp32 (the squared gradient and its factored approximation);
    8-bit AdamW and SGD update in place."""
    if recipe.optimizer in ("adamw", "adam", GALORE):
        return 2 * tensor_bytes
    if recipe.optimizer == ADAFACTOR:
        return 2 * tensor_bytes * 4 // grad_bytes
    return 0


def _steps_in_backward(phases: dict, block_tensor: int, block_tmp: int, g_head: int, head_tmp: int) -> dict:
    """The phases when each parameter's optimizer steps from its post-accumulate-grad hook and frees its gradient
    (``Recipe(optimizer_in_backward=True)``, ``helpers.train.OptimizerInBackward``): no moment holds more than one
    gradient, the one being stepped, with its step's temporaries — in the blocks at most their largest tensor's;
    at the end the embedding's, summed from its two addends first. There is no optimizer step after backward."""
    out = {}
    for k, (_g, a) in phases.items():
        if k == "optimizer step":
            continue
        if k.startswith("block"):
            out[k] = (block_tensor, a + block_tmp)
        elif k.startswith("backward end"):
            out[k] = (g_head, a)  # the embedding's summed gradient beside its two addends
            out["embedding step"] = (g_head, head_tmp)
        else:
            out[k] = (0, a)
    return out


def _shard(d: Dims, recipe: Recipe, w: int, state: int, phases: dict, p_train: int):
    """One rank's share of a data-parallel step: the model states partitioned as in the ZeRO paper (section 5),
    plus what each engine keeps to communicate, per ``Recipe``'s engine settings. The single-process ``phases``
    come in; each engine adds its own tensors to the moments they are alive:

    - DDP: buckets as large as every gradient, alive for the whole step (gradients if each .grad is a view into
      them, else beside the .grads); at the end of backward the tied embedding's fresh gradient is not in its
      bucket yet.
    - FSDP2: the root (embedding, lm_head, final norm) stays gathered from forward to the end of backward; a
      block is gathered while it runs, the next one down is prefetched in backward, and the gradients of the
      block above wait, whole, in the reduce-scatter input until the next reduce-scatter.
    - DeepSpeed ZeRO-1/2: the reduction bucket (two with ``overlap_comm``); ZeRO-2 also copies the reduced
      gradient of every parameter that overlaps the rank's partition into one buffer (whole parameters, so at the
      boundary more than the partition; the rank holding the most is the one predicted).
    - DeepSpeed ZeRO-3: a flat buffer of the rank's gradient partition and the reduction bucket for the whole
      step; parameters under the persistence threshold kept whole; the module running gathered, plus the prefetch
      bucket; and a gathered parameter the step uses again within ``max_reuse_distance`` elements is not released:
      the tied embedding, and every block whose backward comes that soon after its forward (on a model under
      about half a billion parameters, all of them).
    Buffers (the rotary frequencies) are not parameters: every rank keeps them whole.
    """
    n, stage = recipe.world_size, recipe.zero_stage
    gb = recipe_grad_bytes(recipe)
    all_grads = p_train * gb
    buffers = rotary_buffer_bytes(d)

    def part(x: int, sharded: bool = True) -> int:
        return -(-x // n) if sharded else x

    deepspeed = recipe.engine == "deepspeed"
    zero_optimizer = deepspeed and stage >= 1  # DeepSpeed's ZeRO optimizer wraps the step
    if zero_optimizer:
        state += p_train * 4  # its fp32 master copy of every trainable parameter
    state = part(state, stage >= 1)
    block_w = _block_weight_bytes(d, recipe)
    root_w = w - buffers - d.layers * block_w  # embedding, lm_head, final norm (and any LoRA adapters)
    full = recipe.trainable_blocks is None and not recipe.lora_rank
    # The tied embedding's gradient is summed from the lm_head's and the embedding's just before it is stored: at
    # the end of backward it is a fresh tensor beside whatever buffer it goes into.
    fresh_head = d.embedding_params * gb if full and d.tied else 0
    # The root's gradients (embedding, lm_head, final norm) and one trainable block's.
    if full:
        g_root = (d.embedding_params * (1 if d.tied else 2) + d.hidden) * gb
    else:
        g_root = d.hidden * gb if not recipe.lora_rank and recipe.trainable_at == "top" else 0
    trainable_blocks = d.layers if recipe.trainable_blocks is None else min(recipe.trainable_blocks, d.layers)
    g_block = (all_grads - g_root) // max(1, trainable_blocks)
    new = {}
    if n > 1 and stage == 0 and not deepspeed:  # DDP
        buckets = all_grads
        for k, (g, a) in phases.items():
            if recipe.gradient_as_bucket_view:
                new[k] = (buckets + (fresh_head if k.startswith("backward end") else 0), a)
            else:
                new[k] = (g, a + buckets)
        return w, state, new
    if stage >= 3 and not deepspeed:  # FSDP2
        w = part(w - buffers) + buffers
        whole_blocks = d.layers * block_w if not recipe.reshard_after_forward else 0
        for k, (g, a) in phases.items():
            gathered = root_w + whole_blocks
            if k.startswith("block"):
                j = int(k.split()[1].rstrip(","))  # blocks are numbered from the bottom, 1 = lowest
                if recipe.reshard_after_forward:
                    gathered += block_w * (2 if j > 1 else 1)  # this block, and the one below prefetched
                waiting = g_block if j < d.layers else 0  # the block above's reduce-scatter input
                new[k] = (part(g), a + gathered + waiting)
            elif k.startswith("backward end"):  # the root's gradients, whole, before their reduce-scatter
                new[k] = (part(g - g_root), a + gathered + g_root + g_block)
            elif k == "optimizer step":  # each parameter's shard is stepped on its own
                new[k] = (part(g), part(a))
            else:  # backward start: the top block is prefetched
                new[k] = (g, a + gathered + (block_w if recipe.reshard_after_forward else 0))
        return w, state, new
    if not deepspeed or stage == 0:  # plain data parallel without buffers modelled
        return w, state, phases
    flat = _flat_order(d, recipe)
    partition = part(sum(flat))
    overlap = recipe.overlap_comm if recipe.overlap_comm is not None else stage == 3
    bucket = recipe.reduce_bucket_size * gb  # allocated whole, however small the model (its default is 2 GB of fp32)
    # The inner optimizer steps one flat fp32 partition. AdamW's temporaries are then the partition's size: two on the
    # CPU (one tensor at a time), one on CUDA (the foreach path's sqrt of the second moment). Other optimizers update
    # in place.
    step_tmp = (1 if recipe.device == "cuda" else 2) * partition * 4 if recipe.optimizer in ("adamw", "adam") else 0
    if stage in (1, 2):
        bucket *= 2 if overlap else 1
        if stage == 1:
            for k, (g, a) in phases.items():
                new[k] = (g, a + (bucket if k != "backward start" else 0))
            new["optimizer step"] = (all_grads, step_tmp + bucket)
            return w, state, new
        # ZeRO-2: the reduced gradients this rank keeps, whole parameters; with the optimizer offloaded they go
        # straight into the fp32 gradient of its partition, in CPU memory.
        if recipe.offload_optimizer:
            held = partition * 4 if recipe.device == "cpu" else 0
        else:
            held = _largest_overlap(flat, n) * gb
        # With the optimizer offloaded, that fp32 partition gradient is allocated once and lives across steps.
        resident = held if recipe.offload_optimizer else 0
        for k, (g, a) in phases.items():
            if k.startswith("block"):
                new[k] = (held + bucket, a)
            elif k.startswith("backward end"):
                new[k] = (held + bucket + fresh_head, a)
            elif k == "optimizer step":
                new[k] = (held + (0 if recipe.offload_optimizer else partition * 4), step_tmp + bucket)
            else:
                new[k] = (g + resident, a)
        if recipe.offload_optimizer and recipe.device != "cpu":  # the step runs on the CPU
            state = 0
            new = {k: v for k, v in new.items() if k != "optimizer step"}
        return w, state, new
    # ZeRO-3
    shapes = trainable_tensor_sizes(d, Recipe())  # every parameter: ZeRO-3 partitions frozen ones too
    persistent = sum(x for x in shapes if x < recipe.param_persistence_threshold) * (w - buffers) // max(1, sum(shapes))
    w = part(w - buffers - persistent) + persistent + buffers
    grad_partition = part(all_grads)
    per_element = block_w / max(1, d.block_params)  # bytes of a gathered parameter element
    # After a module runs, its parameters stay gathered if the trace uses them again within max_reuse_distance
    # elements: a block used in the forward is used again in the backward after the blocks above it and the lm_head
    # (twice each), so the top ``kept`` blocks stay gathered from forward to backward; the tied embedding is used again
    # after every block.
    head = d.embedding_params
    kept = sum(1 for k in range(d.layers) if 2 * k * d.block_params + 2 * head < recipe.max_reuse_distance)
    embedding_kept = d.layers * d.block_params < recipe.max_reuse_distance
    fetched = int(max(o * i for o, i in d.linear_shapes()) * per_element)  # a module not kept: gathered to run
    prefetch = int(min(recipe.prefetch_bucket_size, d.block_params) * per_element)
    for k, (_g, a) in phases.items():
        if k.startswith("block"):
            j = int(k.split()[1].rstrip(","))  # from the bottom, 1 = lowest; the top ``kept`` are still gathered
            still = max(0, j - (d.layers - kept))
            running = 0 if j > d.layers - kept else fetched + prefetch
            new[k] = (grad_partition + bucket, a + root_w * embedding_kept + still * block_w + running)
        elif k.startswith("backward end"):
            new[k] = (grad_partition + bucket + fresh_head, a + root_w)
        elif k == "optimizer step":
            new[k] = (grad_partition + partition * 4, step_tmp)
        else:  # backward start: the lm_head (the embedding) running, the kept blocks gathered
            new[k] = (grad_partition + bucket, a + root_w + kept * block_w)
    if recipe.offload_optimizer and recipe.device != "cpu":
        state = 0
    return w, state, new


def _block_weight_bytes(d: Dims, recipe: Recipe) -> int:
    """One decoder block's weights as stored (quantized linear layers, norms in their dtype)."""
    if recipe.weights in QUANTIZED:
        linear = sum(_quantized_linear_bytes(o, i, recipe) for o, i in d.linear_shapes())
        return linear + 2 * d.hidden * BYTES[recipe.unquantized]
    return d.block_params * BYTES[recipe.weights]


def _flat_order(d: Dims, recipe: Recipe) -> list[int]:
    """The trainable parameters' sizes in the model's order (embedding first), as DeepSpeed flattens them."""
    sizes = trainable_tensor_sizes(d, recipe)
    if recipe.trainable_blocks is None and not recipe.lora_rank:  # [blocks..., embedding, norm, (lm_head)]
        blocks = sizes[:d.layers * 9]
        return [sizes[d.layers * 9], *blocks, *sizes[d.layers * 9 + 1:]]
    return sizes


def _largest_overlap(flat: list[int], n: int) -> int:
    """The most elements any rank's ZeRO-2 partition buffer holds: every parameter that overlaps the rank's
    1/n of the flattened parameters counts whole (DeepSpeed copies whole parameters into it)."""
    total = sum(flat)
    size = -(-total // n)
    best = 0
    for r in range(n):
        lo, hi, start, held = r * size, (r + 1) * size, 0, 0
        for x in flat:
            if start < hi and start + x > lo:
                held += x
            start += x
        best = max(best, held)
    return best


def model_states(config, recipe: Recipe = Recipe()) -> dict[str, int]:
    """One rank's *model states* when the optimizer steps, the quantities the ZeRO paper's formulas count: the
    weights it holds, the gradients the optimizer consumes (its partition from ZeRO-2 on), the optimizer state
    (DeepSpeed's fp32 master partition included). ``predict`` gives the peak of the step instead, with each
    engine's buffers."""
    d = Dims.of(config)
    peak = predict(d, recipe)
    n, stage = recipe.world_size, recipe.zero_stage
    grads = trainable_params(d, recipe) * recipe_grad_bytes(recipe)
    offloaded = recipe.offload_optimizer and recipe.device != "cpu"
    return {"weights": peak.weights, "gradients": 0 if offloaded else -(-grads // n) if stage >= 2 else grads,
            "optimizer": peak.optimizer}


def recipe_grad_bytes(recipe: Recipe) -> int:
    """Bytes of one gradient element: fp32 for adapters and quantized bases, else the weights' dtype."""
    return 4 if recipe.weights in QUANTIZED or recipe.lora_rank else BYTES[recipe.weights]


def offloaded_bytes(config, recipe: Recipe) -> int:
    """What ZeRO-Offload keeps in CPU memory per rank instead of on the device: the optimizer state (with the
    fp32 master partition) and the fp32 gradient partition."""
    if not recipe.offload_optimizer:
        return 0
    on_device = predict(config, recipe.but(offload_optimizer=False))
    return on_device.optimizer + -(-trainable_params(config, recipe) * 4 // recipe.world_size)


def compare(predicted: MemoryReport, measured: MemoryReport) -> list[dict]:
    """Rows of predicted beside measured (MiB) with the error in percent, for a table."""
    rows = []
    for c in (*CATEGORIES, "peak"):
        p, m = getattr(predicted, c), getattr(measured, c)
        rows.append({"category": c, "predicted MiB": p / 2**20, "measured MiB": m / 2**20,
                     "error %": 100 * (p - m) / m if m else (0.0 if p == 0 else float("inf"))})
    return rows
