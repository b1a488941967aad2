"""Lesson 01 checks: right answers pass, blanks are "not attempted", plausible mistakes get a specific hint."""

import pytest
import torch
from transformers import BitsAndBytesConfig

from helpers.checks import FAIL, PASS, SKIP, run_check

pytestmark = pytest.mark.usefixtures("lenient_checks")


def nf4(**kw):
    return BitsAndBytesConfig(**{"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                 "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": torch.bfloat16, **kw})


def test_qlora_quantization_config():
    assert run_check("qlora_quantization_config", nf4()).status == PASS
    assert run_check("qlora_quantization_config", None).status == SKIP
    wrong = [(nf4(bnb_4bit_quant_type="fp4"), "nf4"), (nf4(bnb_4bit_use_double_quant=False), "double"),
             (nf4(bnb_4bit_compute_dtype=torch.float16), "bf16"),
             (BitsAndBytesConfig(load_in_8bit=True), "8-bit"), ({"load_in_4bit": True}, "BitsAndBytesConfig")]
    for answer, word in wrong:
        result = run_check("qlora_quantization_config", answer)
        assert result.status == FAIL and word.lower() in result.message.lower(), result.message


# A model of the course model's shape: 30 blocks of 7 linear layers
QUANTIZED, OTHER, LINEARS = 106_168_320, 28_346_688, 210
CONTEXT = {"quantized_params": QUANTIZED, "other_params": OTHER, "linear_layers": LINEARS}


def test_nf4_footprint():
    right = QUANTIZED / 2 + QUANTIZED / 64 * 4 + LINEARS * 64 + OTHER * 4
    assert run_check("nf4_footprint", right, **CONTEXT).status == PASS
    assert run_check("nf4_footprint", None, **CONTEXT).status == SKIP
    wrong = [(QUANTIZED / 2 + OTHER * 4, "absmax"),
             (QUANTIZED / 2 + QUANTIZED / 16 + LINEARS * 64 + OTHER * 2, "fp32"),
             ((QUANTIZED + OTHER) / 2, "only the linear"),
             (QUANTIZED / 2 + QUANTIZED / 16 + LINEARS * 64, "embedding"),
             (right / 2**20, "MiB")]
    for answer, word in wrong:
        result = run_check("nf4_footprint", answer, **CONTEXT)
        assert result.status == FAIL and word.lower() in result.message.lower(), (answer, result.message)
    assert "run the cells" in run_check("nf4_footprint", right).message


RESULTS = {"fp32": {"bytes": 538e6, "perplexity": 28.6}, "bf16": {"bytes": 269e6, "perplexity": 28.6},
           "int8": {"bytes": 219e6, "perplexity": 29.2}, "nf4": {"bytes": 173e6, "perplexity": 39.2},
           "fp4": {"bytes": 173e6, "perplexity": 41.6}}


def test_smallest_within_5_percent():
    assert run_check("smallest_within_5_percent", "int8", results=RESULTS).status == PASS
    assert run_check("smallest_within_5_percent", "", results=RESULTS).status == SKIP
    for answer, word in [("nf4", "more than 5 %"), ("bf16", "smaller"), ("int4", "not in the table"),
                         (3, "name")]:
        result = run_check("smallest_within_5_percent", answer, results=RESULTS)
        assert result.status == FAIL and word.lower() in result.message.lower(), (answer, result.message)
    # the answer follows the measurements, not a fixed name
    better_nf4 = {**RESULTS, "nf4": {"bytes": 173e6, "perplexity": 29.0}}
    assert run_check("smallest_within_5_percent", "nf4", results=better_nf4).status == PASS
