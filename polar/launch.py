"""Runs an engine entry point on this machine: in this process for one process, else under torchrun.

`polar score --nproc 4 --tp 2 ...` becomes `torchrun --standalone --nproc_per_node 4 -m engine.score
--tp 2 ...`; with `--nproc 1` (the default of the tools that use this) the entry point runs here,
without torchrun (the engine's runtime starts a single-process group by itself)."""
from __future__ import annotations

import importlib
import subprocess
import sys


def split_nproc(argv: list[str], default: int) -> tuple[int, list[str]]:
    """(--nproc value, the other arguments), accepting `--nproc N` and `--nproc=N`."""
    rest, nproc, i = [], default, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc":
            if i + 1 == len(argv):  # passed on, it was the entry point's "unrecognized arguments: --nproc"
                raise SystemExit("--nproc: expected a number of processes after it")
            nproc, i = argv[i + 1], i + 2
            continue
        if a.startswith("--nproc="):
            nproc = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    try:
        nproc = int(nproc)
    except ValueError:
        raise SystemExit(f"--nproc: expected a number of processes, got {nproc!r}") from None
    if nproc < 1:
        raise SystemExit(f"--nproc: expected at least 1, got {nproc}")
    return nproc, rest


def run_entry(module: str, argv: list[str], default_nproc: int = 1) -> int:
    nproc, rest = split_nproc(argv, default_nproc)
    if nproc == 1:
        return importlib.import_module(module).main(rest)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *rest]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def score_main(argv=None) -> int:
    return run_entry("engine.score", list(sys.argv[1:] if argv is None else argv))


def eval_main(argv=None) -> int:
    return run_entry("engine.evaluate", list(sys.argv[1:] if argv is None else argv))
