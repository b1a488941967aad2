"""Launch a real multi-process run from a notebook, read what each rank measured, and the ZeRO formulas.

    reports = launch("zero1", "zero2")         # one `deepspeed --num_gpus 2 ...` on CPU over gloo, both runs
    reports["zero2"][0]["world_size"], reports["zero2"][1]["model_states"]["optimizer"]
    zero_model_states(params, stage=2, world_size=2)     # the ZeRO paper's per-rank bytes

Each run in ``RUNS`` is started with the launcher a practitioner uses for that engine (``accelerate launch``,
``torchrun`` or ``deepspeed``) as a subprocess with a time limit. Every rank runs ``helpers.distributed.worker``,
which trains a few steps, measures its own memory and writes ``<run>/rank<R>.json``; runs that share a
launcher can share one launch (they run one after the other in the same processes). A launch that fails (a rank
dies, the port is taken, DeepSpeed cannot compile its ops, the time limit passes) raises ``LaunchError`` with
a sentence saying which, and the launcher's last lines, within the time limit: the notebook never hangs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..constants import ROOT
from ..progress import progress

WORLD_SIZE = 2
WORKER = "helpers.distributed.worker"


@dataclass(frozen=True)
class RunSpec:
    """One lesson-09 run: how it is launched and which engine each rank builds."""

    title: str
    launcher: str  # python (one process) | accelerate | torchrun | deepspeed
    engine: str  # single | ddp | fsdp | zero
    stage: int = 0  # the ZeRO stage it corresponds to (DDP: 0, FSDP full shard: 3)
    offload: bool = False  # ZeRO: the optimizer to CPU memory; FSDP: CPUOffloadPolicy (weights, grads, state)
    param_dtype: str = "fp32"  # FSDP: MixedPrecisionPolicy(param_dtype=...) for "bf16", fp32 reduce
    mesh: tuple[int, int] | None = None  # FSDP: a 2-D (replicas, shards) device mesh, i.e. HSDP
    checkpoint: str = ""  # FSDP: "save" (DCP after the first step) | "resume" | "resume_weights" (a fresh launch)
    zero: tuple = ()  # ZeRO: (key, value) pairs that change the worker's zero_optimization section
    steps: int | None = None  # fewer steps than the launch's --steps (a slow run: the last one is still measured)
    label: str = ""  # a few words for a chart's bar (the title otherwise)

    @property
    def short(self) -> str:
        return self.label or self.title


RUNS = {
    "single": RunSpec("one process, the reference", "python", "single", label="one process"),
    "ddp": RunSpec("DDP through Accelerate", "accelerate", "ddp", 0, label="DDP"),
    "fsdp": RunSpec("FSDP full shard (fully_shard)", "torchrun", "fsdp", 3, label="FSDP2 full shard"),
    "zero1": RunSpec("DeepSpeed ZeRO-1", "deepspeed", "zero", 1, label="ZeRO-1"),
    "zero2": RunSpec("DeepSpeed ZeRO-2", "deepspeed", "zero", 2, label="ZeRO-2"),
    "zero3": RunSpec("DeepSpeed ZeRO-3", "deepspeed", "zero", 3, label="ZeRO-3"),
    "zero2_offload": RunSpec("DeepSpeed ZeRO-2, optimizer offloaded to CPU", "deepspeed", "zero", 2, True,
                             label="ZeRO-2 + CPU offload"),
    # What real multi-GPU runs add (lesson 09's last sections): FSDP2's policies, HSDP, DCP checkpoints, buckets
    "fsdp_bf16": RunSpec("FSDP2 + MixedPrecisionPolicy(bf16 compute, fp32 reduce)", "torchrun", "fsdp", 3,
                         param_dtype="bf16", steps=2),  # bf16 matmuls are slow on CPUs without AVX512-BF16
    "fsdp_offload": RunSpec("FSDP2 + CPUOffloadPolicy", "torchrun", "fsdp", 3, offload=True),
    "hsdp": RunSpec("HSDP: 2-D mesh, 2 replicas x 1 shard", "torchrun", "fsdp", 0, mesh=(2, 1)),
    "fsdp_save": RunSpec("FSDP2, DCP checkpoint after step 1", "torchrun", "fsdp", 3, checkpoint="save"),
    "fsdp_resume": RunSpec("FSDP2 resumed from the DCP checkpoint", "torchrun", "fsdp", 3, checkpoint="resume"),
    "fsdp_resume_weights": RunSpec("FSDP2 resumed, weights only (fresh AdamW)", "torchrun", "fsdp", 3,
                                   checkpoint="resume_weights"),
    "zero2_buckets": RunSpec("DeepSpeed ZeRO-2, overlap_comm + 10x buckets", "deepspeed", "zero", 2,
                             zero=(("overlap_comm", True), ("reduce_bucket_size", 20_000_000),
                                   ("allgather_bucket_size", 20_000_000))),
}


def recipe_for(name: str, batch_size: int = 1, seq_len: int = 64):
    """The ``helpers.estimate.Recipe`` of ``RUNS[name]`` as each rank of ``helpers.distributed.worker`` runs it: the
    engine, its stage and the settings its buffers depend on (DDP's gradient-as-bucket-view buckets, DeepSpeed's
    bucket sizes), ``batch_size`` rows of ``seq_len`` tokens per rank per optimizer step (one micro-batch: the
    worker does not accumulate), fp32 AdamW. The single-process reference takes every rank's rows."""
    from ..estimate import Recipe
    from .worker import DEEPSPEED_BUFFERS

    spec = RUNS[name]
    if spec.engine == "single":
        return Recipe(batch_size=batch_size * WORLD_SIZE, seq_len=seq_len)
    base = Recipe(batch_size=batch_size, seq_len=seq_len, world_size=WORLD_SIZE)
    if spec.engine == "ddp":
        return base.but(gradient_as_bucket_view=True)
    if spec.engine == "zero":
        # allgather_bucket_size is not a Recipe field: in DeepSpeed 0.19 the ZeRO-1/2 all-gather writes straight into
        # the flat weight buffer (it only sets how many pieces the gather is cut into), so it allocates nothing.
        buffers = {**DEEPSPEED_BUFFERS, **{k: v for k, v in spec.zero if k in ("reduce_bucket_size", "overlap_comm")}}
        return base.but(engine="deepspeed", zero_stage=spec.stage, offload_optimizer=spec.offload, **buffers)
    if spec.param_dtype != "fp32" or spec.mesh:
        raise ValueError(f"run {name!r}: helpers.estimate does not model FSDP2's {spec.title} (lesson 09 computes it)")
    # FSDP; CPUOffloadPolicy on a CPU-only machine moves nothing (the device is the CPU); a checkpoint adds no tensor
    return base.but(zero_stage=spec.stage)


