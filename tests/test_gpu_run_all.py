"""tests/gpu/run_all.sh stays runnable while no GPU is lent: the first GPU that comes runs it in one
device call, with no time to mend a renamed flag or function. It parses as bash; its --dry-run accepts
every stage's command line (each benchmark's own argparse reads its flags, the pre-training overrides
exist, tests/gpu collects); every name the GPU tests import from the repository exists; and, with
stand-ins for python3 and nvidia-smi, its budget, order, wheels, environment check and table."""
import ast
import os
import re
import shutil
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


def test_run_all_parses_as_bash():
    for script in (RUN_ALL, GPU / "fetch_wheels.sh"):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"


def _dry_run(tmp_path, *stages, script=RUN_ALL, **env):
    """run_all.sh --dry-run here, with this venv's python first on PATH and no wheels."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WORK": str(tmp_path / "work"), "WHEELS_DIR": str(tmp_path / "wheels"), **env}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(script), "--dry-run", *stages], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_dry_run_accepts_every_stages_command_line(tmp_path):
    r = _dry_run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("build", "e2e", "fp8", "cuda", "tests", "kernels", "serve", "score", "default", "reward"):
        assert re.search(rf"^\| {stage} \| 0 \| \d+ \|$", r.stdout, re.M), (stage, r.stdout[-3000:])
    for script in ("e2e", "fp8", "kernels", "swiglu_memory", "optimizer_step", "serve_prefix", "score_overlap"):
        assert f"benchmarks/{script}.py: arguments accepted: " in r.stdout, script
    assert "benchmarks/kernels.py: arguments accepted: --quick --json" in r.stdout  # KERNELS_ARGS's default
    assert "torch.distributed.run: arguments accepted: --standalone --nproc_per_node 1 engine/pretrain.py" in r.stdout
    assert re.search(r"^\d+ tests collected", r.stdout, re.M), r.stdout[-3000:]
    assert "every stage's command line was accepted" in r.stdout
    assert not (tmp_path / "work" / "e2e.json").exists() and not (tmp_path / "work" / "table.md").exists()


def test_the_dry_run_refuses_a_flag_a_benchmark_does_not_take_and_an_unknown_setting(tmp_path):
    r = _dry_run(tmp_path, "e2e", "serve", AUTO_BUILD="0", E2E_ARGS="--steps 8 --no-such-flag")
    assert r.returncode == 1, r.stdout[-3000:]
    assert "unrecognized arguments: --no-such-flag" in r.stdout and "| e2e | 2 |" in r.stdout
    assert "| serve | 0 |" in r.stdout and "refused: e2e:2\n" in r.stdout
    r = _dry_run(tmp_path, "e2e", AUTO_BUILD="0", E2E_ARGS="--steps many")  # a value of the wrong type
    assert r.returncode == 1 and "--steps: invalid int value: 'many'" in r.stdout, r.stdout[-2000:]
    # a pre-training setting that no longer exists, in a copy of the script (run from the checkout)
    copy = tmp_path / "run_all.sh"
    copy.write_text(RUN_ALL.read_text().replace("train.micro_batch=16", "train.no_such_setting=16"))
    r = _dry_run(tmp_path, "default", script=copy, AUTO_BUILD="0")
    assert r.returncode == 1 and "| default | 2 |" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert "no_such_setting" in r.stdout


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


def test_the_gpu_tests_are_collected_and_skipped_on_a_machine_without_one():
    """Every module imports (collected here, so a broken one is seen before a GPU comes) and every test
    is skipped saying why; it was an error at the conftest (pytest exit 4) naming nothing collected."""
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    skipped = re.fullmatch(r"=* ?(\d+) skipped in .*", summary)
    assert skipped and int(skipped[1]) > 100, summary
    assert "SKIPPED" in r.stdout and "tests/gpu needs a CUDA GPU" in r.stdout


def test_where_a_gpu_is_required_none_is_an_error_not_every_test_skipped():
    # run_all.sh sets it: on a GPU machine whose torch sees no device, every test skipped read as a pass
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "POLAR_GPU_REQUIRED": "1"})
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert "POLAR_GPU_REQUIRED is set and torch finds no CUDA device" in r.stdout + r.stderr


def test_only_the_gpu_tests_are_skipped_when_other_tests_run_beside_them():
    """tests/gpu's conftest marks tests skipped from a hook that sees the whole session: given beside
    another path (`pytest tests/engine/test_packing.py tests/gpu`), it skipped that file's tests too."""
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/engine/test_packing.py", "tests/gpu", "-q",
                        "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = re.fullmatch(r"=* ?(\d+) passed, (\d+) skipped in .*", r.stdout.strip().splitlines()[-1])
    assert counts and int(counts[1]) > 0 and int(counts[2]) > 100, r.stdout[-2000:]


