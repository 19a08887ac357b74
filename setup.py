"""Builds polar-rm's native extensions; the package metadata lives in pyproject.toml.

Two extensions:
  engine._C       csrc/*.cpp, pybind11 + numpy only. Always built, -O3, no -march=native so the
                  result runs on any x86_64 / aarch64 machine it is copied to.
                  csrc/common/*.h hold the readout and loss math that both extensions compile
                  (host-device functions): the CPU references run exactly the kernels' formulas.
  engine._C_cuda  csrc/cuda/*.cu (kernels, no torch headers) + csrc/cuda/*.cpp (the torch binding, which
                  registers the ops with TORCH_LIBRARY_FRAGMENT(polar, m)), torch CUDAExtension. Built
                  only when there are .cu files, the torch that setup.py can import is a CUDA build,
                  and nvcc is found. Load with torch.ops.load_library (engine/kernels/cuda_ops.py).
                  torch is not in the build requirements, so this needs
                  `pip install --no-build-isolation -e .` in an environment that has CUDA torch.

Environment switches (read at build time):
  POLAR_SKIP_CUDA_BUILD=1   never build engine._C_cuda
  POLAR_FORCE_CUDA_BUILD=1  fail instead of skipping when the CUDA extension cannot be built
  POLAR_CUDA_ARCHS          target GPUs, e.g. "90a" (default) or "80;90a"; `a` / `f` suffixes kept
  MAX_JOBS                  parallel compile jobs (default: CPU count)
"""
import os
import re
import shutil
import sys
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from pybind11.setup_helpers import build_ext as Pybind11BuildExt
from setuptools import setup

# setuptools wants source paths relative to the project root, whatever the caller's directory.
ROOT = os.path.dirname(os.path.abspath(__file__))
os.chdir(ROOT)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    # pip hides build output unless -v is given; stderr still reaches the log it writes on failure.
    print(f"polar setup.py: {msg}", file=sys.stderr)


# Headers, so that editing one rebuilds the extensions that include it (and sdists carry them).
_SHARED_HEADERS = sorted(glob("csrc/common/*.h"))


def _cpu_extension() -> Pybind11Extension:
    return Pybind11Extension(
        "engine._C",
        sorted(glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        depends=sorted(glob("csrc/*.h")) + _SHARED_HEADERS,
        cxx_std=17,
        extra_compile_args=["-O3"],
    )


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, re.split(r"[;,\s]+", archs)):
        if not re.fullmatch(r"\d+[af]?", arch):
            raise SystemExit(f"POLAR_CUDA_ARCHS: {arch!r} is not a compute capability like 90a or 80")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if not flags:
        raise SystemExit("POLAR_CUDA_ARCHS is empty; name at least one architecture, e.g. 90a")
    return flags


def _cuda_extension():
    """(extension, build_ext class) for the CUDA sources, or (None, None) with the reason logged."""
    kernels = sorted(glob("csrc/cuda/*.cu"))
    if not kernels:
        return None, None
    if _env_flag("POLAR_SKIP_CUDA_BUILD"):
        _log("POLAR_SKIP_CUDA_BUILD is set: not building engine._C_cuda")
        return None, None

    def skip(reason: str):
        if _env_flag("POLAR_FORCE_CUDA_BUILD"):
            raise SystemExit(f"POLAR_FORCE_CUDA_BUILD is set but engine._C_cuda cannot be built: {reason}")
        _log(f"not building engine._C_cuda: {reason}")
        return None, None

    # Imported only here: a CPU-only build must not need torch at all.
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return skip(f"torch is not importable in the build environment ({exc}); "
                    "use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return skip("nvcc not found (set CUDA_HOME)")

    archs = os.environ.get("POLAR_CUDA_ARCHS", "90a")
    # No -std here: torch's builder picks the standard its headers need (C++20 from torch 2.14 on,
    # whose ATen.h rejects C++17), and a pinned one would break the next torch upgrade.
    nvcc_flags = [
        "-O3",
        "-lineinfo",  # source lines in profiles, no runtime cost
        "--expt-relaxed-constexpr",
        # torch defines these to keep its own half types unambiguous; kernels want native operators.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        *_gencode_flags(archs),
    ]
    sources = kernels + sorted(glob("csrc/cuda/*.cpp"))
    _log(f"building engine._C_cuda from {len(sources)} file(s) for {archs} with torch {torch.__version__}")
    ext = CUDAExtension(
        "engine._C_cuda",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "cuda"), os.path.join(ROOT, "csrc")],
        depends=sorted(glob("csrc/cuda/*.h") + glob("csrc/cuda/*.cuh")) + _SHARED_HEADERS,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return ext, BuildExtension


ext_modules = [_cpu_extension()]
build_ext = Pybind11BuildExt
cuda_ext, cuda_build_ext = _cuda_extension()
if cuda_ext is not None:
    ext_modules.append(cuda_ext)
    # torch's builder knows .cu files and also compiles the plain pybind11 extension correctly.
    build_ext = cuda_build_ext
else:
    # Compiles the .cpp files of one extension in parallel (torch's builder does this via ninja).
    ParallelCompile("MAX_JOBS").install()

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
