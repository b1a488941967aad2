"""What this machine supports, in plain English: the hardware check every lesson can print.

    from helpers.hardware import hardware_check
    print(hardware_check())          # one verdict per line
    hardware_check().bf16            # True / False

It answers the questions the techniques depend on: is there a CUDA GPU and of which compute
capability (bf16 needs Ampere, 8.0, or newer; fp16 tensor cores need Volta, 7.0); does the CPU have
AVX512-BF16 or AMX (fast bf16 matrix maths on CPU); which bitsandbytes backend will run the
8-bit and 4-bit layers; and whether bitsandbytes repacks 4-bit weights for CPU inference here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cpu_packing import packing_supported


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@dataclass
class HardwareCheck:
    cuda: bool
    gpu_name: str | None
    compute_capability: tuple[int, int] | None
    bf16: bool  # bf16 arithmetic is supported on the device the lessons use
    fp16_training: bool  # TrainingArguments(fp16=True) works: needs CUDA
    cpu_bf16: bool  # AVX512-BF16 or AMX: fast bf16 matmuls on the CPU
    cpu_amx: bool
    bitsandbytes: str  # version and backend, or why it is unavailable
    cpu_packs_4bit: bool = False  # bitsandbytes repacks 4-bit weights for CPU inference here (helpers.cpu_packing)
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def lines(self) -> list[str]:
        out = []
        if self.cuda:
            major, minor = self.compute_capability
            out.append(f"GPU: {self.gpu_name}, compute capability {major}.{minor}.")
        else:
            out.append("GPU: none found; every lesson runs on the CPU (slower, same memory categories).")
        out.append("bf16: " + ("supported" if self.bf16 else "not supported") + (
            " on this GPU." if self.cuda else
            (" on this CPU, with fast AVX512-BF16/AMX instructions." if self.cpu_bf16 else
             " on this CPU, without AVX512-BF16/AMX instructions: bf16 maths is converted, often no "
             "faster than fp32 (lesson 01 measures it).")))
        out.append("fp16 training (TrainingArguments(fp16=True)): " + (
            "available." if self.fp16_training else "needs a CUDA GPU; on this machine use bf16."))
        out.append(f"bitsandbytes: {self.bitsandbytes}.")
        if self.cpu_packs_4bit:
            out.append("4-bit on this CPU: bitsandbytes repacks a 4-bit layer for fast bf16 inference the first time "
                       "it runs in eval mode without gradients, and that layout cannot be trained through; the "
                       "course's helpers keep 4-bit weights unpacked (lesson 05 shows the trap).")
        out.extend(self.notes)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, printer, cycle) -> None:  # how IPython displays it
        printer.text(str(self))


def _bitsandbytes() -> str:
    try:
        import bitsandbytes as bnb
    except Exception as err:  # not installed, or its native library failed to load
        return f"unavailable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    backend = "CUDA" if torch.cuda.is_available() else "CPU"
    return f"{bnb.__version__}, {backend} backend (8-bit and 4-bit layers run on the {backend})"


def hardware_check() -> HardwareCheck:
    flags = cpu_flags()
    cpu_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    cpu_amx = "amx_tile" in flags or "amx_bf16" in flags
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability(0)
        # Native bf16 only: torch's default also says True on a T4, which emulates it slowly.
        check = HardwareCheck(cuda=True, gpu_name=torch.cuda.get_device_name(0), compute_capability=cc,
                              bf16=torch.cuda.is_bf16_supported(including_emulation=False), fp16_training=True,
                              cpu_bf16=cpu_bf16, cpu_amx=cpu_amx, bitsandbytes=_bitsandbytes())
        if cc < (7, 0):
            check.notes.append("This GPU predates tensor cores (compute capability < 7.0): 16-bit saves memory "
                               "but is not faster.")
        elif not check.bf16:
            check.notes.append("No native bf16 on this GPU (a T4 or V100: emulated, slow): use fp16 with a "
                               "gradient scaler.")
        return check
    return HardwareCheck(cuda=False, gpu_name=None, compute_capability=None, bf16=True, fp16_training=False,
                         cpu_bf16=cpu_bf16, cpu_amx=cpu_amx, bitsandbytes=_bitsandbytes(),
                         cpu_packs_4bit=packing_supported())
