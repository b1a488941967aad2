"""The meter is exact on cases whose answer is known from first principles."""

import pytest
import torch

from helpers.memory import Meter, MiB, measure, unmetered, weight_tensors
from helpers.models import tiny_model
from helpers.train import make_train_step


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def batch(model, b=2, t=16):
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_weights_equal_storage_bytes():
    model = tiny_model()
    report = measure(lambda: None, model=model)
    assert report.weights == storage_bytes(list(model.parameters()) + list(model.buffers()))
    assert report.gradients == report.optimizer == report.activations == 0


def test_full_training_step_categories_are_exact():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = make_train_step(model, opt, batch(model))
    step()  # allocate AdamW's state
    report = measure(step, model=model, optimizer=opt)
    params = list(model.parameters())
    param_bytes = storage_bytes(params)
    n_tensors = len({p.untyped_storage()._cdata for p in params})
    # AdamW: two fp32 moments per parameter, plus one 4-byte step counter per parameter tensor
    assert report.optimizer == 2 * param_bytes + 4 * n_tensors
    assert report.activations > 0
    assert report.peak == report.weights + report.gradients + report.optimizer + report.activations


def test_gradients_equal_trainable_bytes_after_backward():
    model = tiny_model()
    b = batch(model)

    def forward_backward():
        model(**b).loss.backward()

    report = measure(forward_backward, model=model)
    trainable = storage_bytes([p for p in model.parameters() if p.requires_grad])
    # the peak may come before every gradient exists; at the end all of them do
    with Meter(model) as m:
        pass
    assert m.report.gradients == trainable
    assert report.gradients <= trainable


def test_frozen_all_but_one_block():
    model = tiny_model()
    model.requires_grad_(False)
    last = model.model.layers[-1]
    last.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step = make_train_step(model, opt, batch(model))
    step()
    report = measure(step, model=model, optimizer=opt)
    block = list(last.parameters())
    assert report.optimizer == 2 * storage_bytes(block) + 4 * len(block)
    assert report.weights == storage_bytes(list(model.parameters()) + list(model.buffers()))
    # after backward (before the optimizer zeroes them), the gradients are exactly the block's
    model(**batch(model)).loss.backward()
    with Meter(model, opt) as m:
        pass
    assert m.report.gradients == storage_bytes(block)
    opt.zero_grad(set_to_none=True)


def test_identical_numbers_on_two_runs():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = make_train_step(model, opt, batch(model))
    step()
    first = measure(step, model=model, optimizer=opt)
    second = measure(step, model=model, optimizer=opt)
    assert first.as_dict() == second.as_dict()
    assert first.optimizer == storage_bytes(list(model.parameters()))  # one momentum buffer


def test_gradient_checkpointing_lowers_activations():
    model = tiny_model(num_hidden_layers=6)
    b = batch(model, 4, 64)
    reports = {}
    for ckpt in (False, True):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        step = make_train_step(model, opt, b, gradient_checkpointing=ckpt)
        step()
        reports[ckpt] = measure(step, model=model, optimizer=opt)
    assert reports[True].activations < reports[False].activations


def test_model_built_inside_block_counts_as_weights():
    report = measure(lambda: tiny_model())
    model = report.returned
    assert report.weights == storage_bytes(list(model.parameters()) + list(model.buffers()))


