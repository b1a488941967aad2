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
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` on 2 cores: one thread per worker and its kernels, not four
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# What makes a test slow, so `pytest -m "not slow"` is the inner loop: a solution notebook (nbval starts a kernel
# and runs the lesson), a fixture that loads the real course model or runs the grader, or a check judged on a
# model of the course model's size (the "course-shaped" dims). Tests that start a kernel or launch processes
# carry @pytest.mark.slow themselves.
SLOW_FIXTURES = {"course_model", "course_tokenizer", "started"}  # started: the grader's runs (tests/test_grade.py)


def pytest_collection_modifyitems(items):
    for item in items:
        course_sized = getattr(item, "callspec", None) and item.callspec.params.get("dims") == "course-shaped"
        if item.path.suffix == ".ipynb" or course_sized or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