class LaunchError(RuntimeError):
    """A multi-process launch that did not produce a report from every rank; the message says why."""


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(names, out: str | Path, port: int, nproc: int = WORLD_SIZE, extra=()) -> list[str]:
    """The exact command line a practitioner would type for the runs ``names`` (one launcher's runs)."""
    names = [names] if isinstance(names, str) else list(names)
    launchers = {RUNS[n].launcher for n in names}
    if len(launchers) != 1:
        raise ValueError(f"runs {names} use different launchers ({', '.join(sorted(launchers))}): launch them apart")
    spec = RUNS[names[0]]
    bin_dir = Path(sys.executable).parent
    worker = ["--runs", ",".join(names), "--out", str(out), *extra]
    if spec.launcher == "python":
        return [sys.executable, "-m", WORKER, *worker]
    if spec.launcher == "accelerate":
        # --multi_gpu selects the torchrun-style launcher; ACCELERATE_USE_CPU (see ``environment``) makes each
        # rank a CPU process over gloo. (``--cpu --num_processes 2`` would start a single process.)
        return [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), "-m", WORKER, *worker]
    if spec.launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port),
                "-m", WORKER, *worker]
    if spec.launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
                "--module", WORKER, *worker]
    raise ValueError(f"unknown launcher {spec.launcher!r}: accelerate, torchrun or deepspeed")


LAUNCH_TAG = "COURSE_LAUNCH_ID"  # set in every process of a launch, so that all of them can be found and stopped


def environment(tag: str = "") -> dict[str, str]:
    """The launch environment: the repo importable, CPU ranks with one thread each (two ranks, two cores)."""
    env = dict(os.environ)
    env[LAUNCH_TAG] = tag
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), PYTHONWARNINGS="ignore")
    return env


COMPILER_MISSING = ("not found", "command failed", "error building extension", "no such file")


def diagnose(log: str, returncode: int | None, timed_out: bool, limit: float) -> str:
    """One sentence on why a launch failed, from the launcher's output (each sign matched within one line)."""
    lines = [line.lower() for line in log.splitlines()]

    def any_line(*needles, also=("",)):
        return any(any(n in line for n in needles) and any(a in line for a in also) for line in lines)

    if any_line("eaddrinuse", "address already in use"):
        return ("The rendezvous port is already in use (another run, or a previous one that has not exited): "
                "launch again with another port (launch(..., port=None) picks a free one).")
    if any_line("ninja", "gcc", "g++", "c++", "error building extension", also=COMPILER_MISSING):
        return ("DeepSpeed could not compile one of its ops: it needs a C++ compiler (gcc/g++) and ninja on "
                "this machine (`apt install build-essential`, `pip install ninja`).")
    if timed_out:
        return (f"The run did not finish within {limit:.0f} s and was stopped (all its processes killed). "
                "A rank may be waiting for one that died, or the machine is busy; see the last lines below.")
    # torchrun: "exitcode  : 3" in its failure table; deepspeed: "... exits with return code = 3"
    if any_line("childfailederror", "exits with return code", "killing subprocess") or any(
            "exitcode" in line and "exitcode  : 0" not in line for line in lines):
        return ("A rank died (non-zero exit); the launcher stopped the others. Its own error is in the lines "
                "below (look for the first Traceback).")
    return f"The launcher exited with status {returncode}; see the last lines below."


