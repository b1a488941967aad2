"""Lesson 09's checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint,
and wrong or cheating answers never get points. The DeepSpeed config is judged by DeepSpeed's own config class."""

import ast
import copy
import dataclasses
import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from casebook import COURSE, FrameReader, assert_grades, assert_no_points, check_calls, grade, liar, registered

from helpers.checks import EXERCISES, FAIL, PASS, run_check
from helpers.estimate import Dims
from helpers.exercises import lesson09
from helpers.exercises.lesson09 import MID_LAYERS, SCENARIO, SCENARIO_MODEL, fitting_stage
from helpers.models import reference_config
from helpers.notebooks import solution_regions
from helpers.shard_worker import deepspeed_config
from helpers.sharding import WORLD_SIZE, zero_model_states

pytestmark = pytest.mark.usefixtures("lenient_checks")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "solutions" / "09_sharding.ipynb"
NAMES = ["zero_stage_choice", "zero2_optimizer_bytes", "zero2_offload_config"]
PSI = 13_015_864_320  # LLaMA 13B's parameters (helpers/model_configs/llama-13b.json)
GPU = 80e9
STAGE_CONTEXT = {"params": PSI, "gpu_bytes": GPU, "gpus": 8, "headroom": 0.25}  # stage 2 is the lowest that fits
MID = dataclasses.replace(COURSE, layers=MID_LAYERS).params  # the runs' mid-size model: 42,472,512 parameters
BYTES_CONTEXT = {"params": MID, "world_size": 2}
CONFIG_CONTEXT = {"world_size": 2, "hidden": COURSE.hidden}
RIGHT_CONFIG = {"train_micro_batch_size_per_gpu": "auto",
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
ZERO = RIGHT_CONFIG["zero_optimization"]


def config(**changes):
    return {**copy.deepcopy(RIGHT_CONFIG), **changes}


def zero(**changes):
    return config(zero_optimization={**copy.deepcopy(ZERO), **changes})


def cases():
    n, ws = 42_472_512, 4  # four ranks, so that each wrong count is distinct (at two, 16Ψ/2 = 8Ψ)
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "zero_stage_choice": (2, STAGE_CONTEXT, [(3, "lowest stage"), (1, "over the"), (0, "over the"),
                                                 ("none", "does fit"), ("ZeRO-5", "0, 1, 2 or 3"),
                                                 ([2], "stage"), ("two", "not a zero stage")]),
        "zero2_optimizer_bytes": (12 * n / ws, {"params": n, "world_size": ws},
                                  [(8 * n / ws, "master"), (12 * n, "shard"), (16 * n / ws, "gradient"),
                                   (6 * n / ws, "fp32"), (12 * n / ws * 8, "bits"), (12345, "count"),
                                   ("lots", "number"), (12 * n / ws / 2**20 * 1e6, "MiB"),
                                   (12 * n / ws / 2**20, "MiB")]),
        "zero2_offload_config": (RIGHT_CONFIG, CONFIG_CONTEXT, [
            (zero(stage=3), "stage 3"),
            (config(zero_optimization={"stage": 2}), "offload_optimizer"),
            (config(zero_optimization={"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}),
             "no optimizer offload"),
            (zero(offload_param={"device": "cpu"}), "ZeRO-3"),
            (config(zero_optimization={"stage": 2, "offload_optimiser": {"device": "cpu"}}), "rejects"),
            ({"zero_optimization": ZERO}, "batch size"),
            (config(train_micro_batch_size_per_gpu=0), "whole number"),
            (config(train_micro_batch_size_per_gpu="8"), "whole number"),
            ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_optimization"),
            ("zero2.json", "dict"),
            (config(gradient_clippping=1.0), "gradient_clipping"),
            ({"train_micro_batch_size_per_gpu": 1, "zero_optimisation": ZERO}, "zero_optimisation")]),
    }


def test_every_registered_exercise_has_cases():
    assert set(cases()) == registered("09") == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_check(name):
    right, context, wrong = cases()[name]
    assert_grades(name, right, wrong, context)


def test_stage_choice_follows_the_formulas():
    """The scenario's answer comes from the ZeRO formulas, not a constant: shrink the GPU and it moves up."""
    budget = GPU * 0.75
    assert sum(zero_model_states(PSI, 1, 8).values()) > budget >= sum(zero_model_states(PSI, 2, 8).values())
    assert fitting_stage(PSI, GPU, 8, 0.25) == 2
    assert fitting_stage(PSI, 40e9, 8, 0.25) == 3
    assert fitting_stage(PSI, 16e9, 8, 0.25) is None
    assert fitting_stage(1_000_000, 16e9, 8, 0.25) == 0
    assert grade("zero_stage_choice", 3, {**STAGE_CONTEXT, "gpu_bytes": 40e9}).status == PASS
    assert grade("zero_stage_choice", "none", {**STAGE_CONTEXT, "gpu_bytes": 16e9}).status == PASS


def test_zero_formulas_reproduce_the_paper():
    """ZeRO paper, figure 1: 7.5 B parameters, 64 GPUs, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB per GPU."""
    per_gpu = [sum(zero_model_states(7.5e9, s, 64).values()) / 1e9 for s in range(4)]
    assert per_gpu == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)


@pytest.mark.parametrize("answer", [2, 2.0, "2", "stage 2", "Stage-2", "ZeRO-2", "zero2", "ZeRO stage 2", "zero_2",
                                    " ZeRO 2 ", np.int64(2), np.int32(2), torch.tensor(2)])
def test_reasonable_stage_forms_pass(answer):
    assert grade("zero_stage_choice", answer, STAGE_CONTEXT).status == PASS


def test_optimizer_bytes_accept_the_step_counter_and_the_table_in_mib():
    want = 12 * MID / 2
    for answer in (want, want + 4, round(want / 2**20, 1) * 2**20, np.float64(want), int(want)):
        assert grade("zero2_optimizer_bytes", answer, BYTES_CONTEXT).status == PASS, answer


# ------------------------------------------------------------------------------------------------
# The DeepSpeed config: what DeepSpeed's own config class makes of it
# ------------------------------------------------------------------------------------------------
def shipped(name):
    return json.loads((ROOT / "configs" / "deepspeed" / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("answer", [
    RIGHT_CONFIG,
    json.dumps(RIGHT_CONFIG),  # the JSON file's text
    config(train_micro_batch_size_per_gpu=4),
    config(train_micro_batch_size_per_gpu=1, train_batch_size=2, gradient_accumulation_steps=1),  # 2 ranks
    {"train_batch_size": 8, "zero_optimization": ZERO},
    zero(stage="2"),
    zero(offload_param={"device": "none"}),
    zero(reduce_bucket_size="auto", overlap_comm=True, contiguous_gradients=True),
    config(optimizer={"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
           scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}}),
    config(bf16={"enabled": "auto"}, fp16={"enabled": "auto"}, gradient_clipping="auto"),
    shipped("zero2_offload.json"),  # configs/deepspeed/zero2_offload.json, the lesson's cluster file
    deepspeed_config(2, True, 1),  # what the lesson's zero2_offload run gives deepspeed.initialize
], ids=lambda a: str(a)[:60])
def test_configs_deepspeed_runs_pass(answer):
    result = grade("zero2_offload_config", answer, CONFIG_CONTEXT)
    assert result.status == PASS, result.message


def test_configs_deepspeed_rejects_fail_with_its_reason():
    rejected = [
        (zero(offload_optimizer={"device": "gpu"}), "Input should be 'none', 'cpu' or 'nvme'"),
        (zero(offload_optimizer={"device": "cpu", "pin_memroy": True}), "pin_memroy: Extra inputs"),
        (zero(offload_optimizer={"device": "cpu", "ratio": 0.5}), "Partial offloading"),
        (zero(stage=5), "zero_optimization.stage"),
        (config(fp16={"enabled": True}, bf16={"enabled": True}), "cannot be simultaneously"),
        (config(fp16={"enabled": True, "loss_scale_windw": 100}), "fp16.loss_scale_windw"),
        (config(amp={"enabled": True}), "Apex AMP"),
        (config(train_micro_batch_size_per_gpu=1, train_batch_size=1, gradient_accumulation_steps=1),
         "train_batch_size is not equal"),  # right for one rank, not for the lesson's two
        (config(optimizer={"type": "SGD", "params": {"lr": 0.1}}), "ZeRO-Offload"),
        (config(optimizer={"type": "AdamW", "params": {"lrr": 0.1}}), "DeepSpeedCPUAdam takes no 'lrr'"),
        (config(optimizer={"type": "AdamW", "params": {"max_grad_norm": 1.0}}), "gradient_clipping"),
        (config(zero_force_ds_cpu_optimizer=False, optimizer={"type": "Bogus", "params": {}}), "torch.optim"),
        (config(scheduler={"type": "Cosine", "params": {}}), "not one of DeepSpeed's"),
        (zero(stage="auto"), "'auto'"),
        (zero(allgather_bucket_size="auto"), "neither the HF Trainer"),
        (config(wall_clock_breakdwon=True), "does not read 'wall_clock_breakdwon'"),
        (config(zero_optimization=2), "must be a dict"),
    ]
    for answer, reason in rejected:
        result = grade("zero2_offload_config", answer, CONFIG_CONTEXT)
        assert result.status == FAIL and result.points == 0, (answer, result.message)
        assert reason.lower() in result.message.lower(), (reason, result.message)


def test_configs_that_do_something_else_fail():
    for answer in (shipped("zero2.json"), shipped("zero3_offload.json"), shipped("zero3.json"),
                   deepspeed_config(2, False, 1), deepspeed_config(3, True, 1), deepspeed_config(1, True, 1),
                   zero(offload_optimizer={"device": "none"}),
                   {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
                   config(zero_optimization={"stage": 2, "cpu_offload": False})):
        result = grade("zero2_offload_config", answer, CONFIG_CONTEXT)
        assert result.status == FAIL and result.points == 0, (answer, result.message)


def test_the_check_leaves_the_answer_and_the_hf_integration_as_they_were():
    import transformers.integrations.deepspeed as hf_ds

    answer = zero(stage=3)
    before = copy.deepcopy(answer)
    grade("zero2_offload_config", answer, CONFIG_CONTEXT)
    assert answer == before
    assert not hf_ds.is_deepspeed_zero3_enabled()  # a later from_pretrained must not believe ZeRO-3 is on


# ------------------------------------------------------------------------------------------------
# Red team: slips just outside the lesson's point, and answers that lie. None may score.
# ------------------------------------------------------------------------------------------------
def test_zero_stage_choice_red_team():
    wrong = [3, 1, "3", "stage 3", "ZeRO-3", "zero-1", "ZeRO-2 or 3", "stage 2.5", 2.5, -2, liar(3, 2),
             liar("stage 3", "stage 2"), liar(3.0, 2.0), FrameReader("want", "stage"), [2],
             {"stage": 2}, True, "offload"]
    assert_no_points("zero_stage_choice", wrong, STAGE_CONTEXT)


def test_zero2_optimizer_bytes_red_team():
    want = 12 * MID / 2
    wrong = [want * 1.001, want * 0.999, want / 2**20 * 1e6, 8 * MID / 2, 12 * MID, 16 * MID / 2,
             12 * (MID - COURSE.hidden) / 2 - 12 * COURSE.embedding_params / 2,  # the tied embedding forgotten
             12 * dataclasses.replace(COURSE, layers=30).params / 2,  # the full course model, not the runs'
             liar(1.0, want), FrameReader("want", "stage"), str(want), [want], True]
    assert_no_points("zero2_optimizer_bytes", wrong, BYTES_CONTEXT)


def test_zero2_offload_config_red_team():
    fake = liar({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}, RIGHT_CONFIG)
    wrong = [fake,  # plain() reads what the dict stores
             {**RIGHT_CONFIG, "zero_optimization": liar({"stage": 0}, RIGHT_CONFIG)},
             zero(offload_optimizer={"device": "cpu"}, stage=1),
             zero(offload_optimizer={"device": "cpu", "buffer_count": -1}),
             zero(offload_optimizer={"device": "CPU"}),
             zero(offload_optimizer="cpu"),  # DeepSpeed's reason: a dict is expected
             zero(cpu_offload=False),  # with offload_optimizer: DeepSpeed refuses the pair
             config(zero_optimization=[ZERO]),
             config(train_micro_batch_size_per_gpu=2.5),
             config(train_micro_batch_size_per_gpu=True),
             config(train_micro_batch_size_per_gpu=None),
             [RIGHT_CONFIG], json.dumps(RIGHT_CONFIG)[:-1], 2, True]
    assert_no_points("zero2_offload_config", wrong, CONFIG_CONTEXT)


def test_check_refuses_a_context_from_the_learner():
    for name, kwargs in (("zero_stage_choice", STAGE_CONTEXT), ("zero2_optimizer_bytes", {"measured": 1.0}),
                         ("zero2_offload_config", {"world_size": 1})):
        result = run_check(name, 1, **kwargs)
        assert result.status == FAIL and result.points == 0 and "takes no" in result.message, name
    assert all(EXERCISES[name].measured == () for name in NAMES)


# ------------------------------------------------------------------------------------------------
# The trusted context, the notebook's constants and check calls, and the solution's own answers
# ------------------------------------------------------------------------------------------------
def test_trusted_stage_context_is_the_shipped_llama_13b():
    assert EXERCISES["zero_stage_choice"].trusted_context() == STAGE_CONTEXT
    assert grade("zero_stage_choice", "ZeRO-2").status == PASS


@pytest.mark.slow
def test_trusted_context_is_the_course_config():
    assert EXERCISES["zero2_optimizer_bytes"].trusted_context() == {"params": 42_472_512, "world_size": WORLD_SIZE}
    assert EXERCISES["zero2_offload_config"].trusted_context() == {"world_size": WORLD_SIZE, "hidden": 576}
    assert grade("zero2_optimizer_bytes", 12 * 42_472_512 / 2).status == PASS
    assert grade("zero2_offload_config", RIGHT_CONFIG).status == PASS


def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebooks_scenario_and_model_are_the_checks():
    namespace = {"Dims": Dims, "reference_config": reference_config}
    sizes = None
    for cell in notebook().cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in ("GB", "llama13", "SCENARIO"):
                exec(compile(ast.Module([node], []), str(NOTEBOOK), "exec"), namespace)
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "mid_size_model":
                sizes = [k.value.value for k in node.keywords if k.arg == "layers"]
    assert namespace["SCENARIO"] == {"params": Dims.of(reference_config(SCENARIO_MODEL)).params, **SCENARIO}
    assert namespace["SCENARIO"] == STAGE_CONTEXT
    assert sizes == [MID_LAYERS]
    assert lesson09.WORLD_SIZE == WORLD_SIZE == 2


def test_the_notebooks_check_calls_pass_only_measurements():
    assert check_calls(notebook()) == {name: [] for name in NAMES}


def test_the_solutions_answers_pass():
    """The code between BEGIN and END SOLUTION, run on the lesson's inputs."""
    namespace = {"llama13": PSI, "SCENARIO": STAGE_CONTEXT, "zero_model_states": zero_model_states, "params": MID}
    for _, text in solution_regions(notebook()):
        exec(text, namespace)
    answers = {"zero_stage_choice": (namespace["stage_choice"], STAGE_CONTEXT),
               "zero2_optimizer_bytes": (namespace["zero2_optimizer"], BYTES_CONTEXT),
               "zero2_offload_config": (namespace["offload_config"], CONFIG_CONTEXT)}
    for name, (answer, context) in answers.items():
        result = grade(name, answer, context)
        assert result.status == PASS, (name, result.message)
