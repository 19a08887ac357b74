"""tests/gpu/run_all.sh stays runnable while no GPU is lent: the first GPU that comes runs it in one
device call, with no time to mend a renamed flag or function. It parses as bash; every flag it
passes a benchmark is one that benchmark's --help lists; the pre-training settings it overrides
exist; every name the GPU tests import from the repository exists."""
import ast
import os
import re
import subprocess
import sys
import tarfile
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "tests" / "gpu"
RUN_ALL = GPU / "run_all.sh"


def _commands() -> list[str]:
    """run_all.sh's logical lines, continuations joined, with each $VAR whose default is set in
    the script (VAR=${VAR-default} or ${VAR:-default}) replaced by that default, and each other
    variable (one computed as it runs: a stage's time limit and what follows from it) by 60."""
    text = RUN_ALL.read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"\b(\w+)=\$\{\1:?-([^}]*)\}", text))
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), "60"), ln) for ln in lines]


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
    assert {"benchmarks/kernels.py", "benchmarks/fp8.py", "benchmarks/e2e.py", "benchmarks/serve_prefix.py"} <= set(calls)
    assert "--quick" in calls["benchmarks/kernels.py"]  # from KERNELS_ARGS's default
    assert "--baseline-steps" in calls["benchmarks/e2e.py"]  # from E2E_ARGS's default
    assert "--kv-heads" in calls["benchmarks/serve_prefix.py"]  # from SERVE_ARGS's default


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


# python3, torchrun and nvidia-smi for run_all.sh where no GPU is: a stage's command logs itself,
# sleeps STAGE_SLEEP seconds and exits 0; the table's summary reader (python3 -) is the real Python
FAKE = """#!/usr/bin/env bash
if [ "${1:-}" = - ]; then exec PYTHON "$@"; fi
case " $* " in *" -m pip "*) exit 0 ;; esac
[ "$(basename "$0")" = nvidia-smi ] && { echo "no GPU (fake)"; exit 0; }
echo "$(basename "$0") $*" >> "$FAKE_LOG"
sleep "$STAGE_SLEEP"
"""


def _run_all(tmp_path, *stages, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "torchrun", "nvidia-smi"):
        (bin_dir / name).write_text(FAKE.replace("PYTHON", sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "FAKE_LOG": str(tmp_path / "calls.log"), **{k: str(v) for k, v in env.items()}}
    r = subprocess.run(["bash", str(RUN_ALL), *stages], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    calls = (tmp_path / "calls.log").read_text().splitlines() if (tmp_path / "calls.log").exists() else []
    return r, calls


def test_stages_past_the_budget_are_not_started_and_the_rerun_names_them(tmp_path):
    # the build's 6 s fit its 10 s limit; then 4 s at most are left, under the 5 s a stage needs
    r, calls = _run_all(tmp_path, BUDGET_S=10, MIN_STAGE_S=5, RESERVE_S=0, STAGE_SLEEP=6)
    assert r.returncode == 0, r.stderr
    assert len(calls) == 1 and "setup.py build_ext" in calls[0], calls
    assert "| build | 0 |" in r.stdout
    for stage in ("e2e", "fp8", "tests", "kernels", "serve", "default"):
        assert f"| {stage} | not run | - | budget spent before it |" in r.stdout
    assert "not run for lack of budget; while the machine is warm: BUDGET_S=<seconds left> bash tests/gpu/" \
           "run_all.sh e2e fp8 tests kernels serve default\n" in r.stdout
    # what comes back from the device: the table, and every file of the call in one archive
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["polar_gpu.tgz", "table.md"]
    assert "| build | 0 |" in (out / "table.md").read_text()
    with tarfile.open(out / "polar_gpu.tgz") as tar:
        assert {"./gpu.txt", "./commit.txt", "./build.log", "./table.md"} <= set(tar.getnames())


def test_a_stage_past_its_cap_is_cut_and_the_next_still_runs(tmp_path):
    r, calls = _run_all(tmp_path, "default", "tests", BUDGET_S=120, T_TESTS=1, T_DEFAULT=2, MIN_STAGE_S=1,
                        STAGE_SLEEP=6)
    assert r.returncode == 0, r.stderr
    # the script's order, not the command line's; each under its own cap
    assert [c.split()[0] for c in calls] == ["python3", "torchrun"] and "pytest tests/gpu" in calls[0], calls
    assert "train.time_limit_s=1 " in calls[1]  # three quarters of the stage's 2 s
    assert "| tests | 124 |" in r.stdout and "| default | 124 |" in r.stdout and "no summary" in r.stdout
    assert "not run" not in r.stdout


def test_an_unknown_stage_is_refused(tmp_path):
    r, calls = _run_all(tmp_path, "tests", "bench", STAGE_SLEEP=0)
    assert r.returncode == 2 and "unknown stage: bench" in r.stdout and calls == []


def test_the_plan_comparison_reads_the_benchmarks_json_after_the_stages(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "fp8.json").write_text("{}")  # an earlier call's (the machine is warm)
    r, calls = _run_all(tmp_path, "serve", STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    assert calls[0].startswith("python3 benchmarks/serve_prefix.py"), calls
    assert calls[1] == (f"python3 benchmarks/plan_measured.py {tmp_path}/work/fp8.json "
                        f"--write {tmp_path}/work/plan_measured.json"), calls
