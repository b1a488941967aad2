"""What every rank of a lesson-09 run executes: a few optimizer steps under one sharding engine, measured.

    torchrun --nproc_per_node 2 -m helpers.distributed.worker --runs fsdp --out /tmp/runs
    deepspeed --num_gpus 2 --module helpers.distributed.worker --runs zero1,zero2 --out /tmp/runs

``helpers.distributed.launch.launch`` builds these commands; this module is the training script they start. Each rank
trains the same model on its own slice of a global batch (rows rank, rank + N, ...), so the mean of the
ranks' losses is the loss a single process computes on the whole batch, step after step, if the engine is
right. Each rank measures its own steady-state step (the last one) with ``helpers.memory.Meter``: tensor bytes by
category at the step's peak, this process only; and its *model states* at the moment the optimizer steps (the
weights it holds, the gradients the optimizer consumes, the optimizer state after the step), the quantities the
ZeRO paper's formulas count. It writes ``<run>/rank<R>.json`` into ``--out``. Several runs of one launcher run
one after the other in the same processes (one process group), which saves a launch per run.

The engines, written the way a practitioner writes them today:
- ``single``: one process, plain PyTorch (the reference the others must match; ``python -m``, no launcher);
- ``ddp``: ``Accelerator`` (MULTI_CPU, DistributedDataParallel over gloo), every rank a full replica;
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` on each decoder block and the root (FSDP2, ZeRO-3-like);
- ``zero``: ``deepspeed.initialize`` with a ZeRO config of ``--stage`` 1, 2 or 3 (``--offload`` moves the
  optimizer state and fp32 master weights to CPU memory).

A run's ``RunSpec`` can also ask FSDP2 for ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
reduce_dtype=torch.float32)``, ``CPUOffloadPolicy`` or a 2-D (replicas, shards) mesh (HSDP); for a checkpoint
saved with ``torch.distributed.checkpoint`` (DCP) after the first step (``save``) or loaded in a fresh launch before
the second (``resume``: model and optimizer; ``resume_weights``: the model only, with a fresh optimizer); and for
other DeepSpeed ``zero_optimization`` settings (bucket sizes, ``overlap_comm``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

LR = 1e-3


def build_model(args):
    """The mid-size course model (``--model course``), or the tiny random one unit tests use (``--model tiny``)."""
    from ..models import mid_size_model, tiny_model

    return tiny_model() if args.model == "tiny" else mid_size_model(args.layers)


def global_batch(rows: int, seq_len: int, step: int, vocab: int | None = None) -> dict:
    """Step ``step``'s global batch of real text (the course corpus), the same in every process; with ``vocab``
    (the tiny test model), random token ids from a seeded generator instead."""
    if vocab is not None:
        ids = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(step))
        return {"input_ids": ids, "labels": ids}
    batch = course_corpus().train_batch(rows, seq_len, step=step)
    return {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}


@functools.cache
def course_corpus():
    """The course corpus, tokenized once per process (the first 200 k characters: plenty for a few steps)."""
    from ..data import Corpus
    from ..models import load_tokenizer

    return Corpus(load_tokenizer(), max_chars=200_000)


# DeepSpeed's buffer sizes for these small runs, in elements (its defaults would allocate a 2 GB reduction bucket);
# ``helpers.distributed.launch.recipe_for`` gives the predictor the same numbers.
DEEPSPEED_BUFFERS = {"reduce_bucket_size": 2_000_000, "prefetch_bucket_size": 2_000_000,
                     "param_persistence_threshold": 0}


def deepspeed_config(stage: int, offload: bool, micro_batch: int, **zero_settings) -> dict:
    """The ZeRO config this run uses (the files in ``configs/`` are the same, sized for GPUs); ``zero_settings``
    replace or add ``zero_optimization`` keys (``overlap_comm=True``, ``reduce_bucket_size=...``)."""
    zero = {"stage": stage, "reduce_bucket_size": DEEPSPEED_BUFFERS["reduce_bucket_size"],
            "allgather_bucket_size": 2_000_000}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=DEEPSPEED_BUFFERS["prefetch_bucket_size"],
                    stage3_param_persistence_threshold=DEEPSPEED_BUFFERS["param_persistence_threshold"])
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    zero.update(zero_settings)
    # gradient_clipping: DeepSpeed 0.19 clips the gradient norm to 1.0 unless told otherwise; the PyTorch loops
    # here do not clip, so neither does this (the HF Trainer sets it from max_grad_norm, also 1.0 by default).
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def fsdp_options(param_dtype: str = "fp32", offload: bool = False, mesh=None) -> dict:
    """``fully_shard``'s keyword arguments for a run: the mixed-precision and offload policies, the device mesh."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    options = {}
    if param_dtype != "fp32":
        # compute (and the all-gather) in 16 bits; gradients reduced in fp32 into the fp32 sharded parameters
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, DTYPES[param_dtype]),
                                                    reduce_dtype=torch.float32)
    if offload:
        # pin_memory needs an accelerator's driver; on a GPU machine keep the default (True)
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if mesh is not None:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if torch.cuda.is_available() else "cpu"
        options["mesh"] = init_device_mesh(device, tuple(mesh), mesh_dim_names=("replicate", "shard"))
    return options


DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


class Run:
    """One engine's model, optimizer and step; ``state`` names the engine's own tensors by category."""

    def __init__(self, args, engine: str, stage: int = 0, offload: bool = False, spec=None):
        self.args, self.engine_name, self.stage, self.offload = args, engine, stage, offload
        self.spec = spec
        dist = torch.distributed
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        model = build_model(args).train()  # the lesson's models load in eval mode; the engines train them
        self.params = sum(p.numel() for p in model.parameters())
        self.bucket_views: list[torch.Tensor] = []
        self.module = self.model = model
        if engine == "fsdp":
            from torch.distributed.fsdp import fully_shard

            options = fsdp_options(spec.param_dtype, offload, spec.mesh) if spec is not None else {}
            for block in model.model.layers:  # one unit per decoder block, then the rest (embedding, norm)
                fully_shard(block, **options)
            fully_shard(model, **options)  # before the optimizer: it must see the sharded parameters
        # ``model`` runs the step (the engine's wrapper); ``module`` is the plain model; ``inner`` the torch optimizer
        # whose ``.state`` holds the moments (DeepSpeed wraps it in its ZeRO optimizer).
        self.optimizer = self.inner = torch.optim.AdamW(model.parameters(), lr=LR)
        if engine == "zero":
            import deepspeed

            cfg = deepspeed_config(stage, offload, args.micro_batch, **dict(spec.zero if spec is not None else ()))
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.inner, config=cfg)
            self.inner = self.optimizer.optimizer
        elif engine == "ddp":
            self.model, self.optimizer = accelerator().prepare(model, self.optimizer)

    def batch(self, step: int) -> dict:
        vocab = self.module.config.vocab_size if self.args.model == "tiny" else None
        whole = global_batch(self.args.micro_batch * self.args.world_batch_ranks, self.args.seq_len, step, vocab)
        if self.engine_name == "single":
            return whole
        return {k: v[self.rank::self.world_size] for k, v in whole.items()}

    def state(self) -> dict[str, list]:
        """The engine's own long-lived tensors by category, so that the meter counts them from the start of the step
        (a tensor made before the step is otherwise counted from the moment the step first touches it):
        - DDP: its all-reduce buckets, which every .grad is a view into (gradient_as_bucket_view);
        - DeepSpeed: the fp32 master partition is optimizer state (the ZeRO paper's K = 12 bytes count it there);
          under ZeRO-3 each parameter's ``ds_tensor`` shard is a weight, and the flat buffer of the rank's gradient
          partition and the reduction bucket live from one step to the next; with the optimizer offloaded, so
          does the fp32 gradient of the partition. Other buffers are made inside the step and seen as they are."""
        if self.engine_name == "ddp":
            return {"gradients": self.bucket_views}
        if self.engine_name != "zero":
            return {}
        opt = self.optimizer
        master = [*getattr(opt, "single_partition_of_fp32_groups", []),  # stages 1 and 2
                  *getattr(opt, "fp32_partitioned_groups_flat", [])]  # stage 3
        out = {"optimizer": master, "gradients": [], "activations": []}
        if self.stage == 3:
            out["weights"] = [p.ds_tensor for p in self.module.parameters() if hasattr(p, "ds_tensor")]
            out["gradients"].append(opt.grad_partitions_flat_buffer)
            out["activations"] += [b.buffer for b in opt.ipg_buckets.values() if b.buffer is not None]
        elif self.offload:
            out["gradients"] += [m.grad for m in master if m.grad is not None]
        return out

    def backward(self, step: int) -> torch.Tensor:
        """Forward and backward on this rank's slice of step ``step``'s batch; returns the loss."""
        loss = self.model(**self.batch(step), use_cache=False).loss
        if self.engine_name == "zero":
            self.model.backward(loss)
        elif self.engine_name == "ddp":
            accelerator().backward(loss)
        else:
            loss.backward()
        return loss.detach()

    def update(self) -> None:
        """The optimizer step (DeepSpeed: reduce the gradient partitions, step, gather the weights)."""
        if self.engine_name == "zero":
            self.model.step()
        else:
            self.optimizer.step()
            # DDP's buckets outlive the .grad views into them; keep the views to name the buckets (no extra bytes).
            if self.engine_name == "ddp":
                self.bucket_views = [p.grad for p in self.module.parameters() if p.grad is not None]
            self.optimizer.zero_grad(set_to_none=True)

    def mean_loss(self, loss: torch.Tensor) -> float:
        """The mean of the ranks' losses: one process's loss on the whole batch, if the engine is right."""
        loss = loss.clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= self.world_size
        return loss.item()

    def step(self, step: int) -> float:
        loss = self.backward(step)
        self.update()
        return self.mean_loss(loss)

    def close(self) -> None:
        if self.engine_name == "zero":
            self.model.destroy()


