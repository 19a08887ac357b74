"""The package as a user gets it: sdist and wheel of the repository, installed into a throw-away venv and run
from a directory outside the source tree, so nothing may read files the wheel does not carry.

Slow (one full compile of the C++ extension, then a two-step torchrun): marked `slow`, and part of the
default `pytest tests` all the same; `-m "not slow"` leaves it out.

The new venv has no pip packages of its own: a .pth file names the site-packages of the interpreter
running the tests, so torch, megatron-core and numpy import from there. A plain path line in a .pth adds
that folder to sys.path without executing the .pth files inside it, so an editable install of this
repository there stays inactive; the tests check that `engine` and `polar` load from the new venv.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What a clean clone lacks: in-place builds and caches must not leak into the wheel.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "runs", "*.egg-info",
                                     "__pycache__", "*.so", ".pytest_cache", ".whl", ".gl")
# The embedded default (preset tiny_cpu) cut to seconds: 2 steps of 2 packed sequences, little data.
TWO_STEPS = ["train.steps=2", "train.global_batch=2", "train.warmup_steps=1", "log.interval=1",
             "synthetic.train_triplets=32", "synthetic.eval_triplets=8", "synthetic.prompts=20"]


def _check(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _dependency_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(wheel, venv bin folder, environment, a working directory outside the repository)."""
    work = tmp_path_factory.mktemp("package")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(POLAR_SKIP_CUDA_BUILD="1", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    # As a release is built: an sdist of a clean copy, then the wheel from that sdist, so a file
    # missing from the sdist (MANIFEST.in) fails here too.
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    _check([sys.executable, "-c", "import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))", work / "sdist"], cwd=src, env=env, timeout=300)
    (sdist,) = (work / "sdist").glob("polar_rm-*.tar.gz")
    _check([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
            "-w", work / "dist", sdist], cwd=work, env=env, timeout=900)
    (wheel,) = (work / "dist").glob("polar_rm-*.whl")

    venv = work / "venv"
    # the dependencies' .pth is written after the install, so pip never sees the editable polar-rm there
    _check([sys.executable, "-m", "venv", "--without-pip", venv], env=env, timeout=120)
    py = venv / "bin" / "python"
    _check([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel],
           cwd=work, env=env, timeout=300)
    purelib = _check([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env=env, timeout=60).stdout.strip()
    Path(purelib, "_polar_test_dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")

    cwd = work / "elsewhere"
    cwd.mkdir()
    return wheel, venv / "bin", env, cwd


def test_wheel_carries_the_extension_and_the_presets(package):
    wheel = package[0]
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("engine/_C.") and n.endswith(".so") for n in names), names
    for preset in ("tiny_cpu", "polar_1_8b", "polar_7b"):
        assert f"polar/configs/{preset}.yaml" in names
    assert "engine/pretrain.py" in names and "polar/cli.py" in names
    # only the two packages and the metadata: no tests, benchmarks or loose top-level modules
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"engine", "polar"}


def test_installed_modules_come_from_the_venv(package):
    _, bin_dir, env, cwd = package
    code = ("import engine, engine._C, engine.pretrain, polar, polar.presets as p; "
            "print(engine.__file__); print(engine._C.__file__); print(polar.__file__); "
            "print(p.resolve_config('polar_7b'))")
    out = _check([bin_dir / "python", "-c", code], cwd=cwd, env=env, timeout=120).stdout.split()
    venv = str(bin_dir.parent)
    assert len(out) == 4 and all(line.startswith(venv) for line in out), out


def test_polar_pretrain_help_outside_the_repository(package):
    _, bin_dir, env, cwd = package
    out = _check([bin_dir / "polar", "pretrain", "--help"], cwd=cwd, env=env, timeout=120).stdout
    assert out.startswith("usage: polar pretrain") and "--nproc" in out and "polar_7b" in out


def test_presets_by_name_outside_the_repository(package):
    _, bin_dir, env, cwd = package
    # --print-config stops before any process group exists: no torchrun needed
    out = _check([bin_dir / "python", "-m", "engine.pretrain", "--config", "polar_7b", "--print-config"],
                 cwd=cwd, env=env, timeout=120).stdout
    assert re.search(r"^  hidden_size: 4096$", out, re.M) and re.search(r"^  lr: 1.67e-05$", out, re.M), out


def test_two_step_run_outside_the_repository(package):
    _, bin_dir, env, cwd = package
    run_dir = cwd / "run"
    _check([bin_dir / "polar", "pretrain", "--nproc", "1", *TWO_STEPS, f"run_dir={run_dir}"],
           cwd=cwd, env=env, timeout=600)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert 0.0 <= summary["held_out_pair_accuracy"] <= 1.0
    # the default config is the shipped tiny_cpu preset, not the engine's built-in defaults
    assert re.search(r"^  hidden_size: 64$", (run_dir / "config.yaml").read_text(), re.M)
