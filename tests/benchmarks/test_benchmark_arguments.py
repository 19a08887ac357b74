"""Every benchmark script refuses counts it cannot run with a one-line usage error (exit 2), not a
traceback, a silent default, or a table of the wrong steps. Each case below was one of those."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.script_runs import run_scripts

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    ("packer.py", ["--groups", "0"]),  # IndexError
    ("packer.py", ["--groups", "100", "--capacity", "100"]),  # ValueError from the packer
    ("packer.py", ["--groups", "100", "--python-groups", "-5"]),  # a negative ratio
    ("cpu_references.py", ["--repeat", "0"]),  # inf ms, nan ratio
    ("serve_grouping.py", ["--items", "0"]),  # ZeroDivisionError
    ("serve_grouping.py", ["--prompts", "0"]),  # ZeroDivisionError
    ("serve_grouping.py", ["--repeats", "0"]),  # UnboundLocalError
    ("serve_body.py", ["--repeats", "0"]),  # IndexError
    ("shared_prefix.py", ["--k", "1"]),  # ValueError deep in the run
    ("shared_prefix.py", ["--hidden", "12"]),
    ("serve_prefix.py", ["--repeats", "0"]),  # UnboundLocalError
    ("serve_prefix.py", ["--hidden", "30", "--heads", "2"]),  # the engine's ConfigError as a traceback
    ("serve_prefix.py", ["--checkpoint", "/nonexistent/run"]),  # FileNotFoundError
    ("serve_load.py", ["--checkpoint", "/nonexistent/run"]),
    ("serve_load.py", ["--url", "http://127.0.0.1:1", "--seconds", "1"]),  # httpx.ConnectError
    ("serve_load.py", ["--url", "http://127.0.0.1:1", "--max-request", "0"]),
    ("e2e.py", ["--steps", "0"]),  # read as the default, 24
    ("e2e.py", ["--steps", "1"]),  # timed the warm-up interval
    ("e2e.py", ["--baseline-steps", "0"]),  # timed the baseline's warm-up step
    ("e2e.py", ["--micro-triplets", "-1"]),  # ZeroDivisionError
    ("e2e.py", ["--warmup", "-1"]),
    ("e2e.py", ["--shapes", "0"]),
    ("e2e.py", ["--shapes", "1,x"]),
    ("e2e.py", ["--tiny", "--shapes", "2"]),  # one shape there
    ("fp8.py", ["--steps", "0"]),
    ("fp8.py", ["--steps", "1"]),
    ("data_build.py", ["--records", "0"]),
    ("data_build.py", ["--workers", "0"]),
    ("data_build.py", ["--json-inputs", "0"]),
    ("data_build.py", ["--json-parts", "0"]),
    ("checkpoint_fsync.py", ["--repeats", "0"]),
    ("learnability.py", ["--batch", "0"]),  # a traceback in a worker process
    ("learnability.py", ["--eval-triplets", "0"]),
    ("scaling_law.py", ["--jobs", "0"]),
    ("scaling_law.py", ["--batch", "0"]),
    ("scaling_law.py", ["--tokens", "0"]),
    ("kernels_attention.py", ["--bogus"]),  # ignored: ran the benchmark
    ("dataset_read.py", ["--shards", "8", "0"]),  # each value of a list option is checked
    ("serve_grouping.py", ["--tail", "-1"]),
    ("batch_prefetch.py", ["--steps", "0"]),
    ("batch_prefetch.py", ["--compute-ms", "5", "-1"]),
    ("batch_prefetch.py", ["--global-batch", "3", "--micro-batch", "2"]),
    ("scaling_law.py", ["--seeds", "nan"]),  # not an integer
    ("swiglu_memory.py", ["--repeats", "0"]),
    ("optimizer_step.py", ["--repeats", "0"]),
    ("optimizer_step.py", ["--device", "cuda"]),  # AssertionError: Torch not compiled with CUDA enabled
    ("optimizer_step.py", ["--device", "bogus"]),  # RuntimeError from torch.device
    ("optimizer_step.py", ["--elements", "-5"]),  # ran, each tensor one element
    ("client_tokenize.py", ["--items", "0"]),
    ("encode_groups.py", ["--groups", "0"]),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's (and kernels_attention.py --help's) exit code and output, from one process that
    imports torch once (tests/benchmarks/script_runs.py); each case in a directory of its own."""
    tmp = tmp_path_factory.mktemp("usage")
    cases = []
    for i, (script, args) in enumerate(CASES):
        cwd = tmp / str(i)
        cwd.mkdir()
        if script == "scaling_law.py":
            args = [*args, "--out", str(cwd)]
        cases.append((ROOT / "benchmarks" / script, args, cwd))
    cases.append((ROOT / "benchmarks" / "kernels_attention.py", ["--help"], tmp))
    # no GPU, so that `--device cuda` is a bad argument here too
    results = run_scripts(cases, tmp, env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return results  # CASES' in their order, then the --help


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{s} {' '.join(a)}" for s, a in CASES])
def test_bad_arguments_get_a_usage_error(case, runs):
    run = runs[case]
    assert run["code"] == 2, run["stdout"][-1000:] + run["stderr"][-2000:]
    assert "Traceback" not in run["stderr"] and "error:" in run["stderr"], run["stderr"][-2000:]


def test_kernels_attention_help_does_not_run_the_benchmark(runs):
    run = runs[len(CASES)]
    assert run["code"] == 0 and run["stdout"].startswith("usage:") and "TFLOP/s" not in run["stdout"]


def test_kernels_json_is_written_without_a_gpu(tmp_path):
    """--json wrote nothing where the CPU references ran instead of the GPU sections."""
    import json

    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU path runs without a GPU")
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--only", "cpu", "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and all(r["ratio"] > 0 for r in rows)
    # each case's C++ results were compared with torch's before it was timed
    assert all(0 <= r["max_rel_diff"] <= 1e-4 for r in rows), rows


def test_shared_prefix_pairs_every_candidate_for_odd_k():
    """The duplicated layout put an odd K's last candidate alone in a group (ValueError: a group
    needs at least 2 candidates)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shared_prefix import candidate_pairs

    for k in range(2, 10):
        chunks = candidate_pairs(list(range(k)))
        assert [c for chunk in chunks for c in chunk] == list(range(k))
        assert all(2 <= len(chunk) <= 3 for chunk in chunks)


@pytest.mark.parametrize("kind,text,message", [
    (int, "0", "must be at least 1, not 0"), (int, "2.5", "'2.5' is not an integer"),
    (float, "nan", "must be at least 1, not nan"), (float, "inf", "must be finite, not inf"),
    (float, "x", "'x' is not a number")])
def test_the_shared_count_type_names_what_is_wrong(kind, text, message):
    import argparse

    from benchmarks.arguments import at_least

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        at_least(1, kind)(text)
    assert at_least(1, kind)("3") == 3 and isinstance(at_least(1, kind)("3"), kind)


def test_help_descriptions_end_where_their_sentence_does():
    # `--help` of five scripts opened with the docstring's first line (`description=__doc__.splitlines()[0]`),
    # which ended mid-sentence ("... training-loop time per step with the"); they now take its first paragraph
    import ast

    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        if "description=__doc__.splitlines()[0]" in text:
            first = ast.get_docstring(ast.parse(text), clean=False).split("\n\n")[0]
            assert "\n" not in first.strip(), f"{path.name}: --help shows only the first line of {first!r}"


def test_help_describes_every_option():
    # `--help` listed ~85 options of twenty scripts with no text (`--shards SHARDS`, `--hidden HIDDEN`),
    # and two scripts had no description; each option now says what it is and its default
    import ast

    bare = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            keywords = {k.arg for k in node.keywords}
            if node.func.attr == "add_argument" and "help" not in keywords:
                bare.append(f"{path.name}:{node.lineno} {ast.unparse(node.args[0]) if node.args else ''}")
            if node.func.attr == "ArgumentParser" and "description" not in keywords:
                bare.append(f"{path.name}:{node.lineno} ArgumentParser without a description")
    assert bare == []


def test_the_runner_exits_as_python_would(tmp_path):
    """The cases above are judged on script_runs' codes: an escaping exception is a traceback and 1,
    sys.exit("text") prints it and is 1, argparse's usage error is 2."""
    from tests.benchmarks.script_runs import run_one

    (tmp_path / "raises.py").write_text("print('partial')\nraise ValueError('boom')\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit('stopped: why')\n")
    (tmp_path / "parses.py").write_text("import argparse\nargparse.ArgumentParser().parse_args()\n")
    raised = run_one(str(tmp_path / "raises.py"), [], str(tmp_path))
    assert raised["code"] == 1 and raised["stdout"] == "partial\n" and "Traceback" in raised["stderr"]
    assert "ValueError: boom" in raised["stderr"]
    exited = run_one(str(tmp_path / "exits.py"), [], str(tmp_path))
    assert exited == {"code": 1, "stdout": "", "stderr": "stopped: why\n"}
    parsed = run_one(str(tmp_path / "parses.py"), ["--x"], str(tmp_path))
    assert parsed["code"] == 2 and "error: unrecognized arguments: --x" in parsed["stderr"]
