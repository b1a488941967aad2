"""ruff, configured in pyproject.toml, passes on helpers/ and tests/."""

import subprocess
import sys

from helpers.constants import ROOT


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "helpers", "tests"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
