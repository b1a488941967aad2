"""The planners: the largest batch whose predicted peak fits a budget (tiny and course shapes), and the memory
planner (shipped model configs, GPU presets, plan, the cost ladder of cheapest_fit, the widget)."""

import sys

import pytest
from casebook import COURSE

from helpers.constants import GiB
from helpers.estimate import Dims, Recipe, predict
from helpers.models import reference_config, tiny_config
from helpers.planner import GPU, GPUS, MODELS, cheapest_fit, fits, ladder, largest_batch, plan, planner


@pytest.mark.parametrize("config", [tiny_config(), COURSE], ids=["tiny", "course-shaped"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_answer_fits_and_the_next_batch_does_not(config, checkpointing):
    recipe = Recipe(seq_len=64, gradient_checkpointing=checkpointing)
    budget = 1.4 * predict(config, recipe.but(batch_size=3)).peak
    b = largest_batch(config, recipe, budget)
    assert 3 <= b < 256
    assert predict(config, recipe.but(batch_size=b)).peak <= budget
    assert predict(config, recipe.but(batch_size=b + 1)).peak > budget
    assert fits(config, recipe.but(batch_size=b), budget) and not fits(config, recipe.but(batch_size=b + 1), budget)


def test_recipe_batch_size_is_ignored():
    budget = 2.25 * GiB
    assert largest_batch(COURSE, Recipe(batch_size=50), budget) == largest_batch(COURSE, Recipe(), budget)


def test_largest_batch_keeps_the_recipes_accumulation_steps():
    """With k micro-batches per step the answer is a batch_size (rows per optimizer step) in whole micro-batches:
    k times the largest micro-batch that fits alone."""
    budget = int(2.75 * GiB)
    one = largest_batch(COURSE, Recipe(seq_len=128), budget)
    four = largest_batch(COURSE, Recipe(seq_len=128, batch_size=4, gradient_accumulation_steps=4), budget)
    assert four % 4 == 0 and fits(COURSE, Recipe(seq_len=128, batch_size=four, gradient_accumulation_steps=4), budget)
    assert not fits(COURSE, Recipe(seq_len=128, batch_size=four + 4, gradient_accumulation_steps=4), budget)
    assert four // 4 <= one  # accumulation keeps every gradient alive across micro-batches
    with pytest.raises(ValueError, match="at least gradient_accumulation_steps"):
        largest_batch(COURSE, Recipe(batch_size=4, gradient_accumulation_steps=4), budget, max_batch=2)


def test_course_model_numbers_in_the_docstring():
    budget = int(2.25 * GiB)
    assert largest_batch(COURSE, Recipe(seq_len=128), budget) == 3
    assert largest_batch(COURSE, Recipe(seq_len=128, gradient_checkpointing=True), budget) == 9


def test_checkpointing_never_fits_a_smaller_batch():
    for budget_gib in (2.3, 2.6, 3.0, 4.0):
        plain = largest_batch(COURSE, Recipe(seq_len=128), budget_gib * GiB)
        ckpt = largest_batch(COURSE, Recipe(seq_len=128, gradient_checkpointing=True), budget_gib * GiB)
        assert ckpt >= plain


def test_capped_at_max_batch():
    assert largest_batch(tiny_config(), Recipe(seq_len=8), 100 * GiB, max_batch=7) == 7
    assert largest_batch(tiny_config(), Recipe(seq_len=8), 100 * GiB, max_batch=1) == 1


def test_too_small_a_budget_says_what_batch_1_needs():
    need = predict(COURSE, Recipe(seq_len=128)).peak
    with pytest.raises(ValueError, match="even batch 1 does not fit") as err:
        largest_batch(COURSE, Recipe(seq_len=128), need - 1)
    message = str(err.value)
    assert f"{need / GiB:,.3f} GiB" in message and "gradient_checkpointing" in message
    assert largest_batch(COURSE, Recipe(seq_len=128), need) >= 1  # exactly the peak fits


@pytest.mark.parametrize("budget,max_batch", [(0, 8), (-5, 8), (GiB, 0), (GiB, 2.5)])
def test_bad_arguments(budget, max_batch):
    with pytest.raises(ValueError):
        largest_batch(COURSE, Recipe(), budget, max_batch=max_batch)


# ------------------------------------------------------------------------------------------------
# The memory planner: shipped model configs, GPU presets, plan, the cost ladder, the widget
# ------------------------------------------------------------------------------------------------
# Parameters as their publishers state them (model cards, papers), in billions.
PUBLISHED = {"smollm2-135m": 0.1345, "smollm2-360m": 0.362, "smollm2-1.7b": 1.71, "llama-3-8b": 8.03,
             "mistral-7b": 7.24, "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.7, "qwen2.5-72b": 72.7, "llama-3-70b": 70.6}


def test_every_model_in_the_list_has_a_published_size():
    assert set(MODELS) == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shipped_configs_have_the_published_sizes(name):
    import torch
    from transformers import AutoModelForCausalLM

    config = reference_config(name)
    with torch.device("meta"):  # shapes only: no memory, no download
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert n / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)
    # The estimator counts every parameter but Qwen2's q/k/v biases (a few hundred thousand in billions).
    assert Dims.of(config).params == pytest.approx(n, rel=1e-4)
    assert (Dims.of(config).params == n) == (config.model_type != "qwen2")


def test_every_budget_is_below_what_pytorch_sees_on_the_card():
    # torch.cuda.get_device_properties(0).total_memory as printed on a T4 and an H200 (MiB).
    for name, visible_mib in (("T4", 15_102), ("H200", 143_156)):
        assert GPUS[name].budget < visible_mib * 2**20
    assert all(g.budget < g.gb * 1e9 for g in GPUS.values())


def _cuda(**fields):
    return Recipe(device="cuda", **fields)


def test_a_plan_is_the_predictors_numbers_for_the_recipe_it_names():
    config = reference_config("llama-3-8b")
    p = plan("llama-3-8b", "T4", batch_size=4, seq_len=1024, lora=True, weights="nf4")
    expected = _cuda(batch_size=4, seq_len=1024, weights="nf4", double_quant=True, unquantized="fp32",
                     lora_rank=16, lora_targets="all-linear")
    assert p.recipe == expected and p.report == predict(config, expected)
    assert p.headroom == GPUS["T4"].budget - predict(config, expected).peak
    # The batch is the effective one: accumulation splits it into micro-batches.
    q = plan("smollm2-135m", "L4", batch_size=8, seq_len=256, gradient_accumulation_steps=4, autocast=True)
    assert q.recipe == _cuda(batch_size=8, seq_len=256, gradient_accumulation_steps=4, autocast="bf16")
    assert q.batch_size == q.recipe.batch_size == 8 and q.recipe.micro_batch_size == 2  # one meaning of batch_size
    assert q.peak == predict(reference_config("smollm2-135m"), q.recipe).peak


def test_smollm2_135m_full_fine_tune_on_a_t4_fits_up_to_a_batch_and_no_further():
    config, budget = reference_config("smollm2-135m"), GPUS["T4"].budget
    b = largest_batch(config, _cuda(seq_len=512), budget)
    assert plan("smollm2-135m", "T4", b, 512).fits and predict(config, _cuda(batch_size=b, seq_len=512)).peak <= budget
    over = plan("smollm2-135m", "T4", b + 1, 512)
    assert not over.fits and over.headroom < 0 and "does not fit" in str(over)


def test_llama_3_8b_full_fp32_adamw_misses_80_gb_but_qlora_fits_24():
    config = reference_config("llama-3-8b")
    full = plan("llama-3-8b", "A100 80GB", batch_size=1, seq_len=1024)
    assert not full.fits and predict(config, full.recipe).peak > 80e9  # more than the whole card
    qlora = plan("llama-3-8b", "L4", batch_size=4, seq_len=1024, weights="nf4", lora=True,
                 gradient_checkpointing=True, optimizer="paged_adamw8bit")
    assert qlora.fits and predict(config, qlora.recipe).peak <= 0.9 * 24e9


def test_the_ladder_climbs_in_the_documented_order():
    names = list(dict.fromkeys(rung for rung, _ in ladder("T4", 4, 128)))
    assert names == [base + extra for base in ("full fine-tune", "LoRA", "QLoRA")
                     for extra in ("", " + checkpointing", " + 8-bit AdamW", " + checkpointing + 8-bit AdamW")]
    first = ladder("T4", 4, 128)[:6]  # full fine-tune: micro-batch 4, 2, 1, each without then with autocast
    assert [(r.micro_batch_size, r.gradient_accumulation_steps, r.autocast) for _, r in first] == [
        (4, 1, None), (4, 1, "fp16"), (2, 2, None), (2, 2, "fp16"), (1, 4, None), (1, 4, "fp16")]
    assert all(r.batch_size == 4 == r.micro_batch_size * r.gradient_accumulation_steps
               for _, r in ladder("T4", 4, 128))


@pytest.mark.parametrize("model,gpu,batch,seq", [
    ("smollm2-135m", "T4", 8, 512), ("smollm2-1.7b", "L4", 8, 1024), ("llama-3-8b", "L4", 8, 1024),
    ("qwen2.5-7b", "H200", 8, 1024), ("llama-3-70b", "A100 80GB", 8, 1024), ("mistral-7b", "12 GB", 4, 512)])
def test_the_cheapest_fit_fits_and_every_cheaper_recipe_does_not(model, gpu, batch, seq):
    config, budget = reference_config(model), GPUS[gpu].budget
    best = cheapest_fit(model, gpu, batch_size=batch, seq_len=seq)
    assert best.fits and predict(config, best.recipe).peak <= budget
    candidates = [r for _, r in ladder(gpu, batch, seq)]
    position = candidates.index(best.recipe)
    assert all(predict(config, r).peak > budget for r in candidates[:position])
    rung = [name for name, r in ladder(gpu, batch, seq) if r == best.recipe][0]
    assert best.note.endswith(f", {rung}.")


def test_the_cheapest_fit_lands_on_different_rungs():
    notes = {cheapest_fit(m, g, 8, 1024).note for m, g in
             (("smollm2-135m", "T4"), ("llama-3-8b", "L4"), ("llama-3-8b", "A100 80GB"), ("llama-3-70b", "H200"))}
    assert len(notes) == 4


def test_inference_climbs_through_weight_formats():
    config, budget = reference_config("llama-3-8b"), GPUS["T4"].budget
    best = cheapest_fit("llama-3-8b", "T4", batch_size=1, seq_len=1024, training=False)
    assert best.fits and not best.recipe.training
    cheaper = [r for _, r in ladder("T4", 1, 1024, training=False)]
    assert all(predict(config, r).peak > budget for r in cheaper[:cheaper.index(best.recipe)])


def test_when_nothing_fits_it_says_so_with_the_smallest_peak():
    config = reference_config("llama-3-70b")
    result = cheapest_fit("llama-3-70b", "T4", batch_size=8, seq_len=1024)
    smallest = min(predict(config, r).peak for _, r in ladder("T4", 8, 1024))
    assert not result.fits and result.peak == smallest
    assert "Nothing on the cost ladder fits T4" in result.note and f"{smallest / GiB:,.2f} GiB" in result.note


@pytest.mark.parametrize("call,words", [
    (lambda: plan("llama-9b", "T4"), ["unknown model 'llama-9b'", "smollm2-135m", "qwen2.5-72b"]),
    (lambda: plan("smollm2-135m", "P100"), ["unknown GPU 'P100'", "T4", "H200", "GPU(name, gb)"]),
    (lambda: plan("smollm2-135m", "T4", gpus=8, sharding="zero4"), ["sharding", "zero3", "fsdp"]),
    (lambda: plan("smollm2-135m", "T4", gpus=0), ["gpus", "at least 1"]),
    (lambda: plan("smollm2-135m", "T4", batch_size=0), ["batch_size", "at least 1", "0"]),
    (lambda: plan("smollm2-135m", "T4", seq_len=-8), ["seq_len", "-8"]),
    (lambda: plan("smollm2-135m", "T4", batch_size=6, gradient_accumulation_steps=4), ["divide"]),
    (lambda: cheapest_fit("smollm2-135m", "T4", batch_size=2.5), ["batch_size"]),
    (lambda: plan("smollm2-135m", "T4", weights="int4"), ["nf4"]),
    (lambda: plan("smollm2-135m", "T4", lora_rank=8), ["lora_rank", "lora", "gradient_checkpointing"]),
])
def test_bad_input_is_one_clear_sentence(call, words):
    with pytest.raises(ValueError) as err:
        call()
    assert all(w in str(err.value) for w in words), str(err.value)


def test_gpu_names_ignore_case_spaces_and_dashes_and_custom_cards_work():
    assert plan("smollm2-135m", "a100-80gb").gpu is GPUS["A100 80GB"]
    assert plan("smollm2-135m", "rtx4090").gpu is GPUS["RTX 4090"]
    mine = GPU("my card", 20)
    assert plan("smollm2-135m", mine, 8, 512).headroom == mine.budget - plan("smollm2-135m", "T4", 8, 512).peak


def test_the_plot_shows_the_peak_against_the_budget():
    import matplotlib

    matplotlib.use("Agg")
    p = plan("smollm2-360m", "T4", batch_size=4, seq_len=512)
    ax = p.plot()
    assert [line.get_ydata()[0] for line in ax.lines] == [pytest.approx(GPUS["T4"].budget / GiB)]
    assert ax.texts[0].get_text() == f"{p.peak / GiB:,.1f}"
    assert sum(patch.get_height() for patch in ax.patches) == pytest.approx(p.peak / GiB)


def test_the_function_works_without_ipywidgets(monkeypatch):
    import importlib.util

    import helpers.planner

    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # "import ipywidgets" now raises ImportError
    monkeypatch.delitem(sys.modules, "helpers.planner_widget", raising=False)
    spec = importlib.util.spec_from_file_location("helpers.planner_fresh", helpers.planner.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)  # a fresh import of the module, with no ipywidgets to be had
    assert fresh.plan("smollm2-135m", "T4", 8, 512).peak == plan("smollm2-135m", "T4", 8, 512).peak
    with pytest.raises(ImportError):
        fresh.planner()  # only the front end needs it


def test_the_widget_recomputes_on_every_change():
    import matplotlib

    matplotlib.use("Agg")
    app = planner(model="smollm2-135m", gpu="T4", batch_size=4, seq_len=512)
    assert app.plan.peak == plan("smollm2-135m", "T4", 4, 512).peak
    assert bytes(app.chart.value).startswith(b"\x89PNG") and "fits" in app.verdict.value
    before = (bytes(app.chart.value), app.verdict.value)
    app.controls["batch_size"].value = 32
    assert app.plan.batch_size == 32 and app.plan.peak == plan("smollm2-135m", "T4", 32, 512).peak
    assert (bytes(app.chart.value), app.verdict.value) != before
    assert f"{app.plan.peak / GiB:,.2f}" in app.verdict.value
    app.controls["weights"].value = "nf4"  # a 4-bit base cannot be fine-tuned without adapters
    assert app.plan is None and "LoRA" in app.verdict.value
    app.controls["lora"].value = True
    assert app.plan.recipe.lora_rank == 16 and app.plan.recipe.weights == "nf4"
    app.controls["model"].value = "llama-3-70b"
    assert not app.cheapest.fits and "Nothing on the cost ladder fits" in app.verdict.value
    app.controls["unquantized"].value = "bf16"
    assert app.plan.recipe.unquantized == "bf16"
    app.controls["gpus"].value = 8
    assert app.plan.recipe.world_size == 8 and app.plan.recipe.zero_stage == 3 and "over 8 GPUs" in app.verdict.value
    app.controls["sharding"].value = "fsdp"
    assert app.plan.recipe.engine == "torch" and app.plan.recipe.zero_stage == 3


def test_qlora_rows_plan_what_prepare_model_for_kbit_training_leaves():
    """The course's QLoRA recipe upcasts what bitsandbytes leaves unquantized to fp32; a 16-bit rest is the other
    choice. On Llama-3-8B at 8 x 1,024 on a T4 the two differ by its embedding and lm_head in 2 bytes: about 2 GiB."""
    config = reference_config("llama-3-8b")
    kw = dict(batch_size=8, seq_len=1024, weights="nf4", lora=True, gradient_checkpointing=True,
              gradient_accumulation_steps=4)
    taught, half = plan("llama-3-8b", "T4", **kw), plan("llama-3-8b", "T4", unquantized="fp16", **kw)
    assert taught.recipe.unquantized == "fp32" and half.recipe.unquantized == "fp16"
    d = Dims.of(config)
    assert taught.peak - half.peak == (d.unquantized_params * 2)  # 4 bytes instead of 2
    assert taught.peak - half.peak == pytest.approx(2 * GiB, rel=0.05)
    assert "the rest fp32" in str(taught)


@pytest.mark.slow
def test_the_planners_qlora_weights_are_what_the_capstone_recipe_holds():
    """Measured: the course model in nf4 (double quantization), prepared for k-bit training, LoRA r16 on every linear
    layer, as lesson 05 and the capstone build it, holds exactly the weights the planner's QLoRA row predicts."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from helpers.memory import tensor_bytes, weight_tensors
    from helpers.models import load_model

    base = load_model(dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    planned = plan(model.config, "T4", batch_size=8, seq_len=128, weights="nf4", lora=True)
    assert planned.report.weights == tensor_bytes(list(weight_tensors(model)))


def test_new_presets_and_several_gpus():
    for name, gb, half in (("V100 16GB", 16, "fp16"), ("V100 32GB", 32, "fp16"), ("A10G", 24, "bf16"),
                           ("L40S", 48, "bf16")):
        assert GPUS[name].gb == gb and GPUS[name].half == half
    config = reference_config("llama-3-8b")
    one = plan("llama-3-8b", "A100 80GB", batch_size=2, seq_len=2048, weights="bf16", gradient_checkpointing=True)
    peaks = {}
    for sharding in ("ddp", "zero1", "zero2", "zero3", "fsdp"):
        p = plan("llama-3-8b", "A100 80GB", batch_size=2, seq_len=2048, weights="bf16", gradient_checkpointing=True,
                 gpus=8, sharding=sharding)
        assert p.recipe.world_size == 8 and p.report == predict(config, p.recipe)
        assert "over 8 GPUs" in str(p)
        peaks[sharding] = p.peak
    # Each stage shards more: ZeRO-1 to -3 below DDP, ZeRO-3 and FSDP hold an eighth of the weights.
    assert peaks["zero3"] < peaks["zero2"] < peaks["zero1"] < peaks["ddp"]
    assert peaks["fsdp"] < one.peak
    assert not one.fits and plan("llama-3-8b", "A100 80GB", batch_size=2, seq_len=2048, weights="bf16",
                                 gradient_checkpointing=True, gpus=8, sharding="zero3").fits


# ------------------------------------------------------------------------------------------------
# Generation (lesson 11): weights plus one KV cache per request
# ------------------------------------------------------------------------------------------------
def test_llama_3_8b_bf16_8k_on_an_l4_is_four_requests_by_hand():
    from helpers.planner import USABLE, plan_generation

    p = plan_generation("llama-3-8b", "L4", context=8192, dtype="bf16")
    per_token = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16
    assert p.per_request == 8192 * per_token == 2**30
    assert 2 * 8_030_261_248 <= p.weights < 2 * 8_030_261_248 + 2**20  # 8.03 B parameters (untied lm_head), buffers
    free = 24e9 * USABLE - p.weights - p.temporaries
    assert p.requests == int(free // 2**30) == 4
    assert p.peak() <= GPUS["L4"].budget < p.peak(p.requests + 1)


def test_generation_plan_follows_the_toggles():
    from helpers.planner import plan_generation

    base = plan_generation("llama-3-8b", "L4", 8192)
    assert plan_generation("llama-3-8b", "L4", 8192, attn="eager").requests == 0  # 8k x 8k scores in each layer
    assert plan_generation("llama-3-8b", "L4", 4096).requests > 2 * base.requests - 1  # half the cache per request
    assert plan_generation("llama-3-8b", "L4", 8192, weights="nf4").requests > 2 * base.requests
    assert plan_generation("llama-3-8b", "H100", 8192).requests > 5 * base.requests
    fp32 = plan_generation("smollm2-135m", "T4", 2048, dtype="fp32")
    assert fp32.per_request == 2048 * 30 * 2 * 3 * 64 * 4
    assert plan_generation("llama-3-70b", "L4", 8192).requests == 0
    for bad in (dict(context=0), dict(dtype="int8"), dict(attn="flash")):
        with pytest.raises(ValueError):
            plan_generation("llama-3-8b", "L4", **{"context": 8192, **bad})