def test_the_tests_handed_out_first_are_files_that_exist():
    from tests.gpu.conftest import RUNS_FIRST

    assert [name for name in RUNS_FIRST if not (GPU / name).exists()] == []


# python3 and nvidia-smi for run_all.sh where no GPU is: a stage's command logs itself (and the
# build's switch of the CUDA extension),
# leaves a file in its stage's scratch folder (as a benchmark cut at its limit leaves its run
# directories), copies FAKE_JSON to its --json file (as the benchmark writes it after each run) and
# FAKE_SUMMARY to its run_dir's summary.json (as a training writes it at its end),
# sleeps STAGE_SLEEP seconds and exits 0; `python3 -`, `python3 -c` and tests/gpu/partial_tables.py
# (the wheel choice, the table's summary reader, the xdist check, a cut benchmark's table) are the
# real Python; tests/gpu/env_check.py says it found a GPU, or exits FAKE_ENV_RC; pip logs its arguments
# to PIP_LOG and exits PIP_RC; a stage given POLAR_GPU_REPORT (the tests) reports a figure there;
# every stage prints FAKE_STDOUT (a file) as its output
FAKE = """#!/usr/bin/env bash
case "${1:-}" in -|-c|tests/gpu/partial_tables.py) exec PYTHON "$@" ;; esac
case " $* " in *" -m pip "*) echo "$*" >> "$PIP_LOG"; exit "${PIP_RC:-0}" ;; esac
[ "$(basename "$0")" = nvidia-smi ] && { echo "no GPU (fake)"; exit 0; }
[ "${1:-}" = tests/gpu/env_check.py ] && { echo "python 3.12 (fake env)"; exit "${FAKE_ENV_RC:-0}"; }
echo "$(basename "$0") $*${POLAR_SKIP_CUDA_BUILD:+ [skip cuda]}${POLAR_FORCE_CUDA_BUILD:+ [force cuda]}" >> "$FAKE_LOG"
case "${TMPDIR:-}" in "$WORK"/scratch/*) echo "$TMPDIR" >> "$FAKE_LOG.tmp"; mkdir -p "$TMPDIR/run/checkpoints" ;; esac
prev=""; for a in "$@"; do [ "$prev" = --json ] && [ -n "${FAKE_JSON:-}" ] && cp "$FAKE_JSON" "$a"; prev=$a; done
for a in "$@"; do case "$a" in run_dir=*) [ -n "${FAKE_SUMMARY:-}" ] && mkdir -p "${a#run_dir=}" \
  && cp "$FAKE_SUMMARY" "${a#run_dir=}/summary.json" ;; esac; done
[ -n "${FAKE_ORPHAN:-}" ] && { setsid sleep 120 > /dev/null 2>&1 < /dev/null & echo $! >> "$FAKE_ORPHAN"; }
[ -n "${POLAR_GPU_REPORT:-}" ] && echo "a figure measured by $(basename "$0")" >> "$POLAR_GPU_REPORT"
[ -n "${FAKE_STDOUT:-}" ] && cat "$FAKE_STDOUT"
sleep "$STAGE_SLEEP"
"""


