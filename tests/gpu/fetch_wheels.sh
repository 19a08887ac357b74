#!/usr/bin/env bash
# Run on the development machine: downloads the wheels the GPU image may lack into .whl/ (git-ignored;
# the device call carries it: run(..., carry=[".whl"])). The GPU image (/work/.library/device/KINDS.md):
# Python 3.12, torch 2.11+cu130, triton 3.6, numpy, pytest, pytest-xdist, pybind11, psutil, pyyaml,
# setuptools, ninja, tensorboard; no megatron-core. run_all.sh installs megatron-core always and the
# others only where the image lacks them (its own builds are kept); setuptools and ninja build the
# extensions (engine._C and the CUDA engine._C_cuda) with the image's torch, without build isolation.
# For each python in PYTHONS (default 3.12, the image's, and 3.13, should the image move on; not this
# machine's python): megatron-core and pyyaml are compiled per python, and run_all.sh installs of each
# package the wheel whose tags the GPU machine's python takes (a cp312 wheel on a 3.13 refused pip's
# whole install). x86_64 manylinux: the GPU machine's platform, whatever this one is.
# Pinned, and .whl/ emptied first: two versions of one package would stop pip's whole install.
set -euo pipefail
cd "$(dirname "$0")/../.."
# kept out of git (.gitignore has it; else the clone's info/exclude, which a clone may lack)
if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q .whl/x.whl; then
  exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"; echo '/.whl/' >> "$exclude"
fi
mkdir -p .whl && rm -f .whl/*.whl
for py in ${PYTHONS:-3.12 3.13}; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl megatron-core==0.19.2 pybind11==3.1.0 psutil==7.2.2 pyyaml==6.0.4 setuptools==84.2.1 ninja==1.13.2
done
ls -la .whl
du -sh .whl  # a device call carries at most 64 MiB in all
