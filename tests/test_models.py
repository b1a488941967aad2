"""The offline course model: verified source, atomic conversion, rebuilt cache, clear errors."""

import json

import pytest
import torch

from helpers import models


def test_default_model_loads_offline_and_answers(course_model, course_tokenizer):
    assert course_model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in course_model.parameters()) == 134_515_008
    ids = course_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = course_model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in course_tokenizer.decode(out[0, ids.shape[1]:])


def test_load_model_takes_dtype():
    model = models.load_model(dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_hub_id_offline_fails_with_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelUnavailableError) as info:
        models.load_model("some-org/some-model-that-is-not-here")
    message = str(info.value)
    assert "could not be reached" in message and "\n" not in message
    err = info.value  # no chained stack of hub errors under the sentence
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_course_model_env_var_selects_a_local_folder(tmp_path, monkeypatch):
    models.tiny_model().save_pretrained(tmp_path)
    monkeypatch.setenv("COURSE_MODEL", str(tmp_path))
    assert models.load_model().config.hidden_size == models.tiny_config().hidden_size


def test_gguf_is_verified(monkeypatch):
    assert models.gguf_path().name == models.GGUF_FILE
    monkeypatch.setattr(models, "GGUF_SHA256", "0" * 64)
    with pytest.raises(models.ModelUnavailableError, match="sha256"):
        models.gguf_path()


# ---- conversion, with the slow GGUF reader replaced by a tiny model -----------------------------
class _Tokenizer:
    def __init__(self, fail=False):
        self.fail = fail

    def save_pretrained(self, folder):
        if self.fail:
            raise KeyboardInterrupt  # the learner pressed stop mid-conversion
        (folder / "tokenizer_config.json").write_text("{}")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_verified", set())
    monkeypatch.setattr(models, "gguf_path", lambda: tmp_path / "model.gguf")
    state = {"fail": False}
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        staticmethod(lambda *a, **k: models.tiny_model()))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        staticmethod(lambda *a, **k: _Tokenizer(state["fail"])))
    return state


def test_conversion_is_atomic(fake_gguf):
    fake_gguf["fail"] = True
    with pytest.raises(KeyboardInterrupt):
        models.prepare_default_model(verbose=False)
    target = models.default_checkpoint_dir()
    assert not target.exists()
    assert not any(target.parent.iterdir())  # no partial folder left behind either


def test_corrupt_cache_is_detected_and_rebuilt(fake_gguf, capsys):
    folder = models.prepare_default_model()
    assert models.checkpoint_problem(folder) is None
    manifest = json.loads((folder / models.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"]
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download / full disk
    assert "wrong size" in models.checkpoint_problem(folder)
    models._verified.clear()
    capsys.readouterr()
    models.prepare_default_model()
    assert "unusable" in capsys.readouterr().err
    assert models.checkpoint_problem(folder) is None
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, flipped bits
    weights.write_bytes(bytes(data))
    assert "corrupt" in models.checkpoint_problem(folder)
    (folder / models.MANIFEST).unlink()
    assert "manifest" in models.checkpoint_problem(folder)


@pytest.mark.parametrize("name,billions", [("llama-7b", 6.74), ("llama-13b", 13.02), ("llama-65b", 65.29)])
def test_reference_configs_have_the_published_sizes(name, billions):
    from transformers import AutoModelForCausalLM

    from helpers.estimate import Dims
    from helpers.models import reference_config

    config = reference_config(name)
    with torch.device("meta"):  # shapes only: no memory, no download
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == Dims.of(config).params and round(n / 1e9, 2) == billions


def test_an_unknown_reference_config_names_the_known_ones():
    from helpers.models import reference_config

    with pytest.raises(ValueError, match="llama-13b"):
        reference_config("llama-70b")