def _run_all(tmp_path, *stages, built=True, **env):
    """run_all.sh with the stand-ins; `built`: this machine built before (its $WORK/build.log and
    cuda_build.log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(FAKE.replace("PYTHON", sys.executable))
        (bin_dir / name).chmod(0o755)
    if built:
        (tmp_path / "work").mkdir(exist_ok=True)
        (tmp_path / "work" / "build.log").write_text("an earlier call's build\n")
        (tmp_path / "work" / "cuda_build.log").write_text("an earlier call's CUDA build\n")
    (tmp_path / "wheels").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WORK": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out"),
           "FAKE_LOG": str(tmp_path / "calls.log"), "PIP_LOG": str(tmp_path / "pip.log"),
           "WHEELS_DIR": str(tmp_path / "wheels"), "SITE": str(tmp_path / "site"),
           **{k: str(v) for k, v in env.items()}}
    r = subprocess.run(["bash", str(RUN_ALL), *stages], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    calls = (tmp_path / "calls.log").read_text().splitlines() if (tmp_path / "calls.log").exists() else []
    return r, calls


def test_stages_past_the_budget_are_not_started_and_the_rerun_names_them(tmp_path):
    # the build's 6 s fit its 10 s limit; then 4 s at most are left, under the 5 s a stage needs
    r, calls = _run_all(tmp_path, built=False, BUDGET_S=10, MIN_STAGE_S=5, RESERVE_S=0, STAGE_SLEEP=6)
    assert r.returncode == 0, r.stderr
    assert calls == ["python3 setup.py build_ext --inplace [skip cuda]"], calls  # engine._C alone
    assert "| build | 0 |" in r.stdout and "| env | ok | - | python 3.12 (fake env) |" in r.stdout
    for stage in ("e2e", "fp8", "cuda", "tests", "kernels", "serve", "score", "default"):
        assert f"| {stage} | not run | - | budget spent before it |" in r.stdout
    assert "not run for lack of budget; while the machine is warm: BUDGET_S=<seconds left> bash tests/gpu/" \
           "run_all.sh e2e fp8 cuda tests kernels serve score default reward\n" in r.stdout
    # what comes back from the device: the table, and every file of the call in one archive
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["polar_gpu.tgz", "table.md"]
    assert "| build | 0 |" in (out / "table.md").read_text()
    with tarfile.open(out / "polar_gpu.tgz") as tar:
        assert {"./gpu.txt", "./commit.txt", "./build.log", "./table.md"} <= set(tar.getnames())


def test_a_stage_past_its_cap_is_cut_and_the_next_still_runs(tmp_path):
    # caps of 2 and 4 s, not 1 and 2: each stand-in must log its call inside its cap, which a loaded 2-core
    # machine missed for 1 s (test_tests_cut_at_their_limit_still_count_results_and_name_the_failures)
    r, calls = _run_all(tmp_path, "default", "tests", BUDGET_S=120, T_TESTS=2, T_DEFAULT=4, MIN_STAGE_S=1,
                        STAGE_SLEEP=6)
    assert r.returncode == 0, r.stderr
    # the script's order, not the command line's; each under its own cap
    assert [c.split()[:3] for c in calls] == [["python3", "-m", "pytest"], ["python3", "-m", "torch.distributed.run"]]
    assert "pytest tests/gpu" in calls[0], calls
    assert "train.time_limit_s=3 " in calls[1]  # three quarters of the stage's 4 s
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


def test_e2e_runs_get_three_fifths_of_the_stage(tmp_path):
    # the ~1B engine run (start, Triton compiles, 8 steps, a ~15 GB checkpoint) needs more than the
    # third it had; the 7B-shaped shape after it takes what is left
    r, calls = _run_all(tmp_path, "e2e", T_E2E=100, STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    assert calls[0].startswith("python3 benchmarks/e2e.py") and " --timeout 60 " in calls[0], calls


def test_a_fresh_machine_builds_before_a_rerun_of_later_stages(tmp_path):
    # the rerun command after the warm machine went back: no engine._C there, no $WORK either
    r, calls = _run_all(tmp_path, "tests", built=False, STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    assert calls[:2] == ["python3 setup.py build_ext --inplace [skip cuda]",
                         "python3 setup.py build_ext --inplace [force cuda]"] and "pytest tests/gpu" in calls[2], calls
    assert "| build | 0 |" in r.stdout and "| cuda | 0 |" in r.stdout
    r, calls = _run_all(tmp_path / "serve", "serve", built=False, STAGE_SLEEP=0)  # no CUDA kernels needed
    assert calls[0].endswith("[skip cuda]") and calls[1].startswith("python3 benchmarks/serve_prefix.py"), calls
    r, calls = _run_all(tmp_path / "again", "tests", built=False, AUTO_BUILD=0, STAGE_SLEEP=0)
    assert len(calls) == 1 and "pytest tests/gpu" in calls[0], calls


def test_each_stage_has_its_own_scratch_folder_removed_after_it(tmp_path):
    # a benchmark cut at its limit leaves its temporary run directories (checkpoints of gigabytes)
    r, calls = _run_all(tmp_path, "fp8", "tests", STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    work = tmp_path / "work"
    assert (tmp_path / "calls.log.tmp").read_text().split() == [str(work / "scratch" / "fp8"),
                                                                str(work / "scratch" / "tests")]
    assert not (work / "scratch" / "fp8").exists() and not (work / "scratch" / "tests").exists()
    with tarfile.open(tmp_path / "out" / "polar_gpu.tgz") as tar:
        assert not [n for n in tar.getnames() if "scratch" in n]


def _alive(pid: int) -> bool:
    try:  # a zombie is dead: its parent (a stand-in's shell) is gone, and a container's init may not reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_what_a_stage_left_running_in_its_own_session_is_killed_after_it(tmp_path):
    # torchrun's workers (start_new_session): a cut stage's kill reached torchrun, not a worker still
    # saving its checkpoint, which held the GPU through the next stage's timings
    orphans = tmp_path / "orphans"
    r, calls = _run_all(tmp_path, "fp8", "serve", T_FP8=1, MIN_STAGE_S=1, STAGE_SLEEP=2, FAKE_ORPHAN=orphans)
    pids = [int(p) for p in orphans.read_text().split()]
    try:
        assert r.returncode == 0 and len(pids) == 2, (r.stderr, pids)
        assert [pid for pid in pids if _alive(pid)] == [], r.stdout
        assert f"fp8: killing what the stage left running: {pids[0]}" in r.stdout, r.stdout
        assert "| fp8 | 124 |" in r.stdout and "| serve | 0 |" in r.stdout
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def test_the_default_run_starts_anew_on_a_rerun(tmp_path):
    old = tmp_path / "work" / "default_bf16" / "checkpoints"
    old.mkdir(parents=True)
    (old.parent / "summary.json").write_text('{"steps": 450}')
    r, calls = _run_all(tmp_path, "default", STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    assert not old.exists() and "no summary" in r.stdout  # not the earlier call's summary


E2E_JSON = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "transformers": "5.17.0", "steps": 8, "settings": [],
            "rows": [{"shape": "~1B (22 x 2048)", "trainer": "engine", "exit": 0, "wall_s": 95.0,
                      "triplets_per_step": 267.0, "triplets_per_s": 240.0, "tokens_per_s_processed": 60000.0,
                      "tokens_per_s_real": 59000.0, "tflops_per_s": 380.0, "mfu": 0.48, "loss": 0.69,
                      "step_time_s": 1.1},
                     {"shape": "~1B (22 x 2048)", "trainer": "HF sdpa", "exit": 0, "wall_s": 50.0,
                      "triplets_per_step": 267.0, "triplets_per_s": 150.0, "tokens_per_s_processed": 70000.0,
                      "tokens_per_s_real": 50000.0, "tflops_per_s": 300.0, "mfu": 0.38, "loss": 0.70,
                      "step_time_s": 1.8},
                     {"shape": "7B-shaped (4 x 4096)", "trainer": "engine", "exit": 124, "wall_s": 40.0,
                      "error": "timed out"}]}
FP8_JSON = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "steps": 200, "settings": ["train.steps=200"],
            "rows": [{"variant": "bf16", "exit": 0, "tokens_per_s": 400000.0, "steps": 200, "loss_last10": 0.5,
                      "step_time_s": 0.04, "mfu": float("nan")},
                     {"variant": "local fp8 tensorwise", "exit": 0, "tokens_per_s": 520000.0, "steps": 200,
                      "loss_last10": 0.503, "step_time_s": 0.031, "mfu": 0.41}]}


@pytest.mark.parametrize("stage", ["e2e", "fp8"])
def test_a_benchmark_cut_at_its_limit_still_has_its_table_from_its_json(tmp_path, stage):
    # e2e.py and fp8.py print their tables at the end; cut by the stage's limit (the 7B-shaped e2e
    # runs usually are), only their JSON of the runs that ended is left
    import json

    (tmp_path / "bench.json").write_text(json.dumps(E2E_JSON if stage == "e2e" else FP8_JSON))
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / f"{stage}.json").write_text('{"rows": []}')  # an earlier call's: removed first
    r, calls = _run_all(tmp_path, stage, **{f"T_{stage.upper()}": 1}, MIN_STAGE_S=1, STAGE_SLEEP=3,
                        FAKE_JSON=tmp_path / "bench.json")
    assert r.returncode == 0, r.stderr
    assert f"| {stage} | 124 |" in r.stdout
    if stage == "e2e":
        assert "| ~1B (22 x 2048) | engine | 0 | 267.0 | 240.0 |" in r.stdout and "| 48.0% |" in r.stdout
        assert "| ~1B (22 x 2048) | HF sdpa | 1.60x |" in r.stdout
        # the stage's row: the acceptance figures, per shape (the ~1B's MFU and ratio)
        assert re.search(r"^\| e2e \| 124 \| \d+ \| ~1B \(22 x 2048\): engine 240\.0 triplets/s, MFU 48\.0% "
                         r"\(datasheet -\), 1\.60x HF sdpa; 7B-shaped \(4 x 4096\) engine: exit 124 \|$",
                         r.stdout, re.M), r.stdout
        assert "| 7B-shaped (4 x 4096) | engine | 124 |" in r.stdout
    else:
        assert "| bf16 | 0 | 400,000 | 1.00x | 0.040 | - | 0.5000 | +0.00% |" in r.stdout
        assert "| local fp8 tensorwise | 0 | 520,000 | 1.30x | 0.031 | 41.0% | 0.5030 | +0.60% |" in r.stdout
        assert re.search(r"^\| fp8 \| 124 \| \d+ \| bf16 400,000 tok/s, loss 0\.5000 after 200 steps; local fp8 "
                         r"tensorwise 1\.30x, loss \+0\.60%; "
                         r"TE variants not run: transformer_engine does not import \|$",
                         r.stdout, re.M), r.stdout


def test_an_earlier_calls_json_is_not_rendered_as_this_calls(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "e2e.json").write_text(__import__("json").dumps(E2E_JSON))
    r, calls = _run_all(tmp_path, "e2e", T_E2E=1, MIN_STAGE_S=1, STAGE_SLEEP=3)
    assert r.returncode == 0, r.stderr
    assert "~1B" not in r.stdout and "(no e2e benchmark table)" in r.stdout


def test_the_acceptance_figures_come_before_the_cuda_build_and_fp8_variants_get_half_the_stage(tmp_path):
    # e2e and fp8 train with Triton and torch kernels: the CUDA kernels' build (a minute or more) waited
    # in front of them; and bf16 with one FP8 variant must both end even where a start is slow
    r, calls = _run_all(tmp_path, built=False, T_FP8=100, STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    assert [c.split()[1] for c in calls] == ["setup.py", "benchmarks/e2e.py", "benchmarks/fp8.py", "setup.py", "-m",
                                             "benchmarks/kernels.py", "benchmarks/swiglu_memory.py",
                                             "benchmarks/optimizer_step.py", "benchmarks/serve_prefix.py",
                                             "benchmarks/score_overlap.py", "-m", "benchmarks/reward_async.py"], calls
    assert calls[0].endswith("[skip cuda]") and calls[3].endswith("[force cuda]"), calls
    assert " --timeout 50 " in calls[2], calls[2]
    for stage in ("build", "e2e", "fp8", "cuda", "tests", "kernels", "serve", "score", "default", "reward"):
        assert re.search(rf"^\| {stage} \| 0 \| \d+ \| ", r.stdout, re.M), stage


def test_no_cuda_device_runs_no_stage_and_the_table_says_why(tmp_path):
    # the benchmarks would have timed their CPU versions, and tests/gpu skipped every test
    r, calls = _run_all(tmp_path, FAKE_ENV_RC=1, STAGE_SLEEP=0)
    assert r.returncode == 0 and calls == [], (r.stderr, calls)
    assert "| env | 1 | - | python 3.12 (fake env) |" in r.stdout
    assert "| gpu | - | - | nvidia-smi: no GPU (fake) |" in r.stdout  # a CPU-only torch, or no card at all
    for stage in ("build", "e2e", "fp8", "cuda", "tests", "kernels", "serve", "score", "default", "reward"):
        assert f"| {stage} | skipped | - | torch sees no CUDA device (the env row); REQUIRE_CUDA=0 runs it " \
               "anyway |" in r.stdout, stage
    r, calls = _run_all(tmp_path / "anyway", "serve", FAKE_ENV_RC=1, REQUIRE_CUDA=0, STAGE_SLEEP=0)
    assert calls[0].startswith("python3 benchmarks/serve_prefix.py") and "| serve | 0 |" in r.stdout, r.stdout


def test_settings_that_are_not_whole_numbers_are_refused_before_anything_runs(tmp_path):
    # bash's arithmetic read 'no' as a variable's name: under set -u the script ended (exit 127) on a
    # machine without a device before its table; 300s ended it at the first stage's budget
    for i, bad in enumerate(({"REQUIRE_CUDA": "no"}, {"BUDGET_S": "300s"}, {"T_TESTS": "08"})):
        r, calls = _run_all(tmp_path / str(i), FAKE_ENV_RC=1, STAGE_SLEEP=0, **bad)
        ((name, value),) = bad.items()
        assert r.returncode == 2 and calls == [], (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        assert f"{name}={value}: a whole number is expected" in r.stdout, r.stdout


def test_a_timeout_without_kill_after_still_bounds_each_stage(tmp_path):
    # busybox's timeout (some versions) refuses -k: every stage's command was refused, exit 125
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "timeout").write_text(f"""#!/usr/bin/env bash
[ "$1" = -k ] && {{ echo "timeout: unrecognized option: k" >&2; exit 125; }}
exec {shutil.which("timeout")} "$@"
""")
    (bin_dir / "timeout").chmod(0o755)
    # a 2 s cap: the stand-in, started through the wrapper, must log its call inside it
    r, calls = _run_all(tmp_path, "serve", "score", T_SERVE=2, MIN_STAGE_S=1, STAGE_SLEEP=3)
    assert r.returncode == 0, r.stderr
    assert "timeout here takes no -k" in r.stdout
    assert "| serve | 124 |" in r.stdout and "| score | 0 |" in r.stdout  # serve cut at its 2 s, as with -k
    assert [c.split()[1] for c in calls] == ["benchmarks/serve_prefix.py", "benchmarks/score_overlap.py"], calls


def test_the_skipped_rows_say_torch_does_not_import_and_a_crashed_check_decides_nothing(tmp_path):
    r, calls = _run_all(tmp_path, "serve", FAKE_ENV_RC=2, STAGE_SLEEP=0)
    assert r.returncode == 0 and calls == [], (r.stderr, calls)
    assert "| serve | skipped | - | torch does not import (the env row); REQUIRE_CUDA=0 runs it anyway |" in r.stdout
    # a crash (an optional package's import, say) tells nothing of the device: the stages run and tell
    r, calls = _run_all(tmp_path / "crash", "serve", FAKE_ENV_RC=139, STAGE_SLEEP=0)
    assert "| env | 139 |" in r.stdout and "| serve | 0 |" in r.stdout, r.stdout
    assert calls[0].startswith("python3 benchmarks/serve_prefix.py"), calls


def test_the_env_check_lists_the_packages_where_torch_does_not_import():
    # the row said only 'torch does not import': megatron-core's absence (every training stage) unsaid
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['env_check.py']; "
            "runpy.run_path('tests/gpu/env_check.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith(f"python {sys.version.split()[0]}, torch does not import: ") and \
        ", megatron-core 0.19.2, transformers " in line, line


SUMMARY = {"held_out_pair_accuracy": 0.7123, "train_pair_accuracy": 0.8, "tokens_per_second": 9000.0,
           "train_tokens_per_s": 12345.0, "mfu": 0.41, "steps": 90, "stopped_by": "time_limit"}


def test_the_default_row_gives_each_figure_its_summary_has(tmp_path):
    import json

    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    r, calls = _run_all(tmp_path, "default", STAGE_SLEEP=0, FAKE_SUMMARY=tmp_path / "summary.json")
    assert re.search(r"^\| default \| 0 \| \d+ \| held-out acc 0\.712, seen 0\.800, 12,345 tok/s training only, "
                     r"MFU 41\.0%, 90 steps, stopped by time_limit \|$", r.stdout, re.M), r.stdout
    # stopped by SIGTERM at the stage's limit: no evaluation, so no accuracies; it was 'no summary' then
    cut = {k: v for k, v in SUMMARY.items() if "accuracy" not in k} | {"stopped_by": "SIGTERM", "mfu": None,
                                                                     "train_tokens_per_s": None}
    (tmp_path / "summary.json").write_text(json.dumps(cut))
    r, calls = _run_all(tmp_path / "cut", "default", STAGE_SLEEP=0, FAKE_SUMMARY=tmp_path / "summary.json")
    assert re.search(r"^\| default \| 0 \| \d+ \| 9,000 tok/s with warm-up, evaluations and saves, 90 steps, "
                     r"stopped by SIGTERM \|$", r.stdout, re.M), r.stdout


def test_the_env_check_says_what_is_missing_here():
    r = subprocess.run([sys.executable, "tests/gpu/env_check.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == (0 if __import__("torch").cuda.is_available() else 1), r.stdout + r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith(f"python {sys.version.split()[0]}, torch ") and "megatron-core 0.19.2" in line, line
    if find_spec("transformer_engine") is None:
        assert "transformer_engine absent (fp8's TE variants not run)" in line, line


TESTS_OUTPUT = """[gw0] [  1%] PASSED tests/gpu/test_resume_gpu.py::test_bf16_resume_gives_the_uninterrupted_losses[a]
[gw1] [  2%] FAILED tests/gpu/test_kernels_gpu.py::test_readout[bf16]
[gw2] [  3%] SKIPPED tests/gpu/test_loader_gpu.py::test_read_ahead
[gw0] [  4%] PASSED tests/gpu/test_cuda_env_gpu.py::test_a_tp_run_on_this_card_gets_the_setting_it_should
"""


def test_tests_cut_at_their_limit_still_count_results_and_name_the_failures(tmp_path):
    # a 2 s limit, not 1: with 1 s the row's check failed once on a loaded 2-core machine (both test workers and
    # other processes), the stand-in's start and output having to fit inside the limit
    out = tmp_path / "tests.txt"
    out.write_text(TESTS_OUTPUT)
    r, calls = _run_all(tmp_path, "tests", T_TESTS=2, MIN_STAGE_S=1, STAGE_SLEEP=5, FAKE_STDOUT=out)
    assert " -v " in calls[0] and " -rfEs " in calls[0], calls  # a line per result as it ends
    (row,) = [ln for ln in r.stdout.splitlines() if ln.startswith("| tests |")]
    assert re.fullmatch(r"\| tests \| 124 \| \d+ \| cut at its limit: 2 passed, 1 failed, 1 skipped by then; "
                        r"last line: "
                        r"\[gw0\] .* \|", row), row
    assert "\nfailed in tests/gpu:\n- FAILED tests/gpu/test_kernels_gpu.py::test_readout[bf16]\n" in r.stdout
    # a run that ended: pytest's summary, and its short summary's skips with their reasons
    out.write_text(TESTS_OUTPUT + "SKIPPED [1] tests/gpu/test_loader_gpu.py:14: needs two GPUs\n"
                   "==== 2 passed, 1 failed, 1 skipped in 95.12s (0:01:35) ====\n")
    r, calls = _run_all(tmp_path, "tests", STAGE_SLEEP=0, FAKE_STDOUT=out)
    assert re.search(r"^\| tests \| 0 \| \d+ \| ==== 2 passed, 1 failed, 1 skipped in 95.12s \(0:01:35\) ==== \|$",
                     r.stdout, re.M), r.stdout
    assert "\nskipped in tests/gpu:\n- SKIPPED [1] tests/gpu/test_loader_gpu.py:14: needs two GPUs\n" in r.stdout


def test_the_figures_the_tests_report_are_listed_under_the_table(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "tests_measured.md").write_text("an earlier call's figure\n")
    r, calls = _run_all(tmp_path, "tests", STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    assert "--dist loadgroup" in calls[0], calls  # one test at a time, the run-bound ones first
    listed = "measured by tests/gpu:\n- a figure measured by python3\n"
    assert listed in r.stdout and listed in (tmp_path / "out" / "table.md").read_text()
    assert "earlier call" not in r.stdout
    r, calls = _run_all(tmp_path, "serve", STAGE_SLEEP=0)  # a call without the tests lists none
    assert r.returncode == 0 and "measured by tests/gpu" not in r.stdout, r.stdout


SCORE_OUTPUT = """model: 8 layers, hidden 1024, 16 heads (8 KV), ffn 2816, random weights
input: 1,200 lines, 0.3 MiB, chunks of 200; 16 CPUs