def test_four_bit_model_weights_include_quantization_constants(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model().save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cpu")
    report = measure(lambda: model(input_ids=torch.randint(0, 512, (1, 8))), model=model)
    expected = storage_bytes(weight_tensors(model))
    packed = model.model.layers[0].mlp.up_proj.weight
    assert packed.dtype == torch.uint8 and packed.quant_state.state2 is not None
    assert report.weights == expected
    assert report.weights > storage_bytes(list(model.parameters()))  # absmax, codes, nested state
    from helpers.estimate import Recipe, weight_bytes

    predicted = weight_bytes(model.config, Recipe(weights="nf4", double_quant=True, unquantized="fp32"))
    assert abs(predicted / report.weights - 1) < 0.02


def test_int8_model_weights(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from helpers.estimate import Recipe, weight_bytes

    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    report = measure(lambda: None, model=model)
    assert report.weights == storage_bytes(weight_tensors(model))
    predicted = weight_bytes(model.config, Recipe(weights="int8", unquantized="fp32"))
    assert abs(predicted / report.weights - 1) < 0.02


def test_peft_model_is_measured():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    step = make_train_step(model, opt, batch(model))
    step()
    report = measure(step, model=model, optimizer=opt)
    assert report.optimizer == 2 * storage_bytes(trainable) + 4 * len(trainable)
    assert report.weights == storage_bytes(list(model.parameters()) + list(model.buffers()))


def test_turning_checkpointing_off_leaves_no_trace():
    """transformers' disable keeps an input-requires-grad hook; the course helper removes it."""
    def frozen_bottom_activations(model):
        model.requires_grad_(False)
        model.model.layers[-1].requires_grad_(True)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        step = make_train_step(model, opt, batch(model, 4, 64))
        step()
        return measure(step, model=model, optimizer=opt).activations

    fresh = frozen_bottom_activations(tiny_model(num_hidden_layers=6))
    toggled = tiny_model(num_hidden_layers=6)
    for _ in range(2):  # enabling twice must not leave a second hook behind
        make_train_step(toggled, torch.optim.SGD(toggled.parameters(), lr=0.0), batch(toggled),
                        gradient_checkpointing=True)
    assert frozen_bottom_activations(toggled) == fresh


def test_tensor_bytes_counts_each_storage_once():
    from helpers.memory import tensor_bytes

    a = torch.zeros(10, 4)
    state = {"m": a, "view": a[:5], "again": [a], "b": torch.zeros(3, dtype=torch.uint8), "n": 7}
    assert tensor_bytes(state) == 10 * 4 * 4 + 3
    assert tensor_bytes({}) == 0


def test_accumulated_micro_batches_give_the_big_batch_update():
    ids = torch.randint(3, 500, (4, 16), generator=torch.Generator().manual_seed(2))
    updated = []
    for k in (1, 2, 4):
        model = tiny_model(seed=1)
        step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), {"input_ids": ids, "labels": ids},
                               gradient_accumulation_steps=k)
        step()
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(updated[0], torch.cat([p.flatten() for p in tiny_model(seed=1).parameters()]))
    assert torch.allclose(updated[0], updated[1], atol=1e-6) and torch.allclose(updated[0], updated[2], atol=1e-6)
    with pytest.raises(ValueError, match="must divide"):
        make_train_step(tiny_model(), torch.optim.SGD(tiny_model().parameters(), lr=1.0), {"input_ids": ids},
                        gradient_accumulation_steps=3)


def test_saved_for_backward_separates_autocast_weight_copies_from_activations():
    from helpers.estimate import Dims, autocast_block_activation_bytes, block_activation_bytes
    from helpers.memory import saved_for_backward

    model = tiny_model(num_hidden_layers=2)
    d = Dims.of(model.config)
    ids = torch.randint(0, d.vocab, (2, 16), generator=torch.Generator().manual_seed(5))

    def forward(enabled):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                model(input_ids=ids, labels=ids, use_cache=False)
        return run

    fp32 = saved_for_backward(forward(False), model)
    assert set(fp32) == {"activations, torch.float32", "activations, torch.int64"}  # weights are not copies
    amp = saved_for_backward(forward(True), model)
    assert amp["weight copies, torch.bfloat16"] == 2 * (d.layers * d.block_linear_params + d.embedding_params)
    blocks = d.layers * (block_activation_bytes(d, 32) - autocast_block_activation_bytes(d, 32))
    saved32 = fp32["activations, torch.float32"]
    saved_amp = amp["activations, torch.float32"] + amp["activations, torch.bfloat16"]
    assert abs((saved32 - saved_amp) / blocks - 1) < 0.1  # the blocks' saving, as the estimator counts it


