"""The training step every lesson measures, written once.

    step = make_train_step(model, optimizer, batch)
    step()                                        # warm-up: allocates the optimizer state
    report = measure(step, model=model, optimizer=optimizer)

The step is the plain PyTorch one a practitioner writes (and what ``Trainer`` does inside):
forward, ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. Only
the loss is kept from the model's output, so the logits are freed as soon as the loss is computed.
"""

from __future__ import annotations

import torch

from .cpu_packing import ensure_trainable, prevent_packing
from .loss import causal_lm_loss


def make_train_step(model, optimizer, batch: dict, gradient_checkpointing: bool = False,
                    gradient_accumulation_steps: int = 1, loss_chunk: int | None = None):
    """A closure running one optimizer step on ``batch`` (every row of it: the batch is the optimizer step's);
    returns the loss as a float.

    With ``gradient_accumulation_steps=k`` the batch is split into k equal micro-batches along its first dimension;
    each micro-batch's loss is divided by k and back-propagated, the gradients add up in ``.grad``, and
    the optimizer steps once (equal micro-batches of unpadded tokens: lesson 07 shows when that is not enough).
    An ``OptimizerInBackward`` steps each parameter inside backward already: the step is forward and backward.
    ``loss_chunk``: compute the loss that many positions of every row at a time (``helpers.loss``, lesson 10).
    """
    in_backward = isinstance(optimizer, OptimizerInBackward)
    k = gradient_accumulation_steps
    if in_backward and k > 1:
        raise ValueError("an optimizer stepped inside backward cannot accumulate gradients: each gradient is "
                         "consumed and freed as soon as it is ready (gradient_accumulation_steps must be 1)")
    ensure_trainable(model)  # a 4-bit layer packed for CPU inference has no backward (helpers.cpu_packing)
    set_checkpointing(model, gradient_checkpointing)
    model.train()
    device = next(model.parameters()).device
    rows = len(next(iter(batch.values())))
    if k < 1 or rows % k:
        raise ValueError(f"gradient_accumulation_steps={k} must divide the batch's {rows} rows")
    micro = [{name: v[i::k].to(device) for name, v in batch.items()} for i in range(k)]

    def step() -> float:
        total = 0.0
        for part in micro:
            loss = causal_lm_loss(model, part, loss_chunk) / k
            loss.backward()
            total += loss.item()
        if not in_backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return total

    return step


class OptimizerInBackward:
    """One optimizer per trainable parameter, each stepped from a post-accumulate-grad hook the moment that
    parameter's gradient is ready, which it then frees: PyTorch's "optimizer step in backward" recipe. No
    gradient outlives its own update, so a full fine-tune never holds every gradient at once.

        optimizer = OptimizerInBackward(model, torch.optim.AdamW, lr=1e-5)
        step = make_train_step(model, optimizer, batch)      # forward and backward; the updates happen inside

    What it gives up: anything that needs every gradient at once before the update (clipping the global norm,
    gradient accumulation, a loss-scale check for inf) cannot be done. ``state``, ``param_groups`` and the
    step hooks cover every parameter's optimizer, so ``helpers.memory.measure`` sees it like one optimizer.
    """

    def __init__(self, model, optimizer_class=torch.optim.AdamW, **options):
        self.optimizers = {p: optimizer_class([p], **options) for p in model.parameters() if p.requires_grad}
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.optimizers]

    def _step(self, p) -> None:
        self.optimizers[p].step()
        self.optimizers[p].zero_grad(set_to_none=True)

    @property
    def state(self) -> dict:
        return {p: st for opt in self.optimizers.values() for p, st in opt.state.items()}

    @property
    def param_groups(self) -> list:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def register_step_pre_hook(self, hook):
        return _Handles([opt.register_step_pre_hook(hook) for opt in self.optimizers.values()])

    def register_step_post_hook(self, hook):
        return _Handles([opt.register_step_post_hook(hook) for opt in self.optimizers.values()])

    def remove(self) -> None:
        """Take the hooks off the model: its parameters go back to plain gradients."""
        _Handles(self._handles).remove()


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def make_forward(model, batch: dict):
    """A closure running inference on ``batch`` (no grad), as ``generate`` or evaluation would."""
    prevent_packing(model)  # the course measures the layout it trains (helpers.cpu_packing)
    model.eval()
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)

    @torch.no_grad()
    def forward():
        return model(input_ids=ids, use_cache=False).logits.shape

    return forward


def set_checkpointing(model, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, non-reentrant, with today's API.

    transformers 5.x renamed ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` to
    ``activation_checkpointing_enable(activation_checkpointing_kwargs=...)``; the old names still work
    with a FutureWarning until v6.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled == model.is_activation_checkpointing:
            return  # enabling twice would add a second embedding hook that disabling never removes
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
            # Enabling also hooked the embeddings so their output requires grad; disabling leaves that
            # hook in place (transformers 5.23), which makes frozen bottom layers save activations.
            if getattr(model, "_require_grads_hook", None) is not None:
                model.disable_input_require_grads()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def measure_step(model, batch: dict, optimizer_class=torch.optim.AdamW, gradient_checkpointing: bool = False):
    """One steady-state training step of ``model``'s trainable parameters, measured by category: an
    optimizer of ``optimizer_class`` with lr=0 (the weights do not move), a warm-up step that allocates its
    state, then ``helpers.memory.measure`` of the next step."""
    from .memory import measure

    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=0.0)
    step = make_train_step(model, optimizer, batch, gradient_checkpointing=gradient_checkpointing)
    step()
    return measure(step, model=model, optimizer=optimizer)


def snapshot_step_on_gpu(model, batch: dict, path: str, optimizer_class=torch.optim.AdamW, **step_options) -> str:
    """PyTorch's own record of one training step of ``model`` on the GPU (``helpers.memory.cuda_memory_snapshot``):
    the model moves to the GPU, takes a warm-up step and a recorded one (an optimizer of ``optimizer_class`` over its
    trainable parameters, lr=0; ``step_options`` as for ``make_train_step``), and moves back to the CPU. Returns
    ``path``, for https://pytorch.org/memory_viz. Raises ``RuntimeError`` without a CUDA device."""
    from .memory import cuda_memory_snapshot

    if not torch.cuda.is_available():
        raise RuntimeError("snapshot_step_on_gpu needs a CUDA device; on the CPU, measure(..., timeline=True)")
    device = next(model.parameters()).device
    model.to("cuda")
    try:
        optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=0.0)
        step = make_train_step(model, optimizer, batch, **step_options)
        step()
        with cuda_memory_snapshot(path):
            step()
    finally:
        model.to(device)
        torch.cuda.empty_cache()
    return path
