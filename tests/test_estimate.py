"""The estimator against the meter on a tiny model, and its bookkeeping against first principles."""

import bitsandbytes as bnb
import pytest
import torch
from transformers.optimization import Adafactor

from helpers.estimate import (
    Dims,
    Recipe,
    compare,
    model_states,
    offloaded_bytes,
    optimizer_state_bytes,
    predict,
    trainable_params,
    trainable_tensor_shapes,
    trainable_tensor_sizes,
    trainable_tensors,
    weight_bytes,
)
from helpers.memory import measure
from helpers.models import tiny_config, tiny_model
from helpers.train import make_forward, make_train_step, set_checkpointing


def test_param_count_matches_model():
    model = tiny_model()
    assert Dims.of(model.config).params == sum(p.numel() for p in model.parameters())
    untied = tiny_model(tie_word_embeddings=False)
    assert Dims.of(untied.config).params == sum(p.numel() for p in untied.parameters())


def test_weight_bytes_by_dtype():
    cfg = tiny_config()
    fp32, bf16 = weight_bytes(cfg, Recipe(weights="fp32")), weight_bytes(cfg, Recipe(weights="bf16"))
    assert fp32 == pytest.approx(2 * bf16, rel=0.01)
    nf4 = weight_bytes(cfg, Recipe(weights="nf4", unquantized="bf16"))
    int8 = weight_bytes(cfg, Recipe(weights="int8", unquantized="bf16"))
    assert nf4 < int8 < bf16 < fp32


def test_frozen_recipe_trains_fewer_parameters():
    cfg = tiny_config()
    d = Dims.of(cfg)
    assert trainable_params(cfg, Recipe(trainable_blocks=1)) == d.block_params + d.hidden
    full, one = predict(cfg, Recipe(batch_size=2, seq_len=32)), predict(
        cfg, Recipe(batch_size=2, seq_len=32, trainable_blocks=1))
    assert one.optimizer < full.optimizer


@pytest.mark.parametrize("b,t,ckpt", [(1, 16, False), (4, 64, False), (8, 128, False), (8, 128, True)])
def test_training_peak_within_10_percent_on_tiny_model(b, t, ckpt):
    model = tiny_model(num_hidden_layers=4)
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = make_train_step(model, opt, batch, gradient_checkpointing=ckpt)
    step()
    measured = measure(step, model=model, optimizer=opt)
    predicted = predict(model.config, Recipe(batch_size=b, seq_len=t, gradient_checkpointing=ckpt))
    assert predicted.weights == measured.weights
    assert predicted.optimizer == measured.optimizer
    assert abs(predicted.peak / measured.peak - 1) < 0.10, compare(predicted, measured)


def test_inference_peak_within_10_percent_on_tiny_model():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    measured = measure(make_forward(model, {"input_ids": ids}), model=model)
    predicted = predict(model.config, Recipe(batch_size=4, seq_len=64, training=False))
    assert abs(predicted.peak / measured.peak - 1) < 0.10, compare(predicted, measured)


def test_activations_grow_with_tokens_and_checkpointing_cuts_them():
    cfg = tiny_config()
    small, big = predict(cfg, Recipe(batch_size=1, seq_len=256)), predict(cfg, Recipe(batch_size=8, seq_len=256))
    assert big.activations > small.activations
    ck = predict(cfg, Recipe(batch_size=8, seq_len=256, gradient_checkpointing=True))
    assert ck.activations < big.activations


def test_recipe_mistakes_get_a_clear_message():
    with pytest.raises(ValueError, match="choose one of"):
        Recipe(optimizer="AdamW8bit")
    with pytest.raises(ValueError, match="choose one of"):
        Recipe(weights="int4")
    with pytest.raises(ValueError, match="LoRA"):
        predict(tiny_config(), Recipe(weights="nf4"))
    with pytest.raises(ValueError, match="whole number"):
        Recipe(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="equal micro-batches"):
        Recipe(batch_size=6, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="rows per optimizer step"):
        Recipe(batch_size=0)