## tokenizer: byte

1. Where a chunk's time goes (one after another, the model's forward on NVIDIA H200, bf16)

| step | s | share |
|---|---:|---:|
| forward | 0.300 | 60.0% |

3. The chunk loop on the GPU: the next chunk prepared after the forward or during it, the packed batches in \
pageable or pinned host memory, against neither

| next chunk prepared | batches | loop (s) | speed-up | rows identical |
|---|---|---:|---:|---|
| during the forward | pinned | 0.400 | 1.50x | yes |

overlap on cuda (byte): prefetch 1.40x, pinned 1.05x, both 1.50x the chunk loop's speed with neither; rows \
identical: yes
"""


def test_the_score_stage_runs_the_overlap_benchmark_on_the_gpu_and_lists_its_ratios(tmp_path):
    # SCORE_OUTPUT stands for the benchmark's output on a GPU: the lines the stage reads start as it prints them
    source = (ROOT / "benchmarks" / "score_overlap.py").read_text()
    for start in ('f"\\noverlap on cuda ({name}): prefetch', 'print(f"model: {args.layers} layers',
                  'print(f"input: {args.lines:,} lines', 'print(f"\\n## tokenizer: {name}\\n\\n1. Where',
                  'print("\\n3. The chunk loop on the GPU'):
        assert start in source, start
    out = tmp_path / "score.txt"
    out.write_text(SCORE_OUTPUT)
    r, calls = _run_all(tmp_path, "score", STAGE_SLEEP=0, FAKE_STDOUT=out, SCORE_REPEATS=2)
    assert r.returncode == 0, r.stderr
    assert calls == ["python3 benchmarks/score_overlap.py --device cuda --repeats 2"], calls
    (row,) = [ln for ln in r.stdout.splitlines() if ln.startswith("| score |")]
    assert re.fullmatch(r"\| score \| 0 \| \d+ \| overlap on cuda \(byte\): prefetch 1.40x, pinned 1.05x, both 1.50x "
                        r"the chunk loop's speed with neither; rows identical: yes \|", row), row
    table = r.stdout.split(row, 1)[1]
    for line in ("model: 8 layers", "input: 1,200 lines", "## tokenizer: byte", "1. Where a chunk's time goes",
                 "| forward | 0.300 | 60.0% |", "3. The chunk loop on the GPU", "| during the forward | pinned |"):
        assert f"\n{line}" in table, line
    r, calls = _run_all(tmp_path / "cut", "score", STAGE_SLEEP=0)  # a benchmark that printed nothing
    assert re.search(r"^\| score \| 0 \| \d+ \| no ratios \|$", r.stdout, re.M), r.stdout
    assert "(no score_overlap table)" in r.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where no GPU is")
def test_the_score_benchmark_refuses_cuda_where_there_is_none():
    r = subprocess.run([sys.executable, "benchmarks/score_overlap.py", "--device", "cuda"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: --device cuda: torch finds no CUDA device here" in r.stderr
