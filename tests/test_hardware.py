"""The hardware check reads CPU flags and gives one plain sentence per question."""

from helpers.cpu_packing import packing_supported
from helpers.hardware import HardwareCheck, cpu_flags, hardware_check


def test_cpu_flags_parse_linux_and_arm_formats():
    assert {"avx512_bf16", "amx_tile"} <= cpu_flags("processor : 0\nflags\t\t: fpu avx512_bf16 amx_tile\n")
    assert "asimd" in cpu_flags("Features\t: fp asimd\n")
    assert cpu_flags("") == set()


def test_verdicts_cover_cpu_and_a_gpu_without_bf16():
    here = hardware_check()
    text = str(here)
    assert "bf16" in text and "bitsandbytes" in text and here.device in {"cpu", "cuda"}
    t4 = HardwareCheck(cuda=True, gpu_name="Tesla T4", compute_capability=(7, 5), bf16=False, fp16_training=True,
                       cpu_bf16=False, cpu_amx=False, bitsandbytes="0.50.2, CUDA backend",
                       notes=["No bf16 on this GPU (a T4 or V100): use fp16 with a gradient scaler."])
    lines = t4.lines()
    assert lines[0].startswith("GPU: Tesla T4, compute capability 7.5")
    assert any("not supported" in line for line in lines) and any("fp16" in line for line in lines)


def test_a_cpu_where_bitsandbytes_packs_4bit_weights_says_so():
    here = hardware_check()
    assert here.cpu_packs_4bit == packing_supported()
    packing = HardwareCheck(cuda=False, gpu_name=None, compute_capability=None, bf16=True, fp16_training=False,
                            cpu_bf16=True, cpu_amx=True, bitsandbytes="0.50.2, CPU backend", cpu_packs_4bit=True)
    assert any("cannot be trained through" in line and "lesson 05" in line for line in packing.lines())
    assert not any("repacks" in line for line in HardwareCheck(**{**packing.__dict__, "cpu_packs_4bit": False}).lines())


def test_a_t4_counts_as_no_native_bf16(monkeypatch):
    """torch says a T4 supports bf16 by default (emulated): the course asks about native support."""
    import torch

    from helpers import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    check = hardware.hardware_check()
    assert check.bf16 is False
    assert any("emulated" in note for note in check.notes)
