"""The GPU machine's environment in one line, the first row of tests/gpu/run_all.sh's table: python,
torch and the CUDA device it sees, and the packages the stages need or adapt to. Exit 1 where torch
sees no CUDA device (run_all.sh then runs no stage: the benchmarks would time their CPU versions and
tests/gpu would skip), 2 where torch does not import.

    python3 tests/gpu/env_check.py
"""
from __future__ import annotations

import importlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

# (module, distribution, what its absence means); found by find_spec, not imported (seconds each),
# except where the stages themselves decide by importing it (benchmarks/fp8.py and e2e.py): a
# transformer_engine or flash_attn built against another torch is found but does not import
PACKAGES = (("megatron.core", "megatron-core", False, "every training stage fails; carry .whl (fetch_wheels.sh)"),
            ("transformers", "transformers", False, "no HF baseline in e2e"),
            ("transformer_engine.pytorch", "transformer_engine", True, "fp8's TE variants not run"),
            ("flash_attn", "flash_attn", True, "no HF flash_attention_2 baseline in e2e"))


def package(module: str, dist: str, imported: bool, absent: str) -> str:
    try:
        if find_spec(module.split(".")[0]) is None:
            return f"{dist} absent ({absent})"
        if imported:
            importlib.import_module(module)
        elif find_spec(module) is None:
            return f"{dist} absent ({absent})"
    except Exception as e:  # found but broken: named, with what it means
        return f"{dist} does not import ({type(e).__name__}: {str(e)[:80]}; {absent})"
    try:
        return f"{dist} {version(dist)}"
    except PackageNotFoundError:
        return f"{dist} (no version)"


def main() -> int:
    parts, rc = [f"python {platform.python_version()}"], 0
    try:
        import torch
    except Exception as e:  # the packages are still listed: what else the image lacks is known in one call
        parts.append(f"torch does not import: {e}")
        rc = 2
    else:
        try:
            cuda = torch.cuda.is_available()
            where = torch.cuda.get_device_name() if cuda else "no CUDA device: torch.cuda.is_available() is False"
        except Exception as e:  # a device counted whose initialisation then fails: a row, not a traceback
            cuda, where = False, f"no usable CUDA device ({type(e).__name__}: {str(e)[:120]})"
        parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {where}")
        rc = 0 if cuda else 1
    parts += [package(*p) for p in PACKAGES]
    print(", ".join(parts))
    return rc

if __name__ == "__main__":
    sys.exit(main())
