"""tests/gpu/run_all.sh stays runnable while no GPU is lent: the first GPU that comes runs it in one
device call, with no time to mend a renamed flag or function. It parses as bash; every flag it
passes a benchmark is one that benchmark's --help lists; the pre-training settings it overrides
exist; every name the GPU tests import from the repository exists."""
import ast
import re
import subprocess
import sys
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "tests" / "gpu"
RUN_ALL = GPU / "run_all.sh"


def _commands() -> list[str]:
    """run_all.sh's logical lines, continuations joined, with each $VAR whose default is set in
    the script (VAR=${VAR-default} or ${VAR:-default}) replaced by that default."""
    text = RUN_ALL.read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"\b(\w+)=\$\{\1:?-([^}]*)\}", text))
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), ln) for ln in lines]


def test_run_all_parses_as_bash():
    for script in (RUN_ALL, GPU / "fetch_wheels.sh"):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"


def _benchmark_calls() -> dict[str, set]:
    calls: dict[str, set] = {}
    for line in _commands():
        for script, rest in re.findall(r"python3? (benchmarks/\w+\.py)(.*)", line):
            calls.setdefault(script, set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))
    return calls


def test_the_pattern_reads_flags_from_variables_and_continuations():
    calls = _benchmark_calls()
    assert {"benchmarks/kernels.py", "benchmarks/fp8.py", "benchmarks/e2e.py"} <= set(calls)
    assert "--quick" in calls["benchmarks/kernels.py"]  # from KERNELS_ARGS's default
    assert "--baseline-steps" in calls["benchmarks/e2e.py"]  # from E2E_ARGS's default


@pytest.mark.parametrize("script", sorted(_benchmark_calls()))
def test_every_flag_given_to_a_benchmark_is_one_it_takes(script):
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    taken = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", r.stdout))
    assert _benchmark_calls()[script] <= taken, f"{script} does not take {_benchmark_calls()[script] - taken}"


def test_the_pretraining_settings_it_overrides_exist():
    from engine import pretrain

    (line,) = [ln for ln in _commands() if "engine/pretrain.py" in ln]
    overrides = [w for w in line.split("engine/pretrain.py", 1)[1].split() if re.match(r"^[\w.]+=", w)]
    assert len(overrides) >= 2, overrides  # train.precision and run_dir
    assert pretrain.main(["--print-config", *overrides]) == 0  # 2 and the unknown key named otherwise


def _imports(path: Path):
    """(module, name) for every `from X import name` in the file, at any depth, X in this repository."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("engine", "polar",
                                                                                              "tests"):
            for alias in node.names:
                yield node.module, alias.name


def test_every_name_the_gpu_tests_import_exists():
    found = [(p.name, m, n) for p in sorted(GPU.glob("*.py")) for m, n in _imports(p)]
    assert len(found) > 10
    missing = []
    for file, module, name in found:
        mod = import_module(module)
        # a submodule that needs the CUDA build (engine.kernels.cuda_ops) exists as a file here
        if not hasattr(mod, name) and not (hasattr(mod, "__path__") and find_spec(f"{module}.{name}")):
            missing.append(f"{file}: from {module} import {name}")
    assert missing == []