def test_unmetered_tensors_are_invisible_to_the_meter_and_the_rest_still_counts():
    def block():
        kept = torch.ones(1000)  # 4,000 bytes, metered
        with unmetered():
            torch.ones(10_000).sum()  # 40,000 bytes the meter must not see (a referee's own check)
        return kept
    report = measure(block)
    assert report.activations == report.peak == 4000


def test_a_storage_resized_in_place_counts_only_while_it_holds_bytes():
    """FSDP2 frees a gathered parameter by shrinking its storage to zero bytes (``storage.resize_(0)``) and keeps the
    tensor: the meter must see the free, and the regrowth, as the allocator does."""
    buffer = torch.empty(1024)  # 4 KiB, made before the block: counted once the block touches it

    def gather_use_free():
        storage = buffer.untyped_storage()
        storage.resize_(0)
        storage.resize_(8 * 4096)  # 32 KiB: the gathered parameter
        buffer.set_(storage, 0, (8192,))
        peak_here = torch.ones(1024)  # 4 KiB more while it is alive
        storage.resize_(0)  # freed; the tensor object survives
        after = torch.ones(2048)  # 8 KiB: below the peak, with the 32 KiB gone
        return peak_here, after

    report = measure(gather_use_free)
    assert report.peak == 32 * 1024 + 4 * 1024
    assert report.after == 4 * 1024 + 8 * 1024
    assert torch.UntypedStorage.resize_ is not None and "resize_seen" not in repr(torch.UntypedStorage.resize_)


def _measured_step(k: int, ckpt: bool, seed: int):
    """A 3-block tiny model's AdamW step of 3 x 32 tokens in k micro-batches, warmed up, then measured with its
    timeline: (model, optimizer, step, report)."""
    model = tiny_model(num_hidden_layers=3)
    ids = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = make_train_step(model, opt, {"input_ids": ids, "labels": ids}, gradient_accumulation_steps=k,
                           gradient_checkpointing=ckpt)
    step()
    return model, opt, step, measure(step, model=model, optimizer=opt, timeline=True)


@pytest.mark.parametrize("k,ckpt", [(1, False), (3, False), (1, True)])
def test_the_timeline_is_exact_and_names_the_phases(k, ckpt):
    """The timeline replays the same records as the peak: its highest point is the report's breakdown, byte for
    byte; the phases come in the order a step runs them, one forward and backward per micro-batch."""
    model, opt, step, report = _measured_step(k, ckpt, seed=2)
    tl = report.timeline
    assert tl.at(tl.peak_event) == report.as_dict() and tl.total(tl.peak_event) == report.peak
    assert all(tl.total(i) <= report.peak for i in range(tl.events))
    names = [name for _, _, name in tl.phases]
    if k == 1:
        assert names == ["forward", "backward", "optimizer step"]
    else:
        assert names == [f"{p} {i}" for i in range(1, k + 1) for p in ("forward", "backward")] + ["optimizer step"]
    grads = tl.bytes["gradients"]
    trainable = sum(p.numel() for p in model.parameters()) * 4
    assert grads[0] == 0 and max(grads) == trainable and grads[-1] == 0  # zero_grad(set_to_none=True) at the end
    assert min(tl.bytes["optimizer"]) == max(tl.bytes["optimizer"])  # AdamW's state, allocated in the warm-up
    assert measure(step, model=model, optimizer=opt).timeline is None  # off by default


def test_cuda_snapshot_says_what_to_use_on_a_cpu():
    from helpers.memory import cuda_memory_snapshot

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="timeline=True"):
        with cuda_memory_snapshot("never.pickle"):
            pass


