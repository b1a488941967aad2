"""Lesson 09's checks: each passes the right answer, says "not attempted" to a blank, hints at wrong ones."""

import pytest
from casebook import assert_grades, registered

from helpers.exercises.lesson09 import fitting_stage
from helpers.sharding import zero_model_states

pytestmark = pytest.mark.usefixtures("lenient_checks")

PSI = 13_015_864_320  # LLaMA 13B's parameters (helpers/model_configs/llama-13b.json)
GPU = 80e9
SCENARIO = {"params": PSI, "gpu_bytes": GPU, "gpus": 8, "headroom": 0.25}  # stage 2 is the lowest that fits
RIGHT_CONFIG = {"train_micro_batch_size_per_gpu": "auto",
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}


def cases():
    n, ws = 42_472_512, 4  # four ranks, so that each wrong count is distinct (at two, 16Ψ/2 = 8Ψ)
    zero = RIGHT_CONFIG["zero_optimization"]
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "zero_stage_choice": (2, SCENARIO, [(3, "lowest stage"), (1, "over the"), (0, "over the"),
                                            ("none", "does fit"), ("ZeRO-5", "0, 1, 2 or 3"),
                                            ([2], "stage")]),
        "zero2_optimizer_bytes": (12 * n / ws, {"params": n, "world_size": ws, "measured": 12 * n / ws + 8},
                                  [(8 * n / ws, "master"), (12 * n, "shard"), (16 * n / ws, "gradient"),
                                   (6 * n / ws, "fp32"), (12 * n / ws * 8, "bits"), (12345, "count"),
                                   ("lots", "number")]),
        "zero2_offload_config": (RIGHT_CONFIG, {}, [
            ({**RIGHT_CONFIG, "zero_optimization": {**zero, "stage": 3}}, "stage 3"),
            ({**RIGHT_CONFIG, "zero_optimization": {"stage": 2}}, "offload_optimizer"),
            ({**RIGHT_CONFIG, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme",
                                                                                       "nvme_path": "/tmp"}}},
             "not offloaded"),
            ({**RIGHT_CONFIG, "zero_optimization": {**zero, "offload_param": {"device": "cpu"}}}, "ZeRO-3"),
            ({**RIGHT_CONFIG, "zero_optimization": {"stage": 2, "offload_optimiser": {"device": "cpu"}}}, "rejects"),
            ({"zero_optimization": zero}, "batch size"),
            ({**RIGHT_CONFIG, "train_micro_batch_size_per_gpu": 0}, "whole number"),
            ({**RIGHT_CONFIG, "train_micro_batch_size_per_gpu": "8"}, "whole number"),
            ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_optimization"),
            ("zero2.json", "dict")]),
    }


def test_every_registered_exercise_has_cases():
    assert set(cases()) == registered("09")


@pytest.mark.parametrize("name", ["zero_stage_choice", "zero2_optimizer_bytes", "zero2_offload_config"])
def test_check(name):
    right, context, wrong = cases()[name]
    assert_grades(name, right, wrong, **context)


def test_stage_choice_follows_the_formulas():
    """The scenario's answer comes from the ZeRO formulas, not a constant: shrink the GPU and it moves up."""
    budget = GPU * 0.75
    assert sum(zero_model_states(PSI, 1, 8).values()) > budget >= sum(zero_model_states(PSI, 2, 8).values())
    assert fitting_stage(PSI, GPU, 8, 0.25) == 2
    assert fitting_stage(PSI, 40e9, 8, 0.25) == 3
    assert fitting_stage(PSI, 16e9, 8, 0.25) is None
    assert fitting_stage(1_000_000, 16e9, 8, 0.25) == 0


def test_zero_formulas_reproduce_the_paper():
    """ZeRO paper, figure 1: 7.5 B parameters, 64 GPUs, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB per GPU."""
    per_gpu = [sum(zero_model_states(7.5e9, s, 64).values()) / 1e9 for s in range(4)]
    assert per_gpu == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)