_accelerator = None


def accelerator():
    """The process's one ``Accelerator`` (MULTI_CPU under a launcher: DDP over gloo)."""
    global _accelerator
    if _accelerator is None:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        # gradient_as_bucket_view: each .grad is a view into DDP's all-reduce buckets instead of a second copy
        ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
        _accelerator = Accelerator(cpu=True, kwargs_handlers=[ddp])
    return _accelerator


def init_distributed(engine: str) -> None:
    if engine == "zero":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    elif engine == "ddp":
        accelerator()
    elif engine == "fsdp":
        torch.distributed.init_process_group("gloo")


def model_states(run: Run, step: int) -> tuple[float, dict[str, int]]:
    """Run ``step`` and return its loss and the rank's model states, by identity: the weights it holds; the
    gradient storage it keeps (the larger of what holds gradients when backward ends — the module's .grad, or
    DeepSpeed's reduced ``averaged_gradients`` — and what the optimizer consumes); the optimizer state once the
    step is done. Storage, not elements: a view keeps its whole buffer alive."""
    from ..memory import tensor_bytes, weight_tensors

    states = {}
    loss = run.backward(step)
    holders = [p.grad for p in run.module.parameters() if p.grad is not None]
    after_backward = tensor_bytes([holders, getattr(run.optimizer, "averaged_gradients", None) or []])

    def before(optimizer, *_):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        states["weights"] = tensor_bytes([*weight_tensors(run.module), *run.state().get("weights", [])])
        states["gradients"] = max(after_backward, tensor_bytes(grads))

    def after(optimizer, *_):
        states["optimizer"] = tensor_bytes([optimizer.state, *run.state().get("optimizer", [])])

    handles = [run.inner.register_step_pre_hook(before), run.inner.register_step_post_hook(after)]
    run.update()
    for h in handles:
        h.remove()
    return run.mean_loss(loss), states