def _read_reports(out: Path, names) -> dict[str, list[dict]]:
    """Each run's rank reports, rank 0 first; a report a killed rank left half-written is left out."""
    reports = {}
    for name in names:
        ranks = []
        for path in (out / name).glob("rank*.json"):
            try:
                ranks.append(json.loads(path.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
        reports[name] = sorted(ranks, key=lambda r: r["rank"])
    return reports


def _wait(proc: subprocess.Popen, timeout: float, name: str) -> bool:
    """Wait for the launcher to exit; True if ``timeout`` seconds passed first. Meanwhile a line with the runs'
    names and the time elapsed ticks every second where progress is shown (a live notebook: helpers.progress)."""
    bar = progress(desc=name, bar_format="{desc}: {elapsed} elapsed" + f" (time limit {timeout:.0f} s)")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                proc.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                return False
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    return True
                bar.refresh()
    finally:
        bar.close()


def launch(*names: str, out: str | Path | None = None, port: int | None = None, timeout: float = 240,
           nproc: int = WORLD_SIZE, extra=()) -> dict[str, list[dict]]:
    """Run ``RUNS[name]`` for each name (all with one launcher, in one launch); return each run's rank reports,
    rank 0 first: ``{"zero2": [rank0, rank1], ...}``.

    Raises ``LaunchError`` (with the reason and the launcher's last lines) if it fails or takes longer than
    ``timeout`` seconds; every process the launch started is killed first.
    """
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise ValueError(f"unknown run(s) {unknown or '(none given)'}: choose from {', '.join(RUNS)}")
    out = Path(out or tempfile.mkdtemp(prefix="sharding-"))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*/rank*.json"):
        old.unlink()
    if RUNS[names[0]].launcher == "python":
        nproc = 1
    if RUNS[names[0]].launcher == "deepspeed" and not (shutil.which("c++") or shutil.which("g++")):
        raise LaunchError(diagnose("c++: not found", None, False, timeout))  # DeepSpeed would fail on its first op
    port = port or free_port()
    cmd = command(names, out, port, nproc, extra)
    title = " + ".join(RUNS[n].title for n in names)
    t0 = time.perf_counter()
    # Every process of the launch inherits this tag, so all of them can be found and stopped (stop_launch).
    tag = f"{os.getpid()}-{port}-{time.time_ns()}"
    log_path = out / "launch.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(tag), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = _wait(proc, timeout, " + ".join(names))
        # Stop whatever is left: on a timeout everything; after a failure, ranks a launcher may have orphaned.
        stop_launch(tag)
        if proc.poll() is None:  # the tag could not be read (another OS, no permission): its process group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    seconds = time.perf_counter() - t0
    log = log_path.read_text(errors="replace")
    reports = _read_reports(out, names)
    if timed_out or proc.returncode != 0 or any(len(r) != nproc for r in reports.values()):
        reason = diagnose(log, proc.returncode, timed_out, timeout)
        tail = "\n".join(log.splitlines()[-25:])
        raise LaunchError(f"{title} failed after {seconds:.0f} s: {reason}\n"
                          f"command: {' '.join(cmd)}\nfull log: {out / 'launch.log'}\n--- last lines ---\n{tail}")
    for r in (r for ranks in reports.values() for r in ranks):
        r["launch_seconds"], r["command"] = seconds, cmd
    return reports


def stop_launch(tag: str) -> int:
    """Kill every process started by the launch tagged ``tag`` (found by its environment: launchers start ranks in
    sessions of their own, so a process group or tree is not enough). Returns how many were killed."""
    import psutil

    killed = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(LAUNCH_TAG) == tag:
                p.send_signal(signal.SIGKILL)
                killed.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    psutil.wait_procs(killed, timeout=10)
    return len(killed)


# ------------------------------------------------------------------------------------------------
# The ZeRO paper's per-rank model states (Rajbhandari et al. 2020, section 5)
# ------------------------------------------------------------------------------------------------
def zero_model_states(params: int, stage: int, world_size: int, weight_bytes: int = 2, grad_bytes: int = 2,
                      k: int = 12) -> dict[str, float]:
    """Bytes of model states per rank: weights, gradients and optimizer state (K bytes per parameter: fp32
    master weights, momentum and variance for mixed-precision Adam). The paper's defaults give stage 0
    16 Psi, stage 1 4 Psi + 12 Psi / N, stage 2 2 Psi + 14 Psi / N, stage 3 16 Psi / N."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage!r}: 0 (plain data parallel), 1, 2 or 3")
    n = world_size
    return {"weights": params * weight_bytes / (n if stage >= 3 else 1),
            "gradients": params * grad_bytes / (n if stage >= 2 else 1),
            "optimizer": params * k / (n if stage >= 1 else 1)}
