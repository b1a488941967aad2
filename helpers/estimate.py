"""Predict memory by category from a model config and a recipe, without running the model.

    predict(config, Recipe(batch_size=4, seq_len=128))                  # fp32 AdamW full fine-tune
    predict(config, Recipe(training=False, weights="nf4"))               # 4-bit inference

The prediction uses the same categories as ``helpers.memory`` and the same moment: the peak of one
steady-state training step (optimizer state already allocated, gradients freed by
``zero_grad(set_to_none=True)``), or of one forward pass without gradients for inference.

Every term is a count of tensors the PyTorch / transformers code keeps alive, written out below for a
Llama-style decoder (SmolLM2, Llama, Mistral, Qwen2): nothing is fitted to measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .memory import CATEGORIES, MemoryReport

BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
QUANTIZED = ("int8", "nf4", "fp4")
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4, "sgd_momentum": 4, "sgd_plain": 0, "none": 0}


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
    def params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.layers * self.block_params + self.hidden + self.embedding_params + head


@dataclass(frozen=True)
class Recipe:
    """How the model is run. Defaults: fp32 weights, AdamW, every parameter trained."""

    batch_size: int = 1
    seq_len: int = 128
    training: bool = True
    weights: str = "fp32"  # fp32 | bf16 | fp16 | int8 | nf4 | fp4
    double_quant: bool = False  # 4-bit only: quantize the quantization constants too
    unquantized: str = "fp32"  # dtype bitsandbytes leaves embeddings, norms and lm_head in
    optimizer: str = "adamw"  # adamw | sgd (with momentum) | sgd_plain | none
    trainable_blocks: int | None = None  # None: everything; k: only the last k blocks + final norm
    trainable_at: str = "top"  # with trainable_blocks=k: "top" (last k + final norm) or "bottom" (first k only)
    gradient_checkpointing: bool = False
    device: str = "cpu"  # cpu | cuda: PyTorch's default optimizer implementation differs

    def __post_init__(self):
        formats = (*BYTES, *QUANTIZED)
        if self.weights not in formats:
            raise ValueError(f"Recipe(weights={self.weights!r}): choose one of {', '.join(formats)}")
        if self.unquantized not in BYTES:
            raise ValueError(f"Recipe(unquantized={self.unquantized!r}): choose one of {', '.join(BYTES)}")
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"Recipe(optimizer={self.optimizer!r}): choose one of "
                             f"{', '.join(OPTIMIZER_STATE_BYTES)}")
        if self.trainable_at not in ("top", "bottom"):
            raise ValueError(f"Recipe(trainable_at={self.trainable_at!r}): choose one of top, bottom")

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
    packed = -(-n // 2)  # two 4-bit codes per byte
    code = 16 * 4  # each layer's 16-entry fp32 lookup table (NF4 or FP4 levels)
    if not recipe.double_quant:
        return packed + 4 * blocks + code
    # Double quantization: absmax stored as uint8, itself scaled by one fp32 per 256 blocks
    # (plus a 256-entry code table and an fp32 offset).
    return packed + blocks + 4 * (-(-blocks // 256)) + 256 * 4 + 4 + code


def rotary_buffer_bytes(d: Dims) -> int:
    """The rotary embedding's two fp32 buffers of inverse frequencies (head_dim / 2 each)."""
    return 2 * (d.head_dim // 2) * 4


def weight_bytes(config, recipe: Recipe = Recipe()) -> int:
    """Parameters and quantization constants, as stored."""
    d = Dims.of(config)
    if recipe.weights in QUANTIZED:
        other = BYTES[recipe.unquantized]
        block = sum(_quantized_linear_bytes(o, i, recipe) for o, i in d.linear_shapes()) + 2 * d.hidden * other
        # bitsandbytes leaves embeddings, lm_head and norms unquantized
        rest = (d.hidden + d.embedding_params * (1 if d.tied else 2)) * other
        return d.layers * block + rest + rotary_buffer_bytes(d)
    return d.params * BYTES[recipe.weights] + rotary_buffer_bytes(d)


def trainable_params(config, recipe: Recipe = Recipe()) -> int:
    d = Dims.of(config)
    if not recipe.training:
        return 0
    if recipe.trainable_blocks is None:
        return d.params
    final_norm = d.hidden if recipe.trainable_at == "top" else 0
    return min(recipe.trainable_blocks, d.layers) * d.block_params + final_norm


def trainable_tensors(config, recipe: Recipe = Recipe()) -> int:
    """How many parameter tensors train (each gets its own optimizer step counter)."""
    d = Dims.of(config)
    if not recipe.training:
        return 0
    per_block = len(d.linear_shapes()) + 2
    if recipe.trainable_blocks is None:
        return d.layers * per_block + 2 + (0 if d.tied else 1)
    return min(recipe.trainable_blocks, d.layers) * per_block + (1 if recipe.trainable_at == "top" else 0)


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


def frozen_block_activation_bytes(config, tokens: int, act_bytes: int = 4) -> int:
    """What a *frozen* decoder block saves when backpropagation must still pass through it (a
    trainable block below it): only what the input's gradient needs. Compared with
    ``block_activation_bytes`` it drops the tensors kept for weight gradients: each RMSNorm's
    normalised input and scaled output (the linear layers' inputs) and the MLP product (the down
    projection's input), 4 x hidden + intermediate per token."""
    d = Dims.of(config)
    return block_activation_bytes(d, tokens, act_bytes) - tokens * (4 * d.hidden + d.intermediate) * act_bytes


def predict(config, recipe: Recipe = Recipe()) -> MemoryReport:
    """Peak bytes by category for one step of ``recipe`` (see the module docstring)."""
    d = Dims.of(config)
    if recipe.training and recipe.weights in QUANTIZED:
        raise ValueError(f"Recipe(weights={recipe.weights!r}) cannot be fine-tuned directly (bitsandbytes "
                         "weights are frozen): use training=False, or train LoRA adapters on top (lesson 05)")
    n = recipe.batch_size * recipe.seq_len
    w = weight_bytes(d, recipe)
    a = 4 if recipe.weights in QUANTIZED else BYTES[recipe.weights]
    logits = n * d.vocab * 4  # the loss upcasts logits to fp32

    if not recipe.training:
        # Inference: only the current block's temporaries, then the logits.
        block_tmp = n * (3 * d.intermediate + 2 * d.hidden) * a
        return MemoryReport(weights=w, activations=max(block_tmp, n * d.vocab * a), device=recipe.device)

    p_train = trainable_params(d, recipe)
    grad_bytes = 4 if recipe.weights in QUANTIZED else BYTES[recipe.weights]
    # Moments are kept in the parameters' dtype; Adam also keeps a 4-byte step counter per tensor.
    state = p_train * OPTIMIZER_STATE_BYTES[recipe.optimizer] * grad_bytes // 4
    if recipe.optimizer in ("adamw", "adam"):
        state += 4 * trainable_tensors(d, recipe)

    # Which blocks backpropagation runs through: down to the lowest trainable one (all of them if the
    # embeddings train). Training the first k blocks runs it through the frozen ones above them too.
    k = d.layers if recipe.trainable_blocks is None else min(recipe.trainable_blocks, d.layers)
    bottom = recipe.trainable_blocks is not None and recipe.trainable_at == "bottom"
    embeddings_train = recipe.trainable_blocks is None
    g_norm = 0 if bottom else d.hidden * grad_bytes  # the final norm trains unless only the bottom does
    block_act = block_activation_bytes(d, n, a)
    saved_input = n * d.hidden * a  # what a checkpointed block keeps: its input
    # The path of backpropagation, top to bottom: (trainable?, what the block saves in the forward).
    path = [(False, frozen_block_activation_bytes(d, n, a))] * (d.layers - k if bottom and k else 0)
    path += [(True, block_act)] * k
    saved = [saved_input if recipe.gradient_checkpointing else act for _, act in path]
    head_act = 3 * n * d.hidden * a  # embedding output, final norm (2 tensors)
    g_block = d.block_params * grad_bytes
    g_head = d.embedding_params * grad_bytes if embeddings_train else 0  # tied lm_head / embedding

    phases = {}
    # 1. Start of backward: saved activations + log-softmax output, its gradient and the logits'.
    phases["backward start"] = (0, sum(saved) + head_act + 3 * logits)
    # 2. Through the blocks, top to bottom: block j's activations (recomputed if checkpointed) are
    #    alive with those below it; gradients of the trainable blocks above have accumulated. The
    #    lm_head's gradient waits for the embedding's when they are tied.
    done = 0  # trainable blocks above the current one
    for j, (trains, act) in enumerate(path):
        below = sum(saved[j + 1:])
        current = act + (saved_input if recipe.gradient_checkpointing else 0)
        transient = n * (2 * d.intermediate + d.hidden) * a  # gradients of the MLP's intermediates
        phases[f"block {len(path) - j}"] = (done * g_block + g_norm, below + current + transient + g_head + head_act)
        done += trains
    # 3. End of backward: the embedding's gradient meets the lm_head's (tied weights) and their sum,
    #    a new tensor, becomes the .grad while both addends are still alive.
    phases["backward end"] = (k * g_block + g_norm + g_head, 2 * g_head)
    # 4. Optimizer step with every gradient present. PyTorch's default AdamW on CPU runs parameter by
    #    parameter: sqrt(v) and the bias-corrected denominator of the largest tensor are alive at once.
    #    On CUDA the default foreach path builds them for all parameters together.
    largest = max(d.embedding_params if embeddings_train else 0,
                  max(o * i for o, i in d.linear_shapes()), d.hidden) * grad_bytes
    if recipe.optimizer in ("adamw", "adam"):
        tmp = p_train * grad_bytes if recipe.device == "cuda" else 2 * largest
    else:
        tmp = 0
    phases["optimizer step"] = (p_train * grad_bytes, tmp)

    name, (grads, acts) = max(phases.items(), key=lambda kv: kv[1][0] + kv[1][1])
    report = MemoryReport(weights=w, gradients=grads, optimizer=state, activations=acts, device=recipe.device)
    report.result = name  # which moment of the step is the peak
    return report


def compare(predicted: MemoryReport, measured: MemoryReport) -> list[dict]:
    """Rows of predicted beside measured (MiB) with the error in percent, for a table."""
    rows = []
    for c in (*CATEGORIES, "peak"):
        p, m = getattr(predicted, c), getattr(measured, c)
        rows.append({"category": c, "predicted MiB": p / 2**20, "measured MiB": m / 2**20,
                     "error %": 100 * (p - m) / m if m else (0.0 if p == 0 else float("inf"))})
    return rows
