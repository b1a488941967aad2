"""The causal-LM loss without the whole logits tensor (lesson 10).

Transformers' loss computes ``lm_head`` on every position, upcasts the logits to fp32 and takes their
log-softmax: at the start of backward the fp32 logits, the log-softmax output and two gradients of the
logits' size are alive (``helpers.estimate.loss_bytes``). ``chunked_causal_lm_loss`` runs the output layer
and the loss on ``chunk`` positions of every row at a time, each chunk under ``torch.utils.checkpoint`` so
that nothing of its logits is kept: backward recomputes one chunk's logits, takes their gradient and frees
them before the next. The loss and the gradients are the plain loss's, within fp32 rounding.

    loss = causal_lm_loss(model, batch, chunk=32)          # model: a causal LM, or a PEFT model around one
    loss.backward()

The fused GPU kernels do the same without a Python loop, and without materialising a chunk's logits in
fp32 at all: Liger Kernel's ``LigerFusedLinearCrossEntropyLoss`` and Apple's Cut Cross-Entropy
(``cut_cross_entropy.linear_cross_entropy``); ``fused_linear_cross_entropy`` uses Liger's when CUDA and the
package are present.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # the label of a position that has no target (padding, a prompt the loss skips)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t + 1: the labels shifted left by one, the last position without a target
    (what transformers' ``ForCausalLMLoss`` does, so the same ``labels`` give the same loss)."""
    return F.pad(labels, (0, 1), value=IGNORE)[:, 1:]


def _summed_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # one chunk's logits, in fp32 as the plain loss computes them
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int = 32,
                           num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The mean next-token loss of ``head(hidden)`` against ``labels`` (rows x positions), ``chunk`` positions
    of every row at a time. The rows stay whole in each chunk, so every row passes through ``head`` in every
    chunk. ``num_items_in_batch``: divide the summed token losses by this instead of this batch's target count
    (a micro-batch's share of the whole step, lesson 07)."""
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk={chunk!r}: a whole number of positions, at least 1")
    targets = next_token_targets(labels)
    count = (targets != IGNORE).sum() if num_items_in_batch is None else num_items_in_batch
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk, dim=1), targets.split(chunk, dim=1), strict=True):
        if bool((t != IGNORE).any()):
            total = total + checkpoint(_summed_loss, head, h, t, use_reentrant=False)
    return total / count


def causal_lm_loss(model, batch: dict, chunk: int | None = None,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The causal-LM loss of ``model`` on ``batch`` (input_ids, attention_mask, labels): transformers' own
    (``model(**batch).loss``) when ``chunk`` is None, else the decoder's last hidden states through
    ``chunked_causal_lm_loss``: the same number, without the batch's logits."""
    if chunk is None:
        return model(**batch, use_cache=False, num_items_in_batch=num_items_in_batch).loss
    return chunked_causal_lm_loss(last_hidden_states(model, batch), model.get_output_embeddings(), batch["labels"],
                                  chunk, num_items_in_batch)


def last_hidden_states(model, batch: dict) -> torch.Tensor:
    """The decoder's output for ``batch``: what the output layer would turn into logits (the decoder of a causal
    LM, or of the one inside a PEFT model)."""
    return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                               use_cache=False).last_hidden_state


def fused_linear_cross_entropy(model, batch: dict) -> torch.Tensor | None:
    """Liger Kernel's fused linear cross-entropy (a Triton kernel: CUDA only) on ``batch``, or None when CUDA or
    the ``liger-kernel`` package is missing. It never builds the logits in fp32: each block of rows computes its
    logits, their loss and their gradient in one kernel, during the forward."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return None  # an optional package for CUDA machines: not part of the course's CPU install
    liger = importlib.import_module("liger_kernel.transformers")
    hidden = last_hidden_states(model, batch)
    targets = next_token_targets(batch["labels"])
    head = model.get_output_embeddings()
    return liger.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)(head.weight, hidden.flatten(0, 1),
                                                                       targets.flatten())


def measure_loss(vocab: int, rows: int, seq_len: int, hidden_size: int = 576, chunk: int | None = None,
                 seed: int = 0):
    """The loss on its own, measured (``helpers.memory.measure``): hidden states of ``rows`` x ``seq_len`` x
    ``hidden_size`` that require grad (as a decoder's output does) through a frozen output layer of ``vocab``
    rows, the loss and its backward. The output layer is the weights; the hidden states, the logits and
    everything the loss makes are activations."""
    from .memory import measure

    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    labels = torch.randint(0, vocab, (rows, seq_len), generator=g)
    state = torch.randn(rows, seq_len, hidden_size, generator=g)

    def step():
        hidden = state.clone().requires_grad_(True)
        if chunk is None:
            logits = head(hidden).float()
            loss = F.cross_entropy(logits.flatten(0, 1), next_token_targets(labels).flatten(), ignore_index=IGNORE)
            del logits  # as in transformers: only the loss is kept, the output (and its logits) dropped
        else:
            loss = chunked_causal_lm_loss(hidden, head, labels, chunk)
        loss.backward()

    return measure(step, head)
