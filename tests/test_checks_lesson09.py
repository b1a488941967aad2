"""Lesson 09's checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint,
and wrong or cheating answers never get points. The DeepSpeed config is judged by DeepSpeed's own config class."""

import ast
import copy
import dataclasses
import json

import nbformat
import numpy as np
import pytest
import torch
from casebook import COURSE, FrameReader, assert_grades, assert_no_points, check_calls, grade, liar, registered

from helpers.checks import EXERCISES, FAIL, PASS, run_check
from helpers.constants import ROOT
from helpers.distributed.launch import WORLD_SIZE, zero_model_states
from helpers.distributed.worker import deepspeed_config
from helpers.estimate import Dims
from helpers.exercises.lesson09 import (
    CONFIG_SCENARIO,
    MID_LAYERS,
    OPTIMIZER_TOLERANCE,
    SCENARIO,
    SCENARIO_MODEL,
    ZERO2_RANKS,
    fitting_stage,
)
from helpers.models import reference_config
from helpers.planner import USABLE
from helpers.tools.notebooks import solution_regions

pytestmark = pytest.mark.usefixtures("lenient_checks")

NOTEBOOK = ROOT / "solutions" / "09_sharding.ipynb"
NAMES = ["zero_stage_choice", "zero2_optimizer_bytes", "zero2_offload_config"]
PSI = 14_769_689_600  # Qwen2.5-14B's parameters as helpers.estimate counts them (helpers/model_configs)
GPU = 80e9
# 54 GB a GPU: stage 2 (55.4 GB) fits 75 % of the whole card but not of its usable 90 %; stage 3 is the answer.
STAGE_CONTEXT = {"params": PSI, "gpu_bytes": GPU, "gpus": 8, "usable": USABLE, "headroom": 0.25}
COURSE_PARAMS = COURSE.params  # 134,515,008
MID = dataclasses.replace(COURSE, layers=MID_LAYERS).params  # the runs' mid-size model: 42,472,512 parameters
BYTES_CONTEXT = {"params": COURSE_PARAMS, "world_size": ZERO2_RANKS}
CONFIG_CONTEXT = dict(CONFIG_SCENARIO)  # 4 ranks, 8 a GPU, 128 a step
RIGHT_CONFIG = {"train_batch_size": 128, "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
                "gradient_clipping": 0.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
ZERO = RIGHT_CONFIG["zero_optimization"]


def config(**changes):
    return {**copy.deepcopy(RIGHT_CONFIG), **changes}


def without(*keys):
    return {k: v for k, v in copy.deepcopy(RIGHT_CONFIG).items() if k not in keys}


def zero(**changes):
    return config(zero_optimization={**copy.deepcopy(ZERO), **changes})


def cases():
    n, ws = 42_472_512, 6  # another model and world size, so each wrong count is distinct
    return {
        # name: (right answer, context, [(wrong answer, a word its hint must contain)])
        "zero_stage_choice": (3, STAGE_CONTEXT, [(2, "usable"), (1, "over the"), (0, "over the"),
                                                 ("none", "does fit"), ("ZeRO-5", "0, 1, 2 or 3"),
                                                 ([3], "stage"), ("three", "not a zero stage")]),
        "zero2_optimizer_bytes": (12 * n / ws, {"params": n, "world_size": ws},
                                  [(8 * n / ws, "master"), (12 * n, "shard"), (16 * n / ws, "gradient"),
                                   (14 * n / ws, "bf16 gradient"), (6 * n / ws, "fp32"), (4 * n / ws, "fp32"),
                                   (12 * n / 2, "2 ranks"), (12 * n / ws * 8, "bits"), (12345, "count"),
                                   ("lots", "number"), (12 * n / ws / 2**20 * 1e6, "MiB"),
                                   (12 * n / ws / 2**20, "MiB")]),
        "zero2_offload_config": (RIGHT_CONFIG, CONFIG_CONTEXT, [
            (zero(stage=3), "stage 3"),
            (config(zero_optimization={"stage": 2}), "offload_optimizer"),
            (config(zero_optimization={"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}),
             "no optimizer offload"),
            (zero(offload_param={"device": "cpu"}), "ZeRO-3"),
            (config(zero_optimization={"stage": 2, "offload_optimiser": {"device": "cpu"}}), "rejects"),
            (without("train_batch_size", "train_micro_batch_size_per_gpu"), "batch size"),
            (without("train_micro_batch_size_per_gpu"), "only 8 fit"),  # DeepSpeed derives 32 a GPU
            (config(train_micro_batch_size_per_gpu=16), "only 8 fit"),
            (config(train_batch_size=64), "global batch"),
            (config(gradient_accumulation_steps=8), "not equal"),  # the lesson's 2 ranks: 8 x 8 x 2
            (config(train_micro_batch_size_per_gpu=0), "whole number"),
            (config(train_micro_batch_size_per_gpu="8"), "whole number"),
            (config(train_micro_batch_size_per_gpu="auto"), "auto"),
            (without("bf16"), "bf16"),
            (without("gradient_clipping"), "default"),
            (config(gradient_clipping=1.0), "gradient_clipping"),
            (without("optimizer"), "optimizer section"),
            (config(optimizer={"type": "SGD", "params": {"lr": 1e-4}}), "ZeRO-Offload"),
            ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_optimization"),
            ("zero2.json", "dict"),
            (config(gradient_clippping=0.0), "gradient_clipping"),
            ({**without("zero_optimization"), "zero_optimisation": ZERO}, "zero_optimisation")]),
    }


def test_every_registered_exercise_has_cases():
    assert set(cases()) == registered("09") == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_check(name):
    right, context, wrong = cases()[name]
    assert_grades(name, right, wrong, context)


def test_stage_choice_follows_the_formulas_and_the_usable_share():
    """The scenario's answer comes from the ZeRO formulas and the usable part of the card, not a constant."""
    budget = GPU * USABLE * 0.75
    assert sum(zero_model_states(PSI, 2, 8).values()) > budget >= sum(zero_model_states(PSI, 3, 8).values())
    assert sum(zero_model_states(PSI, 2, 8).values()) <= GPU * 0.75  # the answer without the context's share
    assert fitting_stage(PSI, GPU, 8, USABLE, 0.25) == 3
    assert fitting_stage(PSI, GPU, 8, 1.0, 0.25) == 2
    assert fitting_stage(PSI, 40e9, 8, USABLE, 0.25) is None
    assert fitting_stage(1_000_000, 16e9, 8, USABLE, 0.25) == 0
    llama13 = {**STAGE_CONTEXT, "params": Dims.of(reference_config("llama-13b")).params}
    assert grade("zero_stage_choice", 2, llama13).status == PASS  # 48.8 GB fits 54
    assert grade("zero_stage_choice", "none", {**STAGE_CONTEXT, "gpu_bytes": 40e9}).status == PASS
    assert grade("zero_stage_choice", 3, {**STAGE_CONTEXT, "gpu_bytes": 40e9}).status == FAIL


def test_zero_formulas_reproduce_the_paper():
    """ZeRO paper, figure 1: 7.5 B parameters, 64 GPUs, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB per GPU."""
    per_gpu = [sum(zero_model_states(7.5e9, s, 64).values()) / 1e9 for s in range(4)]
    assert per_gpu == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)


@pytest.mark.parametrize("answer", [3, 3.0, "3", "stage 3", "Stage-3", "ZeRO-3", "zero3", "ZeRO stage 3", "zero_3",
                                    " ZeRO 3 ", np.int64(3), np.int32(3), torch.tensor(3)])
def test_reasonable_stage_forms_pass(answer):
    assert grade("zero_stage_choice", answer, STAGE_CONTEXT).status == PASS


def test_optimizer_bytes_accept_the_step_counter_and_mib_to_one_decimal():
    want = 12 * COURSE_PARAMS / ZERO2_RANKS
    for answer in (want, want + 4, round(want / 2**20, 1) * 2**20, np.float64(want), int(want)):
        assert grade("zero2_optimizer_bytes", answer, BYTES_CONTEXT).status == PASS, answer
    for answer in (want * (1 + 2 * OPTIMIZER_TOLERANCE), want * (1 - 2 * OPTIMIZER_TOLERANCE)):
        assert grade("zero2_optimizer_bytes", answer, BYTES_CONTEXT).status == FAIL, answer
    result = grade("zero2_optimizer_bytes", 12 * MID / ZERO2_RANKS, BYTES_CONTEXT)
    assert result.status == FAIL and "4-block" in result.message


def test_the_tolerance_is_the_declared_one():
    assert EXERCISES["zero2_optimizer_bytes"].tolerance == OPTIMIZER_TOLERANCE
    assert {EXERCISES[n].kind for n in NAMES} == {"calculate", "code"}


# ------------------------------------------------------------------------------------------------
# The DeepSpeed config: what DeepSpeed's own config class makes of it, for the exercise's scenario
# ------------------------------------------------------------------------------------------------
def shipped(name):
    return json.loads((ROOT / "configs" / "deepspeed" / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("answer", [
    RIGHT_CONFIG,
    json.dumps(RIGHT_CONFIG),  # the JSON file's text
    without("train_batch_size") | {"gradient_accumulation_steps": 4},
    config(gradient_accumulation_steps=4),
    config(bf16={"enabled": True}, fp16={"enabled": False}),
    config(optimizer={"type": "AdamW"}),  # DeepSpeed's default hyperparameters
    config(optimizer={"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}}),
    zero(stage="2"),
    zero(offload_param={"device": "none"}),
    zero(reduce_bucket_size=5e8, overlap_comm=True, contiguous_gradients=True),
    config(optimizer={"type": "Adam", "params": {"lr": 1e-4, "weight_decay": 0.01}}),
    config(optimizer={"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
           scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4,
                                                     "warmup_num_steps": 100}}),
], ids=lambda a: str(a)[:60])
def test_configs_deepspeed_runs_for_the_scenario_pass(answer):
    result = grade("zero2_offload_config", answer, CONFIG_CONTEXT)
    assert result.status == PASS, result.message


def test_configs_deepspeed_rejects_fail_with_its_reason():
    rejected = [
        (zero(offload_optimizer={"device": "gpu"}), "Input should be 'none', 'cpu' or 'nvme'"),
        (zero(offload_optimizer={"device": "cpu", "pin_memroy": True}), "pin_memroy: Extra inputs"),
        (zero(offload_optimizer={"device": "cpu", "ratio": 0.5}), "Partial offloading"),
        (zero(stage=5), "zero_optimization.stage"),
        (config(fp16={"enabled": True}), "cannot be simultaneously"),
        (config(bf16={"enabled": True, "loss_scale_windw": 100}), "bf16.loss_scale_windw"),
        (config(amp={"enabled": True}), "Apex AMP"),
        (config(gradient_accumulation_steps=2), "train_batch_size is not equal"),
        (config(optimizer={"type": "SGD", "params": {"lr": 1e-4}}), "ZeRO-Offload"),
        (config(optimizer={"type": "AdamW", "params": {"lr": 1e-4, "lrr": 0.1}}), "DeepSpeedCPUAdam takes no 'lrr'"),
        (config(optimizer={"type": "AdamW", "params": {"lr": 1e-4, "max_grad_norm": 1.0}}), "gradient_clipping"),
        (config(zero_force_ds_cpu_optimizer=False, optimizer={"type": "Bogus", "params": {}}), "torch.optim"),
        (config(scheduler={"type": "Cosine", "params": {}}), "not one of DeepSpeed's"),
        (zero(stage="auto"), "'auto'"),
        (zero(allgather_bucket_size="auto"), "only the HF Trainer"),
        (config(wall_clock_breakdwon=True), "does not read 'wall_clock_breakdwon'"),
        (config(zero_optimization=2), "must be a dict"),
    ]
    for answer, reason in rejected:
        result = grade("zero2_offload_config", answer, CONFIG_CONTEXT)
        assert result.status == FAIL and result.points == 0, (answer, result.message)
        assert reason.lower() in result.message.lower(), (reason, result.message)


def test_what_the_page_shows_does_not_answer_it():
    """The lesson's own configs (its runs', the shipped cluster files, the snippet) are not this scenario's."""
    snippet = {"train_micro_batch_size_per_gpu": 1,
               "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    for answer in (shipped("zero2_offload.json"), shipped("zero2.json"), shipped("zero3_offload.json"),
                   shipped("zero3.json"), deepspeed_config(2, True, 1), deepspeed_config(2, False, 1),
                   deepspeed_config(3, True, 1), snippet, zero(offload_optimizer={"device": "none"}),
                   config(zero_optimization={"offload_optimizer": {"device": "cpu"}}),
                   config(zero_optimization={"stage": 2, "cpu_offload": False})):
        result = grade("zero2_offload_config", answer, CONFIG_CONTEXT)
        assert result.status == FAIL and result.points == 0, (answer, result.message)


def test_the_scenario_decides_the_batch_split():
    """A config that states its accumulation steps is right for 4 ranks and wrong for the lesson's 2: DeepSpeed's
    own batch arithmetic judges it."""
    two = {**CONFIG_CONTEXT, "world_size": 2}
    assert grade("zero2_offload_config", config(gradient_accumulation_steps=4), CONFIG_CONTEXT).status == PASS
    assert grade("zero2_offload_config", config(gradient_accumulation_steps=4), two).status == FAIL
    assert grade("zero2_offload_config", config(gradient_accumulation_steps=8), two).status == PASS


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
    wrong = [2, 1, "2", "stage 2", "ZeRO-2", "zero-1", "ZeRO-2 or 3", "stage 2.5", 2.5, -3, liar(2, 3),
             liar("stage 2", "stage 3"), liar(2.0, 3.0), FrameReader("want", "stage"), [3],
             {"stage": 3}, True, "offload"]
    assert_no_points("zero_stage_choice", wrong, STAGE_CONTEXT)


def test_zero2_optimizer_bytes_red_team():
    want = 12 * COURSE_PARAMS / ZERO2_RANKS
    wrong = [want * 1.001, want * 0.999, want / 2**20 * 1e6, 8 * COURSE_PARAMS / 4, 12 * COURSE_PARAMS,
             12 * COURSE_PARAMS / 2, 6 * COURSE_PARAMS / 4, 12 * (COURSE_PARAMS - COURSE.embedding_params) / 4,
             12 * MID / 2,  # the lesson's measured value
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
             config(gradient_clipping=1e-9), config(bf16={"enabled": False}),
             config(optimizer={"type": "Adam", "params": {"lr": 1e-4, "adam_w_mode": False}}),
             config(optimizer={"type": "AdamW", "params": {"lr": "1e-4"}}), config(optimizer={"type": "Lamb"}),
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
def test_trusted_stage_context_is_the_shipped_qwen_14b():
    assert EXERCISES["zero_stage_choice"].trusted_context() == STAGE_CONTEXT
    assert grade("zero_stage_choice", "ZeRO-3").status == PASS


@pytest.mark.slow
def test_trusted_context_is_the_course_config():
    assert EXERCISES["zero2_optimizer_bytes"].trusted_context() == {"params": 134_515_008, "world_size": 4}
    assert EXERCISES["zero2_offload_config"].trusted_context() == CONFIG_CONTEXT
    assert grade("zero2_optimizer_bytes", 12 * 134_515_008 / 4).status == PASS
    assert grade("zero2_offload_config", RIGHT_CONFIG).status == PASS


def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebooks_scenario_and_model_are_the_checks():
    namespace = {"Dims": Dims, "reference_config": reference_config, "USABLE": USABLE}
    sizes = None
    for cell in notebook().cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in (
                    "GB", "qwen14", "SCENARIO", "RANKS", "JOB"):
                exec(compile(ast.Module([node], []), str(NOTEBOOK), "exec"), namespace)
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "mid_size_model":
                sizes = [k.value.value for k in node.keywords if k.arg == "layers"]
    assert namespace["SCENARIO"] == {"params": Dims.of(reference_config(SCENARIO_MODEL)).params, **SCENARIO}
    assert namespace["SCENARIO"] == STAGE_CONTEXT
    assert namespace["RANKS"] == ZERO2_RANKS and namespace["JOB"] == CONFIG_SCENARIO
    assert sizes == [MID_LAYERS]
    assert WORLD_SIZE == 2
    assert CONFIG_SCENARIO["world_size"] != WORLD_SIZE and ZERO2_RANKS != WORLD_SIZE  # not the runs' world size


def test_the_notebooks_check_calls_pass_only_measurements():
    assert check_calls(notebook()) == {name: [] for name in NAMES}


def test_the_solutions_answers_pass():
    """The code between BEGIN and END SOLUTION, run on the lesson's inputs."""
    namespace = {"qwen14": PSI, "SCENARIO": STAGE_CONTEXT, "zero_model_states": zero_model_states,
                 "psi": COURSE_PARAMS, "RANKS": ZERO2_RANKS, "JOB": dict(CONFIG_SCENARIO)}
    for _, text in solution_regions(notebook()):
        exec(text, namespace)
    answers = {"zero_stage_choice": (namespace["stage_choice"], STAGE_CONTEXT),
               "zero2_optimizer_bytes": (namespace["zero2_optimizer"], BYTES_CONTEXT),
               "zero2_offload_config": (namespace["offload_config"], CONFIG_CONTEXT)}
    for name, (answer, context) in answers.items():
        result = grade(name, answer, context)
        assert result.status == PASS, (name, result.message)
