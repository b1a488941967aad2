"""Test-wide settings: never reach a model hub; make solution notebooks fail on a failing check."""

import os
import sys

import pytest

from helpers.constants import ROOT

sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may download from a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["COURSE_STRICT_CHECKS"] = "1"  # inherited by nbval's kernels: a failing check fails
os.environ.setdefault("PYTHONPATH", str(ROOT))


@pytest.fixture(scope="session")
def course_model():
    from helpers.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def course_tokenizer():
    from helpers.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def avx512bf16():
    """bitsandbytes as on a CPU with AVX512-BF16: the real library where this CPU has it, simulated elsewhere."""
    from helpers.cpu_packing import as_on_avx512bf16, packing_supported

    with as_on_avx512bf16():
        yield "real" if packing_supported() else "simulated"


@pytest.fixture
def lenient_checks(monkeypatch):
    """Check tests look at FAIL results, which strict mode (meant for solution notebooks) turns into errors."""
    monkeypatch.delenv("COURSE_STRICT_CHECKS", raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine (no oversubscription)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["course-shaped", "tiny"])
def dims(request):
    """Checks take the model's numbers from the lesson, so they must hold for any model, not only the default."""
    from casebook import COURSE, TINY

    return COURSE if request.param == "course-shaped" else TINY
