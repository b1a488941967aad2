"""The memory planner as widgets: pick a model, a GPU, a batch and techniques; see the bar, the verdict and the
cheapest recipe that fits. Every change calls ``helpers.planner.plan`` and ``cheapest_fit``: the widgets only
read and show, so the plain functions are what the tests and the lessons use.

    from helpers.planner import planner
    planner(model="llama-3-8b", gpu="T4", batch_size=4, seq_len=1024)
"""

from __future__ import annotations

import io

import ipywidgets as widgets

from .planner import GPUS, MODELS, SHARDING, cheapest_fit, plan
from .plots import plan_bars

SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
WEIGHTS = ("fp32", "bf16", "fp16", "int8", "nf4")
OPTIMIZERS = ("adamw", "paged_adamw8bit", "adamw8bit", "adafactor", "sgd")
UNQUANTIZED = ("fp32", "bf16", "fp16")  # fp32: prepare_model_for_kbit_training, as the course teaches


class PlannerApp:
    """The controls, the chart and the verdict; ``controls`` by name, the latest ``plan`` and ``cheapest``."""

    def __init__(self, model="smollm2-135m", gpu="T4", batch_size=8, seq_len=512, weights="fp32",
                 autocast=False, lora=False, gradient_checkpointing=False, optimizer="adamw",
                 gradient_accumulation_steps=1, training=True, unquantized="fp32", gpus=1, sharding="zero3"):
        wide = {"style": {"description_width": "initial"}}
        self.controls = {
            "model": widgets.Dropdown(options=MODELS, value=model, description="model"),
            "gpu": widgets.Dropdown(options=list(GPUS), value=gpu, description="GPU"),
            "batch_size": widgets.BoundedIntText(value=batch_size, min=1, max=4096, description="batch", **wide),
            "seq_len": widgets.Dropdown(options=SEQ_LENS, value=seq_len, description="tokens"),
            "gradient_accumulation_steps": widgets.BoundedIntText(value=gradient_accumulation_steps, min=1,
                                                                  max=4096, description="accumulation steps",
                                                                  **wide),
            "weights": widgets.Dropdown(options=WEIGHTS, value=weights, description="weights"),
            "unquantized": widgets.Dropdown(options=UNQUANTIZED, value=unquantized,
                                            description="rest of a quantized model", **wide),
            "optimizer": widgets.Dropdown(options=OPTIMIZERS, value=optimizer, description="optimizer"),
            "autocast": widgets.Checkbox(value=autocast, description="mixed precision (autocast)"),
            "lora": widgets.Checkbox(value=lora, description="LoRA r16"),
            "gradient_checkpointing": widgets.Checkbox(value=gradient_checkpointing,
                                                       description="gradient checkpointing"),
            "training": widgets.Checkbox(value=training, description="training (off: one forward pass)"),
            "gpus": widgets.BoundedIntText(value=gpus, min=1, max=1024, description="GPUs", **wide),
            "sharding": widgets.Dropdown(options=tuple(SHARDING), value=sharding, description="sharding", **wide),
        }
        self.chart = widgets.Image(format="png")
        self.verdict = widgets.HTML()
        c = self.controls
        self.widget = widgets.VBox([
            widgets.HBox([c["model"], c["gpu"]]),
            widgets.HBox([c["batch_size"], c["seq_len"], c["gradient_accumulation_steps"]]),
            widgets.HBox([c["weights"], c["unquantized"], c["optimizer"]]),
            widgets.HBox([c["gpus"], c["sharding"]]),
            widgets.HBox([c["autocast"], c["lora"], c["gradient_checkpointing"], c["training"]]),
            widgets.HBox([self.chart, self.verdict])])
        for control in c.values():
            control.observe(lambda _change: self.update(), names="value")
        self.plan = self.cheapest = None
        self.update()

    def settings(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def update(self):
        """Recompute from the controls; a recipe the predictor refuses is shown as its one-sentence reason."""
        s = self.settings()
        where = (s.pop("model"), s.pop("gpu"), s.pop("batch_size"), s.pop("seq_len"))
        try:
            self.plan = plan(*where, **s)
            self.cheapest = cheapest_fit(*where, training=s["training"])
        except ValueError as err:
            self.plan = self.cheapest = None
            self.verdict.value = f"<p style='color:#b00'>{err}</p>"
            return
        self.verdict.value = (f"<h4>Your recipe</h4>{self.plan._repr_html_()}"
                              f"<h4>Cheapest recipe that fits one GPU</h4>{self.cheapest._repr_html_()}")
        self.chart.value = _png({"your recipe": self.plan, "cheapest fit": self.cheapest})

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _png(plans: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    plan_bars(plans, ax=ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
