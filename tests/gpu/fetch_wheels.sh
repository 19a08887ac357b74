#!/usr/bin/env bash
# Run on the development machine: downloads the pure-Python wheels the GPU image lacks into .whl/
# (git-ignored; the device call carries it). The GPU image: Python 3.12, torch 2.11+cu130, triton,
# numpy, pytest; no megatron-core, pybind11 or tensorboard. setuptools and ninja build the extensions
# (engine._C and the CUDA engine._C_cuda) with the image's torch, without build isolation.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl megatron-core==0.19.2 pybind11 psutil pyyaml setuptools ninja
ls -la .whl
