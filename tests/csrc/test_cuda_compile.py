"""csrc/cuda compiles for H100 (sm_90a) without a GPU: every .cu with plain nvcc (no torch headers),
and the torch binding ops.cpp checked by g++ against the installed torch headers.

The kernels' numbers are checked on a GPU by tests/gpu/test_kernels_gpu.py; here a compile error, a
register spill or a binding that no longer matches kernels.h fails. ptxas' register counts are
printed (pytest -s) for the record.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"  # include root of csrc/common, the math shared with the CPU references
CUDA_DIR = CSRC / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def test_there_are_kernels():
    assert {p.name for p in CU_FILES} >= {"reward_readout.cu", "contrastive_loss.cu"}


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_sm90a_without_spills(source, tmp_path):
    cmd = [NVCC, "-gencode", "arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-Xptxas", "-v",
           "-I", str(CUDA_DIR), "-I", str(CSRC), "-c", str(source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{log[-6000:]}"
    assert "warning" not in log.lower(), f"nvcc warnings in {source.name}:\n{log[-6000:]}"
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    assert kernels and len(registers) == len(kernels) == len(spills), log[-3000:]
    spilled = [k for k, (st, ld) in zip(kernels, spills) if st or ld]
    assert not spilled, f"register spills in {source.name}: {spilled}"
    print(f"\n{source.name}: {len(kernels)} kernels, registers {min(registers)}-{max(registers)}, no spills")


@needs_nvcc
def test_binding_matches_torch_headers():
    """g++ -fsyntax-only on ops.cpp. The CPU torch wheel ships the c10/cuda headers but not the
    generated cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips (it only holds
    build-configuration defines the declarations used here do not need)."""
    torch = pytest.importorskip("torch")
    include = Path(torch.__file__).parent / "include"
    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    if not (include / "c10" / "cuda" / "CUDAStream.h").exists():
        pytest.fail(f"torch {torch.__version__} ships no c10/cuda headers; cannot check ops.cpp")
    if not (cuda_include / "cuda_runtime_api.h").exists():
        cuda_include = Path("/usr/local/cuda/include")
    gxx = shutil.which("g++") or shutil.which("c++")
    assert gxx, "no C++ compiler found"
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14) else "-std=c++17"
    cmd = [gxx, "-fsyntax-only", std, "-w", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-I", str(include), "-I", str(include / "torch" / "csrc" / "api" / "include"),
           "-I", str(cuda_include), "-I", str(CUDA_DIR), str(CUDA_DIR / "ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ops.cpp does not compile against torch {torch.__version__}:\n{proc.stderr[-6000:]}"