def save_checkpoint(run: Run, folder: Path) -> dict:
    """Save the sharded model and optimizer state with DCP: every rank writes its own shards, in parallel, and
    rank 0 the metadata. Returns what this rank wrote: its file, its bytes, the seconds it took."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    t0 = time.perf_counter()
    model_state, optimizer_state = get_state_dict(run.model, run.optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
    rank = run.rank
    mine = [p for p in folder.glob(f"__{rank}_*.distcp")]
    return {"folder": str(folder), "files": {p.name: p.stat().st_size for p in mine},
            "seconds": time.perf_counter() - t0}


def load_checkpoint(run: Run, folder: Path, optimizer: bool = True) -> dict:
    """Load a DCP checkpoint into this run's freshly built (sharded) model and, with ``optimizer``, its AdamW: each
    rank reads what its own shards need, whatever world size saved it (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    t0 = time.perf_counter()
    if optimizer:
        model_state, optimizer_state = get_state_dict(run.model, run.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(run.model, run.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    else:
        state = {"model": get_model_state_dict(run.model)}
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(run.model, state["model"])
    steps = sorted({float(s["step"]) for s in run.inner.state.values() if "step" in s})
    return {"folder": str(folder), "seconds": time.perf_counter() - t0, "optimizer_steps": steps}


def train_and_measure(args, name: str) -> dict:
    from ..memory import Meter
    from .launch import RUNS

    spec = RUNS[name]
    t0 = time.perf_counter()
    run = Run(args, spec.engine, spec.stage, spec.offload, spec)
    setup = time.perf_counter() - t0
    losses, seconds, states, checkpoint = [], [], {}, {}
    folder = Path(args.checkpoint or Path(args.out, "dcp")).resolve()
    first, steps = 0, min(spec.steps or args.steps, args.steps)
    if spec.checkpoint.startswith("resume"):  # a fresh launch: carry on from the checkpoint of the first step
        checkpoint = load_checkpoint(run, folder, optimizer=spec.checkpoint == "resume")
        first = 1
    for i in range(first, steps):
        t = time.perf_counter()
        if i < steps - 1:
            losses.append(run.step(i))
            if spec.checkpoint == "save" and i == 0:
                checkpoint = save_checkpoint(run, folder)
        else:  # the last step is measured: the earlier ones allocated optimizer state (and DDP rebuilt its buckets)
            with Meter(run.module, run.inner) as meter:
                for category, tensors in run.state().items():
                    meter.mark(tensors, category)
                loss, states = model_states(run, i)
                losses.append(loss)
        seconds.append(time.perf_counter() - t)
    run.close()
    dist = torch.distributed
    placement = {}
    if spec.engine == "fsdp":  # where each category lives, and in which dtype, as the rank holds it
        weight = next(run.module.parameters())
        placement = {"weights": [str(weight.device), str(weight.dtype)],
                     "optimizer": sorted({f"{t.device} {t.dtype}" for s in run.inner.state.values()
                                          for t in s.values() if t.dim() > 0}),
                     "weight_placements": [str(pl) for pl in getattr(weight, "placements", ())]}
    return {"run": name, "engine": run.engine_name, "stage": run.stage, "offload": run.offload, "rank": run.rank,
            "param_dtype": spec.param_dtype, "mesh": spec.mesh, "zero": dict(spec.zero), "first_step": first,
            "checkpoint": checkpoint, "placement": placement,
            "world_size": run.world_size, "backend": dist.get_backend() if dist.is_initialized() else None,
            "params": run.params, "layers": args.layers, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
            "losses": losses, "step_seconds": seconds, "setup_seconds": setup,
            "peak": meter.report.as_dict(), "moment": meter.report.moment, "model_states": states}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="comma-separated names from launch.RUNS, or 'single'")
    p.add_argument("--model", choices=("course", "tiny"), default="course")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks of the mid-size course model")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per rank (single: rows per rank x ranks)")
    p.add_argument("--world-batch-ranks", type=int, default=2, help="ranks the global batch is cut for")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="the DCP checkpoint folder (default: <out>/dcp)")
    p.add_argument("--die-at-rank", type=int, default=None, help="testing: this rank exits after joining the group")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher passes it
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1 (the last step is the measured one)")
    from .launch import RUNS

    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    engines = {RUNS[n].engine for n in names}
    if len(engines) != 1:
        p.error(f"runs {names} need different engines {sorted(engines)}: launch them separately")
    init_distributed(engines.pop())
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.die_at_rank == rank:
        print(f"rank {rank}: exiting on purpose (--die-at-rank)", file=sys.stderr, flush=True)
        os._exit(3)
    for name in names:
        report = train_and_measure(args, name)
        folder = Path(args.out, name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
