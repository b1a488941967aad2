"""helpers.offload on a tiny random Llama saved to disk: meta instantiation, forced disk offload, outputs."""

import shutil

import pytest
import torch

from helpers.memory import measure
from helpers.models import tiny_config, tiny_model
from helpers.offload import (
    check_offload,
    device_map_for,
    dispatch_offloaded,
    empty_model,
    generate_speed,
    load_offloaded,
    placement,
)

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny tied-embedding Llama saved as safetensors, with its logits and greedy tokens as the reference."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no "offloaded to the disk" warning per test; restored afterwards
    model = tiny_model(seed=3)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model(PROMPT).logits
    ids = generate_speed(model, PROMPT, new_tokens=6, repeats=1)["ids"]
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied embedding once
    yield {"path": path, "logits": logits, "ids": ids, "bytes": total}
    hf_logging.set_verbosity(verbosity)


def same_outputs(model, saved) -> None:
    with torch.no_grad():
        logits = model(PROMPT).logits
    assert torch.allclose(logits, saved["logits"], rtol=0, atol=1e-6), (logits - saved["logits"]).abs().max()
    assert torch.equal(generate_speed(model, PROMPT, new_tokens=6, repeats=1)["ids"], saved["ids"])


def test_empty_model_allocates_nothing_and_keeps_the_tie():
    report = measure(lambda: empty_model(tiny_config()), device="cpu")
    model = report.returned
    assert (report.peak, report.after) == (0, 0)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    real = tiny_model()
    assert placement(model) == {"meta": sum(p.numel() * p.element_size() for p in real.parameters())}


def test_from_pretrained_offloads_to_disk_on_a_cpu_only_machine(saved, tmp_path):
    folder = tmp_path / "offload"
    model = load_offloaded(saved["path"], {"cpu": saved["bytes"] // 2}, folder)
    where = placement(model)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert where["disk"] > 0 and sum(where.values()) == saved["bytes"]
    assert where["cpu"] <= saved["bytes"] // 2
    # the plan made on an empty model is what loading did
    empty = empty_model(saved["path"], include_buffers=False)
    assert placement(empty, device_map_for(empty, {"cpu": saved["bytes"] // 2})) == where
    # transformers 5 reads disk-offloaded weights from the checkpoint's own safetensors: nothing is copied
    assert not any(folder.iterdir())
    disk_params = [p for p in model.parameters() if p.device.type == "meta"]
    assert sum(p.numel() * p.element_size() for p in disk_params) == where["disk"]
    same_outputs(model, saved)


def test_everything_on_disk_still_runs(saved):
    model = load_offloaded(saved["path"], {"cpu": "1KiB"})
    assert placement(model) == {"disk": saved["bytes"]}
    same_outputs(model, saved)


def test_a_model_that_fits_is_not_dispatched(saved):
    model = load_offloaded(saved["path"], {"cpu": saved["bytes"] * 4})
    assert not hasattr(model, "hf_device_map")
    assert placement(model) == {"cpu": saved["bytes"]}


def test_accelerate_copies_disk_weights_into_the_offload_folder(saved, tmp_path):
    folder = tmp_path / "offload"
    model = dispatch_offloaded(saved["path"], {"cpu": saved["bytes"] // 2}, folder)
    where = placement(model)
    assert "disk" in model.hf_device_map.values() and sum(where.values()) == saved["bytes"]
    files = {p.name for p in folder.iterdir()}
    dat = {f for f in files if f.endswith(".dat")}
    assert "index.json" in files
    assert sum((folder / f).stat().st_size for f in dat) == where["disk"]
    same_outputs(model, saved)


def test_a_deleted_offload_folder_is_named_in_the_error(saved, tmp_path):
    folder = tmp_path / "offload"
    model = dispatch_offloaded(saved["path"], {"cpu": saved["bytes"] // 2}, folder)
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match="must stay in place") as err:
        check_offload(model)
    assert str(folder) in str(err.value)


def test_an_untied_empty_model_fails_at_load_with_advice(saved, tmp_path):
    """The trap: under init_empty_weights transformers 5 loses the lm_head/embedding tie, the lm_head goes to
    disk with no copy in the checkpoint, and the first forward dies with a bare KeyError: 'lm_head.weight'."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config())
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    device_map = device_map_for(model, {"cpu": saved["bytes"] // 2})
    assert device_map["lm_head"] == "disk"
    model = load_checkpoint_and_dispatch(model, str(saved["path"]), device_map=device_map,
                                         offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="tie_weights"):
        check_offload(model)


def test_generate_speed_counts_the_tokens_it_made(saved):
    model = tiny_model(seed=3)
    result = generate_speed(model, PROMPT, new_tokens=4, repeats=2)
    assert result["ids"].shape == (1, 4)
    assert result["tokens_per_second"] == pytest.approx(4 / result["seconds"])