def test_the_timeline_plot_marks_the_peak(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from helpers.plots import timeline

    model = tiny_model(num_hidden_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = make_train_step(model, opt, {"input_ids": ids, "labels": ids})
    report = measure(step, model=model, optimizer=opt, timeline=True)
    ax = timeline(report, title="tiny")
    label = f"peak {report.peak / MiB:,.1f} MiB"
    assert any(t.get_text().startswith(label) for t in ax.texts)
    assert {t.get_text() for t in ax.texts} >= {"forward", "backward"}
    ax.figure.savefig(tmp_path / "t.png")
    with pytest.raises(ValueError, match="timeline=True"):
        timeline(measure(step, model=model, optimizer=opt))


@pytest.mark.parametrize("k,ckpt", [(1, False), (3, False), (1, True)])
def test_the_moment_of_the_peak_is_the_phase_the_timeline_peaks_in(k, ckpt):
    """A measured step knows its peak's moment without a timeline; it agrees with the timeline's phase at the peak,
    and "backward start" means no gradient was made in that backward yet."""
    model, opt, step, report = _measured_step(k, ckpt, seed=4)
    tl = report.timeline
    phase = tl.phase_of(tl.peak_event).split(" ")[0]  # "backward 2" -> "backward"
    moment, _, accumulating = report.moment.partition(", ")
    assert moment in {"forward", "backward start", "backward", "backward end", "optimizer step"}
    assert moment.startswith(phase)
    assert bool(accumulating) == (tl.phase_of(tl.peak_event) not in ("forward", "backward", "optimizer step",
                                                                     "forward 1", "backward 1"))
    began = next(first for first, last, _ in tl.phases if first <= tl.peak_event <= last)
    grads_then = tl.bytes["gradients"][max(began - 1, 0)]  # when the peak's phase began
    assert (tl.bytes["gradients"][tl.peak_event] == grads_then) == (moment == "backward start") or phase != "backward"
    assert measure(step, model=model, optimizer=opt).moment == report.moment  # the same without a timeline


def test_the_moment_is_unknown_outside_a_training_step_and_found_when_gradients_exist():
    from helpers.memory_report import moment_words

    model = tiny_model()
    with torch.no_grad():
        assert measure(lambda: model(**batch(model)), model=model).moment is None  # no backward, no step
    assert measure(lambda: tiny_model(), model=None).moment is None  # loading
    # Few activations and a large embedding: the peak comes once the gradients exist, late in backward.
    big = tiny_model(vocab_size=20_000)
    big.model.embed_tokens.weight.requires_grad_(True)
    ids = torch.randint(0, 20_000, (1, 2), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(big.parameters(), lr=0.0)
    step = make_train_step(big, opt, {"input_ids": ids, "labels": ids})
    report = measure(step, model=big, optimizer=opt)
    trainable = storage_bytes([p for p in big.parameters() if p.requires_grad])
    assert report.moment == "backward end" and report.gradients == trainable  # every gradient made
    assert moment_words("backward start") == "start of backward" and moment_words(None) == ""
    assert moment_words("forward end, accumulating") == "end of forward (accumulating)"


def test_stacked_bars_say_the_moment_of_each_peak_and_keep_the_legend_under_the_plot():
    import matplotlib

    matplotlib.use("Agg")
    from helpers.memory_report import MemoryReport, moment_words
    from helpers.plots import stacked_bars

    model = tiny_model(num_hidden_layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    step = make_train_step(model, opt, batch(model, 4, 32))
    step()
    trained = measure(step, model=model, optimizer=opt)
    with torch.no_grad():
        inferred = measure(lambda: model(**batch(model, 4, 32)), model=model)
    ax = stacked_bars({"inference": inferred, "step": trained, "given": MemoryReport(weights=MiB, moment="block 3")})
    moments = [t.get_text() for t in ax.texts if t.get_gid() == "moment"]
    assert trained.moment and inferred.moment is None  # an inference bar has no moment to name
    assert moments == [f"peak: {moment_words(trained.moment)}", "peak: backward, block 3"]
    totals = [t.get_text() for t in ax.texts if t.get_gid() == "total"]
    assert totals == [f"{r.peak / MiB:,.0f}" for r in (inferred, trained)] + ["1"]
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, plot = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.y1 < plot.y0 and legend.x0 >= 0 and legend.x1 <= fig.bbox.x1  # below the plot, inside the figure
    for value in (t for t in ax.texts if t.get_gid() == "moment"):
        assert value.get_window_extent(renderer).y1 <= plot.y1  # inside the plot
