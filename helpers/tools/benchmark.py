"""Predicted against measured peak memory, over the recipes the course teaches, at sizes no lesson uses.

    python -m helpers.tools.benchmark                  # every case below: about 7 minutes on a 2-core CPU
    python -m helpers.tools.benchmark --cases int8_lora int8_lora_ckpt ddp
    python -m helpers.tools.benchmark --list

Each case is a ``helpers.estimate.Recipe``. One-process cases build the course model that recipe describes
(quantized with bitsandbytes, LoRA adapters with peft, frozen blocks, the optimizer it names), run a training
step once to allocate the optimizer state, then measure the next step with ``helpers.memory``. The two-process
cases launch lesson 09's engines for real (``helpers.distributed.launch.launch``, the mid-size model) and take the rank
with the largest peak, which is what must fit. Batch and sequence sizes are odd on purpose: a predictor fitted to
round sizes would show it here.

Prints a Markdown table (predicted, measured, error, the moment the predictor puts the peak at) and the largest
error; exits 1 if any case is off by more than ``TOLERANCE``. A benchmark, not a test: the suite runs a few cases.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..distributed.launch import recipe_for as sharding_recipe
from ..estimate import Recipe, predict
from ..memory import MiB, measure
from ..progress import progress

TOLERANCE = 0.10
LORA = dict(lora_rank=16, lora_targets="all-linear")
CASES: dict[str, Recipe] = {
    "full": Recipe(batch_size=3, seq_len=77),
    "full_ckpt": Recipe(batch_size=5, seq_len=93, gradient_checkpointing=True),
    "full_accumulation": Recipe(batch_size=6, seq_len=77, gradient_accumulation_steps=2),  # 2 micro-batches of 3
    "full_sgd": Recipe(batch_size=3, seq_len=77, optimizer="sgd"),
    "full_adamw8bit": Recipe(batch_size=3, seq_len=77, optimizer="adamw8bit"),
    "frozen_top3": Recipe(batch_size=3, seq_len=77, trainable_blocks=3),
    "frozen_bottom2_sgd": Recipe(batch_size=2, seq_len=99, trainable_blocks=2, trainable_at="bottom",
                                 optimizer="sgd"),
    "lora_qv": Recipe(batch_size=3, seq_len=77, lora_rank=8, lora_targets=("q_proj", "v_proj")),
    "int8_lora": Recipe(batch_size=3, seq_len=77, weights="int8", **LORA),
    "int8_lora_ckpt": Recipe(batch_size=3, seq_len=77, weights="int8", gradient_checkpointing=True, **LORA),
    "nf4_lora": Recipe(batch_size=3, seq_len=77, weights="nf4", double_quant=True, optimizer="adamw8bit", **LORA),
    "nf4_lora_ckpt": Recipe(batch_size=5, seq_len=61, weights="nf4", double_quant=True, gradient_checkpointing=True,
                            **LORA),
    "lora_qv_ckpt_chunked_loss": Recipe(batch_size=3, seq_len=77, lora_rank=8, lora_targets=("q_proj", "v_proj"),
                                        gradient_checkpointing=True, loss_chunk=20),
    "full_chunked_loss": Recipe(batch_size=3, seq_len=77, optimizer="sgd", loss_chunk=20),
}
# Lesson 09's engines, per rank, on its mid-size model (4 blocks), as its worker runs them
# (``helpers.distributed.launch.recipe_for``), at two sizes: 3 rows x 45 tokens per rank, where the step peaks at the
# end of backward (the embedding's gradients), and 2 x 333, where it peaks at the start of backward (the logits). A
# case is named "<lesson 09 run>@<rows>x<tokens>".
ENGINES = ("ddp", "fsdp", "zero1", "zero2", "zero3", "zero2_offload")
for _rows, _tokens in ((3, 45), (2, 333)):
    for _run in ENGINES:
        CASES[f"{_run}@{_rows}x{_tokens}"] = sharding_recipe(_run, _rows, _tokens)
SHARDED_LAYERS = 4  # lesson 09's mid-size model


def build(recipe: Recipe):
    """The course model and optimizer ``recipe`` describes: (model, optimizer), ready for ``make_train_step``."""
    from ..models import load_model

    quantization = None
    if recipe.weights in ("int8", "nf4", "fp4"):
        from transformers import BitsAndBytesConfig

        quantization = (BitsAndBytesConfig(load_in_8bit=True) if recipe.weights == "int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=recipe.weights, bnb_4bit_use_double_quant=recipe.double_quant,
            bnb_4bit_compute_dtype=torch.float32))
    model = load_model(quantization_config=quantization)
    if recipe.lora_rank:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantization is not None:  # what lesson 05 teaches: the rest in fp32, inputs that require grad
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank,
                                                 target_modules=list(recipe.lora_targets), lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    elif recipe.trainable_blocks is not None:
        layers = model.model.layers
        keep = (layers[len(layers) - recipe.trainable_blocks:] if recipe.trainable_at == "top"
                else layers[:recipe.trainable_blocks])
        model.requires_grad_(False)
        keep.requires_grad_(True)
        if recipe.trainable_at == "top":
            model.model.norm.requires_grad_(True)
    return model, make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad])


def make_optimizer(recipe: Recipe, params):
    """The optimizer ``recipe.optimizer`` names (learning rate 0: the weights stay pretrained)."""
    if recipe.optimizer in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        return (bnb.optim.AdamW8bit if recipe.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit)(params, lr=0.0)
    if recipe.optimizer in ("sgd", "sgd_momentum"):
        return torch.optim.SGD(params, lr=0.0, momentum=0.9)
    if recipe.optimizer == "sgd_plain":
        return torch.optim.SGD(params, lr=0.0)
    return torch.optim.AdamW(params, lr=0.0)


def measure_one_process(recipe: Recipe, corpus) -> int:
    """The measured peak of one steady-state step of ``recipe`` on the course model."""
    from ..train import make_train_step

    model, optimizer = build(recipe)
    batch = corpus.train_batch(recipe.batch_size, recipe.seq_len)
    step = make_train_step(model, optimizer, batch, gradient_checkpointing=recipe.gradient_checkpointing,
                           gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                           loss_chunk=recipe.loss_chunk or None)
    step()  # steady state: the optimizer state exists
    return measure(step, model=model, optimizer=optimizer).peak


def measure_sharded(names) -> dict[str, int]:
    """Launch the two-process cases ``names`` for real (one launch per launcher and size); each case's largest
    per-rank peak."""
    from ..distributed.launch import RUNS, launch

    peaks = {}
    groups: dict[tuple, list[str]] = {}
    for name in names:
        run, size = name.split("@")
        groups.setdefault((RUNS[run].launcher, size), []).append(name)
    for (_launcher, size), group in groups.items():
        rows, tokens = size.split("x")
        extra = ["--micro-batch", rows, "--seq-len", tokens, "--layers", str(SHARDED_LAYERS)]
        runs = launch(*(n.split("@")[0] for n in group), extra=extra, timeout=1200)
        for name in group:
            peaks[name] = max(sum(rank["peak"].values()) for rank in runs[name.split("@")[0]])
    return peaks


def sharded_config():
    from transformers import AutoConfig

    from ..models import resolve

    config = AutoConfig.from_pretrained(resolve())
    config.num_hidden_layers = SHARDED_LAYERS
    return config


def run(names=None) -> list[dict]:
    """Measure and predict the cases ``names`` (all by default); one row each, printed as it comes."""
    from transformers import AutoConfig

    from ..data import Corpus
    from ..models import load_tokenizer, resolve
    names = list(names or CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
    sharded = [n for n in names if "@" in n]
    measured = measure_sharded(sharded) if sharded else {}
    config, corpus = AutoConfig.from_pretrained(resolve()), None
    mid_size = sharded_config() if sharded else None  # lesson 09's model: read once
    rows = []
    cases = progress(names, desc="benchmark cases", unit="case")  # a bar in a live notebook or terminal
    for name in cases:
        recipe = CASES[name]
        if name not in measured:
            corpus = corpus or Corpus(load_tokenizer())
            measured[name] = measure_one_process(recipe, corpus)
        predicted = predict(mid_size if name in sharded else config, recipe)
        rows.append({"case": name, "recipe": describe(recipe), "predicted": predicted.peak,
                     "measured": measured[name], "error": predicted.peak / measured[name] - 1,
                     "moment": predicted.moment})
        cases.write(_row(rows[-1]))  # printed above the bar when one shows
        sys.stdout.flush()
    return rows


def describe(recipe: Recipe) -> str:
    """The case's recipe in a few words, with its sizes (per rank for the two-process cases)."""
    from ..planner import describe as words

    return f"{words(recipe).replace(' GPUs', ' ranks')}, {recipe.batch_size} x {recipe.seq_len}"


def _row(r: dict) -> str:
    return (f"| {r['case']} | {r['recipe']} | {r['predicted'] / MiB:,.1f} | {r['measured'] / MiB:,.1f} | "
            f"{100 * r['error']:+.2f} % | {r['moment']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, recipe in CASES.items():
            print(f"{name:20} {describe(recipe)}")
        return 0
    print("| case | recipe | predicted MiB | measured MiB | error | predicted moment |")
    print("|---|---|---|---|---|---|")
    rows = run(args.cases)
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"\nlargest error {100 * worst['error']:+.2f} % ({worst['case']}) over {len(rows)} configurations "
          f"(tolerance {100 * TOLERANCE:.0f} %)")
    return 0 if abs(worst["error"]) <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
