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


# Short descriptions, so that none is cut at any width; the tooltips say the rest.
LABEL_WIDTH = "7em"  # the longest description ("accumulation") in full, and the dropdowns lined up
TOOLTIPS = {
    "model": "the model to plan for (helpers/model_configs)",
    "gpu": "the card; its budget is 90 % of the label (helpers.planner says why)",
    "batch_size": "the effective batch: rows of one optimizer step (micro-batch x accumulation steps)",
    "seq_len": "tokens per row (sequence length)",
    "gradient_accumulation_steps": "gradient accumulation steps: the batch is split into this many micro-batches",
    "weights": "the base model's weight format (int8 and nf4: bitsandbytes)",
    "unquantized": "what a quantized (int8/nf4) model keeps unquantized: fp32 after prepare_model_for_kbit_training",
    "optimizer": "the optimizer, and so its state per trained parameter",
    "gpus": "GPUs the work is sharded over (lesson 09)",
    "sharding": "how the GPUs share the model: DDP, ZeRO stage 1-3 (DeepSpeed) or FSDP",
    "autocast": "mixed precision: bf16/fp16 autocast over fp32 weights",
    "lora": "train LoRA adapters (r=16) instead of every weight",
    "gradient_checkpointing": "gradient checkpointing: recompute activations in the backward pass",
    "training": "training step; off: one forward pass (inference)",
}

# The two recipes side by side where there is room, one above the other where not; lines as tight as a table's.
VERDICT_STYLE = "display:flex; flex-wrap:wrap; gap:0 20px; line-height:1.35"
COLUMN_STYLE = "flex:1 1 240px; min-width:0; overflow-wrap:anywhere"


class PlannerApp:
    """The controls, the chart and the verdict; ``controls`` by name, the latest ``plan`` and ``cheapest``.

    Laid out for a notebook of about 1,000 pixels and narrower: the controls wrap in a grid (two or three
    columns), the chart and the verdict sit side by side where there is room and one above the other where not."""

    def __init__(self, model="smollm2-135m", gpu="T4", batch_size=8, seq_len=512, weights="fp32",
                 autocast=False, lora=False, gradient_checkpointing=False, optimizer="adamw",
                 gradient_accumulation_steps=1, training=True, unquantized="fp32", gpus=1, sharding="zero3"):
        def labelled(name, widget, description, **kwargs):
            return widget(description=description, tooltip=TOOLTIPS[name], style={"description_width": LABEL_WIDTH},
                          layout=widgets.Layout(width="auto", min_width="0"), **kwargs)

        def toggle(name, value, description):
            return widgets.Checkbox(value=value, description=description, tooltip=TOOLTIPS[name], indent=False,
                                    layout=widgets.Layout(width="auto", margin="2px 18px 2px 0"))

        self.controls = {
            "model": labelled("model", widgets.Dropdown, "model", options=MODELS, value=model),
            "gpu": labelled("gpu", widgets.Dropdown, "GPU", options=list(GPUS), value=gpu),
            "batch_size": labelled("batch_size", widgets.BoundedIntText, "batch", value=batch_size, min=1, max=4096),
            "seq_len": labelled("seq_len", widgets.Dropdown, "tokens", options=SEQ_LENS, value=seq_len),
            "gradient_accumulation_steps": labelled("gradient_accumulation_steps", widgets.BoundedIntText,
                                                    "accumulation", value=gradient_accumulation_steps, min=1,
                                                    max=4096),
            "weights": labelled("weights", widgets.Dropdown, "weights", options=WEIGHTS, value=weights),
            "unquantized": labelled("unquantized", widgets.Dropdown, "unquantized", options=UNQUANTIZED,
                                    value=unquantized),
            "optimizer": labelled("optimizer", widgets.Dropdown, "optimizer", options=OPTIMIZERS, value=optimizer),
            "gpus": labelled("gpus", widgets.BoundedIntText, "GPUs", value=gpus, min=1, max=1024),
            "sharding": labelled("sharding", widgets.Dropdown, "sharding", options=tuple(SHARDING), value=sharding),
            "autocast": toggle("autocast", autocast, "mixed precision"),
            "lora": toggle("lora", lora, "LoRA r16"),
            "gradient_checkpointing": toggle("gradient_checkpointing", gradient_checkpointing,
                                             "gradient checkpointing"),
            "training": toggle("training", training, "training"),
        }
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="100%", height="auto",
                                                                        object_fit="contain"))
        self.verdict = widgets.HTML(layout=widgets.Layout(flex="1 1 280px", min_width="0", margin="0 0 0 8px"))
        c = self.controls
        toggles = ("autocast", "lora", "gradient_checkpointing", "training")
        grid = widgets.GridBox([control for name, control in c.items() if name not in toggles],
                               layout=widgets.Layout(grid_template_columns="repeat(auto-fill, minmax(220px, 1fr))",
                                                     grid_gap="2px 12px", width="100%"))
        switches = widgets.Box([c[name] for name in toggles], layout=widgets.Layout(flex_flow="row wrap",
                                                                                    width="100%"))
        results = widgets.Box([self.chart, self.verdict], layout=widgets.Layout(flex_flow="row wrap",
                                                                                align_items="flex-start",
                                                                                width="100%"))
        self.widget = widgets.VBox([grid, switches, results], layout=widgets.Layout(width="100%",
                                                                                     overflow="hidden"))
        self.widget.add_class("course-planner")
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
        self.verdict.value = (f"<div style='{VERDICT_STYLE}'>"
                              f"<div style='{COLUMN_STYLE}'><h4>Your recipe</h4>{self.plan._repr_html_()}</div>"
                              f"<div style='{COLUMN_STYLE}'><h4>Cheapest recipe that fits one GPU</h4>"
                              f"{self.cheapest._repr_html_()}</div></div>")
        self.chart.value = _png({"your recipe": self.plan, "cheapest fit": self.cheapest})

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _png(plans: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.9))  # 504 x 351 pixels: beside the verdict in a 1,000-pixel notebook
    plan_bars(plans, ax=ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
