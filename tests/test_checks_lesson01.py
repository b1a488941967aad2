"""Lesson 01 checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint, and
wrong or cheating answers never get points."""

import re

import nbformat
import numpy as np
import pytest
import torch
from casebook import COURSE, assert_grades, assert_no_points, grade, liar, registered
from transformers import BitsAndBytesConfig

from helpers.checks import EXERCISES, FAIL, PASS, SKIP, run_check
from helpers.constants import ROOT
from helpers.estimate import Dims, Recipe, rotary_buffer_bytes, weight_bytes
from helpers.exercises import lesson01
from helpers.exercises.lesson01 import footprint_terms
from helpers.models import reference_config, tiny_config

pytestmark = pytest.mark.usefixtures("lenient_checks")


def test_every_registered_exercise_has_a_test():
    assert registered("01") == {"qlora_quantization_config", "nf4_footprint", "smallest_within_5_percent"}


# ------------------------------------------------------------------------------------------------
# Exercise 1: judged by what the config would quantize (a meta-device model of the given config)
# ------------------------------------------------------------------------------------------------
TINY = {"config": tiny_config(num_hidden_layers=2)}
COURSE_SHAPED = {"config": tiny_config(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152)}


def nf4(**kw):
    return BitsAndBytesConfig(**{"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                 "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": torch.bfloat16, **kw})


def test_qlora_quantization_config():
    wrong = [(nf4(bnb_4bit_quant_type="fp4"), "nf4"), (nf4(bnb_4bit_use_double_quant=False), "double"),
             (nf4(bnb_4bit_compute_dtype=torch.float16), "bf16"), (nf4(bnb_4bit_compute_dtype=None), "bf16"),
             (BitsAndBytesConfig(load_in_8bit=True), "8-bit"), ({"load_in_4bit": True}, "BitsAndBytesConfig"),
             (nf4(llm_int8_skip_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"]), "llm_int8_skip_modules"),
             (nf4(bnb_4bit_quant_storage=torch.bfloat16), "quant_storage"),
             (BitsAndBytesConfig(), "4 bit")]
    assert_grades("qlora_quantization_config", nf4(), wrong, TINY)


def test_qlora_quantization_config_red_team():
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrong = [
        nf4(llm_int8_skip_modules=every_linear),  # every linear layer kept out of 4 bit: nothing quantized
        nf4(llm_int8_skip_modules=["model.layers"]),
        nf4(llm_int8_skip_modules=["model.layers.0"]),  # one block left in fp32
        nf4(llm_int8_skip_modules=["mlp"]),
        nf4(llm_int8_skip_modules=["down_proj"]),
        nf4(llm_int8_skip_modules=[]),  # replaces the default skip list: the lm_head gets quantized
        nf4(llm_int8_skip_modules=["self_attn"]),
        nf4(bnb_4bit_quant_storage=torch.float32),
        nf4(bnb_4bit_quant_storage=torch.bfloat16),
        nf4(llm_int8_enable_fp32_cpu_offload=True),  # loaded on the CPU: everything stays fp32
        nf4(bnb_4bit_compute_dtype=torch.float32),
        nf4(bnb_4bit_quant_type="fp4"),
        nf4(bnb_4bit_use_double_quant=False),
        BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]),
        BitsAndBytesConfig(load_in_4bit=False),
        # a plain dict forged to look like a config: judged by what it describes, no better than a real one
        {"__class__": "BitsAndBytesConfig", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
         "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
         "llm_int8_skip_modules": every_linear},
        {"__class__": "BitsAndBytesConfig", "load_in_4bit": True, "load_in_8bit": True},
        {"__class__": "BitsAndBytesConfig", "_load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
         "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"},  # the private field alone
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "nf4", ["nf4", True, "bfloat16"], 4,
    ]
    assert_no_points("qlora_quantization_config", wrong, TINY)
    message = grade("qlora_quantization_config", nf4(llm_int8_skip_modules=every_linear), TINY).message
    assert "llm_int8_skip_modules" in message
    assert "lm_head" in grade("qlora_quantization_config", nf4(llm_int8_skip_modules=[]), TINY).message


def test_qlora_quantization_config_accepts_reasonable_forms():
    for right in (nf4(), nf4(llm_int8_skip_modules=["lm_head"]), nf4(bnb_4bit_compute_dtype="bfloat16"),
                  nf4(llm_int8_threshold=5.0), nf4(bnb_4bit_quant_storage=torch.uint8)):
        result = grade("qlora_quantization_config", right, TINY)
        assert result.status == PASS, result.message
    assert grade("qlora_quantization_config", nf4(), COURSE_SHAPED).status == PASS
    assert "210" in grade("qlora_quantization_config", nf4(), COURSE_SHAPED).message


# ------------------------------------------------------------------------------------------------
# Exercise 2: the nf4 footprint of Llama-3-8B loaded in bf16, from its config
# ------------------------------------------------------------------------------------------------
LLAMA3 = Dims.of(reference_config("llama-3-8b"))
BF16 = lesson01.REST_BYTES


def nf4_answer(d):
    """The solution's expression."""
    t = footprint_terms(d)
    quantized_params, other_params, linear_layers = t["quantized_params"], t["other_params"], t["linear_layers"]
    return quantized_params / 2 + quantized_params / 64 * 4 + linear_layers * 16 * 4 + other_params * 2


def test_footprint_terms():
    assert footprint_terms(COURSE) == {"quantized_params": 106_168_320, "other_params": 28_346_688,
                                       "linear_layers": 210}
    # Llama-3-8B: 8.03 B parameters, of which the untied embedding and lm_head are 1.05 B
    assert footprint_terms(LLAMA3) == {"quantized_params": 6_979_321_856, "other_params": 1_050_939_392,
                                       "linear_layers": 224}
    assert nf4_answer(LLAMA3) == 6_027_761_664


def test_nf4_footprint(dims):
    ctx = {"dims": dims}
    t = footprint_terms(dims)
    q, other, layers = t["quantized_params"], t["other_params"], t["linear_layers"]
    right = nf4_answer(dims)
    wrong = [(q / 2 + other * BF16, "absmax"),
             (q / 2 + q / 32 + layers * 64 + other * BF16, "fp32"),
             (q / 2 + q / 16 + layers * 64 + other * 4, "bfloat16"),
             ((q + other) / 2, "only the linear"),
             (q / 2 + q / 16 + layers * 64, "embedding"),
             (q / 2 + q / 16 + other * BF16, "code tables"),
             (weight_bytes(dims, Recipe(weights="nf4", double_quant=True, unquantized="bf16", training=False)),
              "double"),
             (right / 2**20, "MiB"), (right / 1e6, "MB"), (right / 2**30, "GiB")]
    assert_grades("nf4_footprint", right, wrong, ctx)


def test_nf4_footprint_knows_the_untied_lm_head():
    ctx = {"dims": LLAMA3}
    right, head = nf4_answer(LLAMA3), LLAMA3.embedding_params
    assert_grades("nf4_footprint", right, [(right - head * BF16, "not tied"),
                                           (right - head * BF16 + head * (0.5 + 4 / 64), "skip list")], ctx)


def test_nf4_footprint_red_team(dims):
    ctx = {"dims": dims}
    t = footprint_terms(dims)
    q, other, layers = t["quantized_params"], t["other_params"], t["linear_layers"]
    right = nf4_answer(dims)
    wrong = [right * 1.005, right * 0.995, right - layers * 64,  # forgot the code tables: a small, named term
             right * 2**20 / 1e6, right * 8, q / 2 + q / 64 * 2 + layers * 64 + other * BF16,
             q / 2 + q / 64 * 4 + layers * 64 + (other - dims.hidden) * BF16,  # forgot the final norm
             q / 2 + q / 64 * 4 + layers * 64 + (other - dims.embedding_params) * BF16,
             weight_bytes(dims, Recipe(weights="nf4", training=False)),  # the estimator, with fp32 for the rest
             float(f"{right:.3g}"), str(right), [right], {"bytes": right}, True, np.float64("nan")]
    assert_no_points("nf4_footprint", wrong, ctx)


def test_nf4_footprint_accepts_the_estimator_and_numpy(dims):
    ctx = {"dims": dims}
    estimator = weight_bytes(dims, Recipe(weights="nf4", unquantized="bf16", training=False))  # + rotary buffers
    assert estimator - nf4_answer(dims) == rotary_buffer_bytes(dims)
    for right in (estimator, int(nf4_answer(dims)), np.float64(nf4_answer(dims)), np.int64(estimator)):
        assert grade("nf4_footprint", right, ctx).status == PASS, right


def test_nf4_footprint_declares_the_slack_its_judge_allows():
    """The judge's slack is absolute (rotary buffers + less than the final norm); for the lesson's model it is
    within the declared relative tolerance, which the leak scan uses."""
    ex = EXERCISES["nf4_footprint"]
    assert (ex.kind, ex.tolerance) == ("calculate", lesson01.NF4_TOLERANCE)
    slack = rotary_buffer_bytes(LLAMA3) + LLAMA3.hidden // 2
    assert slack / nf4_answer(LLAMA3) <= ex.tolerance
    ctx = {"dims": LLAMA3}
    assert grade("nf4_footprint", nf4_answer(LLAMA3) + slack, ctx).status == PASS
    assert grade("nf4_footprint", nf4_answer(LLAMA3) * (1 + ex.tolerance), ctx).status == FAIL


def test_nf4_footprint_takes_no_numbers_from_the_notebook():
    right = nf4_answer(LLAMA3)
    result = run_check("nf4_footprint", right, quantized_params=1, other_params=1, linear_layers=1)
    assert result.status == FAIL and result.points == 0 and "takes no" in result.message


# ------------------------------------------------------------------------------------------------
# Exercise 1: a prediction, judged against the lesson's measured table
# ------------------------------------------------------------------------------------------------
RESULTS = {"fp32": {"bytes": 538e6, "perplexity": 28.6, "forward s": 0.1},
           "bf16": {"bytes": 269e6, "perplexity": 28.6}, "fp16": {"bytes": 269e6, "perplexity": 28.7},
           "int8": {"bytes": 219e6, "perplexity": 29.2}, "nf4": {"bytes": 173e6, "perplexity": 39.2},
           "nf4 + double quant": {"bytes": 167e6, "perplexity": 39.3}, "fp4": {"bytes": 173e6, "perplexity": 41.6}}


def test_smallest_within_5_percent():
    assert run_check("smallest_within_5_percent", "int8", results=RESULTS).status == PASS
    assert run_check("smallest_within_5_percent", "", results=RESULTS).status == SKIP
    for answer, word in [("nf4", "more than 5 %"), ("bf16", "smaller"), ("int4", "not in the table"),
                         (3, "name"), ("fp32", "smaller")]:
        result = run_check("smallest_within_5_percent", answer, results=RESULTS)
        assert result.status == FAIL and word.lower() in result.message.lower(), (answer, result.message)
    # the answer follows the measurements, not a fixed name
    better_nf4 = {**RESULTS, "nf4": {"bytes": 173e6, "perplexity": 29.0}}
    assert run_check("smallest_within_5_percent", "nf4", results=better_nf4).status == PASS
    assert "results" in run_check("smallest_within_5_percent", "int8").message  # must be passed


def test_smallest_within_5_percent_red_team():
    wrong = [liar("nf4", "int8"), "nf4 + double quant", "fp4", "fp16", "bf16", "fp32", ["int8"],
             {"name": "int8"}, "int 8", "nf4+int8", 8, True]
    for answer in wrong:
        result = run_check("smallest_within_5_percent", answer, results=RESULTS)
        assert result.status == FAIL and result.points == 0, (answer, result.message)
    # a measurement that is not a table is refused with a sentence, never a traceback
    for bad in ({"int8": {"bytes": 1, "perplexity": 1}}, {"fp32": 3}, {"fp32": {"bytes": "x", "perplexity": 1}},
                [1, 2], "fp32"):
        result = run_check("smallest_within_5_percent", "int8", results=bad)
        assert result.status == FAIL and result.points == 0, (bad, result.message)


def test_smallest_within_5_percent_accepts_other_spellings_and_pandas_numbers():
    table = {k: {"bytes": np.int64(v["bytes"]), "perplexity": np.float64(v["perplexity"])} for k, v in RESULTS.items()}
    for right in ("int8", " INT8 ", "Int8"):
        assert run_check("smallest_within_5_percent", right, results=table).status == PASS, right
    smallest_dq = {**RESULTS, "nf4 + double quant": {"bytes": 150e6, "perplexity": 29.0}}
    assert run_check("smallest_within_5_percent", "NF4  +  double quant", results=smallest_dq).status == PASS
    assert EXERCISES["smallest_within_5_percent"].measured == ("results",)


def test_smallest_within_5_percent_is_a_prediction_with_a_hint_about_the_formats():
    assert EXERCISES["smallest_within_5_percent"].kind == "predict"
    assert "16 bit" in run_check("smallest_within_5_percent", "nf4", results=RESULTS).message


# ------------------------------------------------------------------------------------------------
# The trusted context and the solution notebook
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trusted_context_is_the_course_config():
    assert EXERCISES["nf4_footprint"].trusted_context() == {"dims": LLAMA3}
    assert Dims.of(EXERCISES["qlora_quantization_config"].trusted_context()["config"]) == COURSE
    assert EXERCISES["qlora_quantization_config"].kind == "code"
    assert grade("qlora_quantization_config", nf4()).status == PASS
    assert grade("nf4_footprint", nf4_answer(LLAMA3)).status == PASS
    assert grade("nf4_footprint", nf4_answer(COURSE)).status == FAIL


def test_solution_check_calls_pass_no_learner_numbers():

    nb = nbformat.read(ROOT / "solutions" / "01_loading_in_8bit_and_4bit.ipynb", 4)
    calls = [c.source for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith("check(")]
    assert calls == ['check("smallest_within_5_percent", smallest_ok, results=results)',
                     'check("nf4_footprint", nf4_bytes)', 'check("qlora_quantization_config", qlora_config)']
    assert not any(re.search(r"measured=", c) for c in calls)