def test_batch_size_is_the_optimizer_steps_and_the_micro_batch_follows():
    """batch_size is the rows of one optimizer step; one forward and backward sees batch_size // k of them."""
    cfg = tiny_config()
    assert Recipe(batch_size=8, gradient_accumulation_steps=4).micro_batch_size == 2
    assert Recipe(batch_size=8).micro_batch_size == 8
    accumulated = predict(cfg, Recipe(batch_size=8, seq_len=32, gradient_accumulation_steps=4))
    whole = predict(cfg, Recipe(batch_size=2, seq_len=32))
    assert accumulated.activations >= whole.activations  # one micro-batch of 2 alive, plus the gradient being added
    assert accumulated.activations < predict(cfg, Recipe(batch_size=8, seq_len=32)).activations


@pytest.mark.parametrize("optimizer,blocks", [("sgd_plain", None), ("sgd", None), ("adamw", 1), ("sgd", 2)])
def test_sgd_and_frozen_recipes_within_10_percent(optimizer, blocks):
    model = tiny_model(num_hidden_layers=4)
    if blocks is not None:
        model.requires_grad_(False)
        for block in model.model.layers[-blocks:]:
            block.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(trainable, lr=1e-4) if optimizer == "adamw"
           else torch.optim.SGD(trainable, lr=1e-4, momentum=0.9 if optimizer == "sgd" else 0.0))
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))
    step = make_train_step(model, opt, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    step()
    measured = measure(step, model=model, optimizer=opt)
    predicted = predict(model.config, Recipe(batch_size=4, seq_len=64, optimizer=optimizer, trainable_blocks=blocks))
    assert predicted.optimizer == measured.optimizer
    assert abs(predicted.peak / measured.peak - 1) < 0.10, compare(predicted, measured)


@pytest.mark.slow
def test_benchmark_subset_on_the_course_model():
    """Two of ``python -m helpers.tools.benchmark``'s cases, on the real course model: the int8 layers' inputs kept
    through checkpointing, and training only the bottom blocks with SGD (the engines' cases run on the tiny model
    in tests/test_sharding.py)."""
    from helpers.tools.benchmark import TOLERANCE, run

    rows = run(["int8_lora_ckpt", "frozen_bottom2_sgd"])
    assert [r["case"] for r in rows] == ["int8_lora_ckpt", "frozen_bottom2_sgd"]
    assert all(abs(r["error"]) < TOLERANCE for r in rows), rows


@pytest.mark.parametrize("b,t,optimizer", [(4, 64, "adamw"), (1, 16, "adamw"), (8, 128, "sgd")])
def test_training_the_bottom_blocks_within_10_percent(b, t, optimizer):
    """Freezing the *top* blocks (training the first k, embeddings frozen): backpropagation still runs
    through every frozen block above them, so activations stay close to full training."""
    model = tiny_model(num_hidden_layers=4)
    model.requires_grad_(False)
    for block in model.model.layers[:2]:
        block.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    recipe = Recipe(batch_size=b, seq_len=t, optimizer=optimizer, trainable_blocks=2, trainable_at="bottom")
    assert trainable_params(model.config, recipe) == sum(p.numel() for p in trainable)
    opt = (torch.optim.AdamW(trainable, lr=1e-4) if optimizer == "adamw"
           else torch.optim.SGD(trainable, lr=1e-4, momentum=0.9))
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(3))
    step = make_train_step(model, opt, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    step()
    measured = measure(step, model=model, optimizer=opt)
    predicted = predict(model.config, recipe)
    assert predicted.optimizer == measured.optimizer
    assert abs(predicted.peak / measured.peak - 1) < 0.10, compare(predicted, measured)
    big = recipe.but(batch_size=8, seq_len=128)  # where activations, not model state, make the peak
    assert predict(model.config, big).activations > predict(model.config, big.but(trainable_at="top")).activations
    with pytest.raises(ValueError, match="choose one of"):
        Recipe(trainable_at="middle")


LORA_CASES = [  # (targets, rank, dropout, checkpointing, batch, seq)
    ("all-linear", 8, 0.0, False, 2, 32), (("q_proj", "v_proj"), 4, 0.0, False, 4, 16),
    ("all-linear", 8, 0.05, False, 2, 32), ("all-linear", 16, 0.0, True, 2, 32),
    (("o_proj", "down_proj"), 2, 0.1, False, 1, 64), (("gate_proj", "up_proj", "down_proj"), 8, 0.0, False, 8, 8),
    (("o_proj",), 4, 0.0, False, 4, 16)]


@pytest.mark.parametrize("targets,r,dropout,ckpt,b,t", LORA_CASES)
def test_lora_recipes_within_2_percent_on_tiny_model(targets, r, dropout, ckpt, b, t):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(num_hidden_layers=4, vocab_size=1000),
                           LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets,
                                      task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    recipe = Recipe(batch_size=b, seq_len=t, lora_rank=r, lora_targets=targets, lora_dropout=dropout,
                    gradient_checkpointing=ckpt)
    assert trainable_params(model.config, recipe) == sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(3, 1000, (b, t), generator=torch.Generator().manual_seed(4))
    step = make_train_step(model, opt, {"input_ids": ids, "labels": ids}, gradient_checkpointing=ckpt)
    step()
    measured = measure(step, model=model, optimizer=opt)
    predicted = predict(model.config, recipe)
    assert (predicted.weights, predicted.optimizer) == (measured.weights, measured.optimizer)
    assert abs(predicted.peak / measured.peak - 1) < 0.02, compare(predicted, measured)
    assert abs(predicted.activations / measured.activations - 1) < 0.05, compare(predicted, measured)


def test_lora_recipe_arithmetic_and_mistakes():
    d = Dims.of(tiny_config())
    q_only = Recipe(lora_rank=4, lora_targets="q_proj")
    assert q_only.lora_targets == ("q_proj",)
    assert trainable_params(d, q_only) == d.layers * 4 * (d.hidden + d.q_dim)
    assert Recipe(lora_rank=4, lora_targets="all-linear").lora_targets == Recipe(lora_rank=4).lora_targets
    assert trainable_params(d, Recipe(lora_rank=8)) == 2 * trainable_params(d, Recipe(lora_rank=4))
    more = predict(d, Recipe(lora_rank=4, lora_dropout=0.1, batch_size=4)).activations
    assert more > predict(d, Recipe(lora_rank=4, batch_size=4)).activations
    with pytest.raises(ValueError, match="choose among"):
        Recipe(lora_rank=4, lora_targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="whole number"):
        Recipe(lora_rank=-1)
    with pytest.raises(ValueError, match="not both"):
        Recipe(lora_rank=4, trainable_blocks=2)
    predict(d, Recipe(lora_rank=4, weights="nf4"))  # a quantized base trains through adapters (QLoRA)


def _trainable_as_the_recipe_says(model, recipe):
    """Freeze a real tiny model the way ``recipe`` describes (lessons 02 and 04 do the same)."""
    from peft import LoraConfig, get_peft_model

    if recipe.lora_rank:
        return get_peft_model(model, LoraConfig(r=recipe.lora_rank, target_modules=list(recipe.lora_targets)))
    model.requires_grad_(recipe.training and recipe.trainable_blocks is None)
    if recipe.training and recipe.trainable_blocks is not None:
        layers = model.model.layers
        k = recipe.trainable_blocks
        for block in (layers[len(layers) - k:] if recipe.trainable_at == "top" else layers[:k]):
            block.requires_grad_(True)
        model.model.norm.requires_grad_(recipe.trainable_at == "top")
    return model


@pytest.mark.parametrize("recipe", [
    Recipe(), Recipe(trainable_blocks=2), Recipe(trainable_blocks=1, trainable_at="bottom"), Recipe(lora_rank=4),
    Recipe(lora_rank=2, lora_targets=("k_proj", "down_proj")), Recipe(training=False)])
@pytest.mark.parametrize("tied", [True, False])
def test_trainable_tensor_sizes_are_the_models(recipe, tied):
    model = _trainable_as_the_recipe_says(tiny_model(tie_word_embeddings=tied), recipe)
    real = sorted(p.numel() for p in model.parameters() if p.requires_grad)  # a tied weight is one parameter
    sizes = trainable_tensor_sizes(model.config, recipe)
    assert sorted(sizes) == real
    shapes = sorted(tuple(p.shape) for p in model.parameters() if p.requires_grad)
    assert sorted(trainable_tensor_shapes(model.config, recipe)) == shapes
    assert (trainable_params(model.config, recipe), trainable_tensors(model.config, recipe)) == (sum(real), len(real))


def test_optimizer_state_arithmetic():
    d = Dims.of(tiny_config())
    n, tensors = d.params, trainable_tensors(d, Recipe())
    assert optimizer_state_bytes(d, Recipe(weights="bf16")) == 4 * n + 4 * tensors  # bf16 moments, as PyTorch keeps
    # The QLoRA paper's "16-bit fine-tuning": 16-bit weights and gradients, fp32 Adam moments, 12 bytes a parameter.
    sixteen = predict(d, Recipe(weights="bf16", state_dtype="fp32"))
    assert sixteen.optimizer == 8 * n + 4 * tensors and sixteen.weights + 2 * n + sixteen.optimizer > 12 * n
    lora = Recipe(lora_rank=64, optimizer="adamw8bit")
    sizes = trainable_tensor_sizes(d, lora)
    small, large = [s for s in sizes if s < 4096], [s for s in sizes if s >= 4096]
    assert small and large  # k/v_proj's B (32 x 64) stays 32-bit; A (64 x 64) goes 8-bit
    assert optimizer_state_bytes(d, lora) == 8 * sum(small) + sum(2 * s + 8 * -(-s // 256) for s in large) + 2048
    assert optimizer_state_bytes(d, lora.but(optimizer="paged_adamw8bit")) == optimizer_state_bytes(d, lora)
    # Adafactor: a row and a column of fp32 per matrix, a full fp32 vector per vector, an fp32 RMS per tensor.
    matrices = d.layers * sum(o + i for o, i in d.linear_shapes()) + d.vocab + d.hidden
    vectors = (2 * d.layers + 1) * d.hidden
    assert optimizer_state_bytes(d, Recipe(optimizer="adafactor")) == 4 * (matrices + vectors + tensors)
    assert optimizer_state_bytes(d, Recipe(optimizer="adafactor")) < optimizer_state_bytes(d, Recipe()) / 50
    with pytest.raises(ValueError, match="state_dtype"):
        Recipe(state_dtype="fp8")


OPTIMIZERS = {  # the estimator's name: how a practitioner builds it
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-4, momentum=0.9),
    "adamw8bit": lambda params: bnb.optim.AdamW8bit(params, lr=1e-4),
    # as TrainingArguments(optim="adafactor") builds it
    "adafactor": lambda params: Adafactor(params, lr=1e-4, relative_step=False, scale_parameter=False),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("b,t,lora", [(1, 8, 0), (4, 64, 0), (2, 32, 8)])
def test_each_optimizer_state_exact_and_peak_within_3_percent_on_tiny_model(optimizer, b, t, lora):
    """1 x 8 tokens: gradients and the optimizer step set the peak; 4 x 64: activations do."""
    recipe = Recipe(batch_size=b, seq_len=t, optimizer=optimizer, lora_rank=lora, lora_targets="all-linear")
    model = _trainable_as_the_recipe_says(tiny_model(num_hidden_layers=3, vocab_size=4000), recipe)
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 4000, (b, t), generator=torch.Generator().manual_seed(3))
    step = make_train_step(model, opt, {"input_ids": ids, "labels": ids})
    step()
    measured = measure(step, model=model, optimizer=opt)
    predicted = predict(model.config, recipe)
    assert predicted.optimizer == measured.optimizer, compare(predicted, measured)
    assert abs(predicted.peak / measured.peak - 1) < 0.03, compare(predicted, measured)


@pytest.mark.parametrize("optimizer,ckpt", [("adamw", True), ("adamw8bit", True), ("paged_adamw8bit", False)])
def test_qlora_recipe_within_2_percent_on_tiny_model(tmp_path, optimizer, ckpt):
    """A tiny model in nf4 with double quantization, prepared for k-bit training, LoRA r=64 on every linear
    layer: the same recipe as lesson 05, measured against the estimator."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from helpers.models import load_model

    tiny_model(num_hidden_layers=2, vocab_size=1000).save_pretrained(tmp_path)
    base = load_model(str(tmp_path), dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)  # upcasts the rest to fp32
    model = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    make = {"adamw": torch.optim.AdamW, "adamw8bit": bnb.optim.AdamW8bit,
            "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[optimizer]
    opt = make(trainable, lr=1e-4)
    ids = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(4))
    step = make_train_step(model, opt, {"input_ids": ids, "labels": ids}, gradient_checkpointing=ckpt)
    step()
    measured = measure(step, model=model, optimizer=opt)
    recipe = Recipe(batch_size=2, seq_len=32, weights="nf4", double_quant=True, lora_rank=64, lora_targets="all-linear",
                    optimizer=optimizer, gradient_checkpointing=ckpt)
    predicted = predict(model.config, recipe)
    assert (predicted.weights, predicted.optimizer) == (measured.weights, measured.optimizer)
    assert abs(predicted.peak / measured.peak - 1) < 0.02, compare(predicted, measured)


@pytest.mark.parametrize("b,t,k,ckpt,tied", [
    (2, 32, 2, False, True), (8, 128, 2, False, False), (4, 16, 4, False, True), (1, 64, 4, True, True)])
def test_gradient_accumulation_within_10_percent_on_tiny_model(b, t, k, ckpt, tied):
    """k micro-batches of b: from the second on, every gradient of the first is alive through forward and backward."""
    model = tiny_model(num_hidden_layers=4, tie_word_embeddings=tied)
    ids = torch.randint(0, model.config.vocab_size, (b * k, t), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = make_train_step(model, opt, {"input_ids": ids, "labels": ids}, gradient_checkpointing=ckpt,
                           gradient_accumulation_steps=k)
    step()
    measured = measure(step, model=model, optimizer=opt)
    recipe = Recipe(batch_size=b * k, seq_len=t, gradient_checkpointing=ckpt, gradient_accumulation_steps=k)
    assert recipe.micro_batch_size == b
    predicted = predict(model.config, recipe)
    assert "accumulating" in predicted.moment and predicted.gradients == measured.gradients
    assert abs(predicted.peak / measured.peak - 1) < 0.10, compare(predicted, measured)
    one_micro_batch = recipe.but(batch_size=b, gradient_accumulation_steps=1)
    assert predicted.peak > predict(model.config, one_micro_batch).peak


@pytest.mark.parametrize("vocab,b,t,ckpt", [(1000, 8, 128, False), (1000, 1, 16, False), (8000, 2, 64, False),
                                            (8000, 2, 64, True)])
def test_autocast_bf16_within_3_percent_on_tiny_model(vocab, b, t, ckpt):
    """Mixed precision: fp32 master weights, the forward under bf16 autocast (16-bit activations and a 16-bit
    copy of every weight kept for backward)."""
    model = tiny_model(num_hidden_layers=4, vocab_size=vocab)
    set_checkpointing(model, ckpt)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(4))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    measured = measure(step, model=model, optimizer=opt)
    predicted = predict(model.config, Recipe(batch_size=b, seq_len=t, gradient_checkpointing=ckpt, autocast="bf16"))
    assert abs(predicted.peak / measured.peak - 1) < 0.03, compare(predicted, measured)
    assert abs(predicted.activations / measured.activations - 1) < 0.03, compare(predicted, measured)


def test_autocast_recipe_mistakes_get_a_clear_message():
    with pytest.raises(ValueError, match="'bf16' or 'fp16'"):
        Recipe(autocast="int8")
    with pytest.raises(ValueError, match="fp32"):
        Recipe(autocast="bf16", weights="bf16")


# ------------------------------------------------------------------------------------------------
# Data parallel and ZeRO (lesson 09): per-rank shares; measured for real in tests/test_sharding.py
# ------------------------------------------------------------------------------------------------
def test_zero_stages_shard_what_the_paper_says():
    config = tiny_config()
    base = Recipe(batch_size=1, seq_len=16, engine="deepspeed", world_size=4)
    one = predict(config, base.but(world_size=1))
    stages = {s: model_states(config, base.but(zero_stage=s, param_persistence_threshold=0)) for s in range(4)}
    master = trainable_params(config, Recipe()) * 4
    assert stages[0]["optimizer"] == one.optimizer  # stage 0 replicates (no ZeRO optimizer, no master copy)
    assert stages[1]["optimizer"] == -(-(optimizer_state_bytes(config, Recipe()) + master) // 4)
    assert stages[1]["gradients"] == stages[0]["gradients"] == master  # fp32 gradients: 4 bytes, like the master
    assert stages[2]["gradients"] == -(-master // 4)
    assert stages[3]["weights"] < stages[2]["weights"] == stages[0]["weights"]
    rotary = 2 * (config.head_dim // 2) * 4
    assert stages[3]["weights"] - rotary == -(-(stages[0]["weights"] - rotary) // 4)  # buffers are not sharded


def test_each_engine_adds_its_own_buffers():
    """The buffers each engine keeps beside the model states, term by term (measured in helpers.tools.benchmark)."""
    config = tiny_config()
    d = Dims.of(config)
    one = predict(config, Recipe(batch_size=2, seq_len=16))
    grads = trainable_params(config, Recipe()) * 4
    # DDP: buckets as large as every gradient; as views they are the .grads, otherwise a second copy.
    view = predict(config, Recipe(batch_size=2, seq_len=16, world_size=2, gradient_as_bucket_view=True))
    copies = predict(config, Recipe(batch_size=2, seq_len=16, world_size=2))
    # The views are the .grads, all step long; at the end of backward the tied embedding's fresh gradient waits
    # beside its bucket.
    assert view.gradients == grads + (d.embedding_params * 4 if view.moment == "backward end" else 0)
    assert view.peak > one.peak
    assert copies.peak == one.peak + grads  # a second copy of every gradient, all step long
    # DeepSpeed allocates its reduction bucket whole: the default 5e8 elements is 2 GB of fp32, whatever the model.
    zero1 = Recipe(batch_size=2, seq_len=16, world_size=2, engine="deepspeed", zero_stage=1)
    assert predict(config, zero1).peak - predict(config, zero1.but(reduce_bucket_size=1000)).peak == (5e8 - 1000) * 4
    assert predict(config, zero1.but(overlap_comm=True)).peak - predict(config, zero1).peak == 5e8 * 4
    # ZeRO-2 keeps whole parameters that overlap its partition: the rank whose half starts inside the embedding.
    zero2 = zero1.but(zero_stage=2, reduce_bucket_size=0)
    sizes = trainable_tensor_sizes(config, Recipe())
    assert sum(sizes) == trainable_params(config, Recipe())
    assert predict(config, zero2).gradients >= -(-grads // 2)
    # FSDP2 keeps whole what it gathers; keeping every block from forward to backward costs all of them.
    fsdp = Recipe(batch_size=2, seq_len=16, world_size=2, zero_stage=3)
    assert (predict(config, fsdp.but(reshard_after_forward=False)).peak - predict(config, fsdp).peak
            >= (d.layers - 2) * d.block_params * 4)
    # ZeRO-3: with a short reuse distance nothing stays gathered between forward and backward.
    zero3 = Recipe(batch_size=2, seq_len=16, world_size=2, engine="deepspeed", zero_stage=3, reduce_bucket_size=0)
    assert predict(config, zero3.but(max_reuse_distance=1)).peak < predict(config, zero3).peak
    with pytest.raises(ValueError, match="reduce_bucket_size"):
        Recipe(reduce_bucket_size=-1)


@pytest.mark.parametrize("ckpt,targets", [(True, "all-linear"), (False, ("q_proj", "v_proj")),
                                          (True, ("q_proj", "v_proj"))])
def test_int8_lora_keeps_every_layers_input_even_with_checkpointing(tmp_path, ckpt, targets):
    """bitsandbytes' int8 matmul stores its input on the autograd context, which checkpointing cannot drop."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from helpers.models import load_model

    tiny_model(num_hidden_layers=4, vocab_size=1000).save_pretrained(tmp_path)
    base = load_model(str(tmp_path), quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 1000, (4, 48), generator=torch.Generator().manual_seed(5))
    step = make_train_step(model, opt, {"input_ids": ids, "labels": ids}, gradient_checkpointing=ckpt)
    step()
    measured = measure(step, model=model, optimizer=opt)
    recipe = Recipe(batch_size=4, seq_len=48, weights="int8", lora_rank=8, lora_targets=targets,
                    gradient_checkpointing=ckpt)
    predicted = predict(model.config, recipe)
    assert (predicted.weights, predicted.optimizer) == (measured.weights, measured.optimizer)
    assert abs(predicted.peak / measured.peak - 1) < 0.03, compare(predicted, measured)


def test_offload_moves_state_off_a_gpu_but_not_off_a_cpu():
    config = tiny_config()
    r = Recipe(batch_size=1, seq_len=16, engine="deepspeed", zero_stage=2, world_size=2)
    on_cpu = predict(config, r.but(offload_optimizer=True))
    assert on_cpu.optimizer == predict(config, r).optimizer  # the device is the CPU: nowhere to go
    gpu = predict(config, r.but(device="cuda", offload_optimizer=True, reduce_bucket_size=1000))
    # On the GPU: only the reduction bucket and the gradient being made (at most the tied embedding's).
    assert gpu.optimizer == 0 and gpu.gradients <= 1000 * 4 + Dims.of(config).embedding_params * 4
    assert offloaded_bytes(config, r.but(device="cuda", offload_optimizer=True)) > predict(config, r).optimizer


@pytest.mark.parametrize("bad", [dict(zero_stage=4), dict(world_size=0), dict(engine="megatron"),
                                 dict(zero_stage=2), dict(offload_optimizer=True),
                                 dict(engine="deepspeed", offload_optimizer=True)])
def test_sharding_recipes_that_make_no_sense_are_refused(bad):
    with pytest.raises(ValueError, match="Recipe"):
        Recipe(**bad)


@pytest.mark.parametrize("b,t,optimizer,vocab,lora", [(1, 8, "adamw", 4096, False), (1, 8, "sgd", 4096, False),
                                                      (4, 64, "adamw", 512, False), (1, 8, "adamw", 512, False),
                                                      (2, 32, "adamw", 512, True)])
def test_optimizer_in_backward_within_1_percent_and_updates_like_the_plain_step(b, t, optimizer, vocab, lora):
    """Each parameter stepped from its post-accumulate-grad hook: at most one gradient alive, the same update."""
    from peft import LoraConfig, get_peft_model

    from helpers.train import OptimizerInBackward

    def build():
        model = tiny_model(num_hidden_layers=4, vocab_size=vocab)
        if lora:
            model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        return model

    make = {"adamw": torch.optim.AdamW, "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)}
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(6))
    batch = {"input_ids": ids, "labels": ids}
    fused_model, plain_model = build(), build()
    fused = OptimizerInBackward(fused_model, make[optimizer], lr=1e-3)
    plain = make[optimizer]([p for p in plain_model.parameters() if p.requires_grad], lr=1e-3)
    step, plain_step = make_train_step(fused_model, fused, batch), make_train_step(plain_model, plain, batch)
    step(), plain_step()
    measured = measure(step, model=fused_model, optimizer=fused)
    plain_step()
    for p, q in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)  # the same two updates
    extra = {"lora_rank": 8, "lora_targets": "all-linear"} if lora else {}
    recipe = Recipe(batch_size=b, seq_len=t, optimizer=optimizer, optimizer_in_backward=True, **extra)
    predicted = predict(fused_model.config, recipe)
    assert abs(predicted.peak / measured.peak - 1) < 0.01, compare(predicted, measured)
    assert measured.gradients <= max(p.numel() for p in fused_model.parameters()) * 4  # one gradient at most
    with pytest.raises(ValueError, match="accumulate"):
        make_train_step(fused_model, fused, batch, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="optimizer_in_backward"):
        Recipe(optimizer_in_backward=True, batch_size=2, gradient_accumulation_steps=2)


@pytest.mark.parametrize("rank", [4, 16, 100])
def test_galore_state_exact_and_peak_within_1_percent(rank):
    """GaLore's AdamW (galore-torch), as Trainer's optim="galore_adamw" groups it: the block matrices projected at
    ``rank``, the rest full AdamW. Its projection is a slice that keeps the whole SVD factor alive."""
    from galore_torch import GaLoreAdamW

    model = tiny_model(num_hidden_layers=2)
    projected = [p for n, p in model.named_parameters() if p.dim() == 2 and ("mlp" in n or "self_attn" in n)]
    rest = [p for p in model.parameters() if all(p is not q for q in projected)]
    opt = GaLoreAdamW([{"params": rest}, {"params": projected, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                                          "proj_type": "std"}], lr=1e-3)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(7))
    step = make_train_step(model, opt, {"input_ids": ids, "labels": ids})
    step()
    measured = measure(step, model=model, optimizer=opt)
    predicted = predict(model.config, Recipe(batch_size=2, seq_len=32, optimizer="galore_adamw", galore_rank=rank))
    assert measured.optimizer == predicted.optimizer
    assert abs(predicted.peak / measured.peak - 1) < 0.01, compare(predicted, measured)
    # Below the matrices' width it saves; at or above it, the projections only add to full-size moments.
    galore_state = optimizer_state_bytes(model.config, Recipe(optimizer="galore_adamw", galore_rank=rank))
    assert (galore_state < optimizer_state_bytes(model.config, Recipe())) == (rank < 32)
