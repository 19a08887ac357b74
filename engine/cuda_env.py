"""CUDA_DEVICE_MAX_CONNECTIONS for tensor-parallel runs, set before CUDA starts in this process.

megatron's tensor-parallel linears launch their all-gather / reduce-scatter asynchronously and
overlap it with the weight-gradient GEMM only when the GPU starts kernels in launch order, i.e. one
hardware work queue (megatron.core.tensor_parallel.layers warns once per rank otherwise). CUDA reads
the variable when the driver starts, so a setting made after the first CUDA call changes nothing:
entry points call `order_tp_launches` right after reading their settings, before any CUDA call.
It is set only where the user set nothing, only with TP > 1, and only on GPUs before compute
capability 10 (Hopper and older), where megatron's guidance is to use 1; NVIDIA's launchers leave
Blackwell (10.x and later) at the driver's default. The capability comes from nvidia-smi, which
queries the driver without starting CUDA in this process.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable, MutableMapping, Optional

VARIABLE = "CUDA_DEVICE_MAX_CONNECTIONS"


def nvidia_smi_capability() -> Optional[float]:
    """The compute capability of the first GPU nvidia-smi lists (9.0 on an H100; it ignores
    CUDA_VISIBLE_DEVICES, and a node's GPUs are of one kind), None without a GPU or nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return float(out[0]) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def order_tp_launches(tp: int, environ: Optional[MutableMapping[str, str]] = None,
                      capability: Callable[[], Optional[float]] = nvidia_smi_capability) -> Optional[str]:
    """Sets VARIABLE=1 in `environ` (os.environ) where it applies (module docstring); returns the
    value set, or None where nothing was set."""
    environ = os.environ if environ is None else environ
    if tp <= 1 or VARIABLE in environ:
        return None
    cc = capability()
    if cc is None or cc >= 10:
        return None
    environ[VARIABLE] = "1"
    return "1"
