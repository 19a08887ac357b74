"""tests/gpu/run_all.sh's carried wheels (tests/gpu/fetch_wheels.sh brings them): only what the GPU image lacks is
installed, the newest of each that fits its python, and a wheel that cannot be installed is a row of the table, not
the end of the device call (run_all.sh with stand-ins for python3 and nvidia-smi: tests/test_gpu_run_all.py)."""
import os
import re
import sys

import pytest

from tests.test_gpu_run_all import GPU, _run_all


def _wheel(folder, name):
    (folder / name).write_bytes(b"")


HERE = f"cp{sys.version_info.major}{sys.version_info.minor}"  # this python's wheel tag


def test_carried_wheels_only_what_the_image_lacks_newest_of_each_that_fits_this_python(tmp_path):
    # fetch_wheels.sh brings compiled wheels for more than one python: the GPU image's is not known here
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in (f"megatron_core-0.19.2-{HERE}-{HERE}-manylinux2014_x86_64.whl",  # present here: installed anyway
                 "megatron_core-0.19.2-cp399-cp399-manylinux2014_x86_64.whl",  # another python's
                 "megatron_core-0.20.0-cp399-cp399-manylinux2014_x86_64.whl",  # newer, but not for this python
                 "pybind11-3.0.1-py3-none-any.whl", "pybind11-3.1.0-py3-none-any.whl",  # present here: kept
                 "polar_absent_pkg-1.9.0-py3-none-any.whl", "polar_absent_pkg-1.10.0-py3-none-any.whl"):
        _wheel(wheels, name)
    r, calls = _run_all(tmp_path, "serve", STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    (pip,) = (tmp_path / "pip.log").read_text().splitlines()
    assert f"--target {tmp_path / 'site'} " in pip
    installed = sorted(os.path.basename(w) for w in pip.split() if w.endswith(".whl"))
    assert installed == [f"megatron_core-0.19.2-{HERE}-{HERE}-manylinux2014_x86_64.whl",
                         "polar_absent_pkg-1.10.0-py3-none-any.whl"], pip
    assert "kept the image's pybind11" in r.stderr
    assert "| install |" not in r.stdout


@pytest.mark.parametrize("other, said", [
    # pip refused the whole batch for one wheel of another python, installing none of the others
    ("polar_compiled_pkg-2.0.0-cp399-cp399-manylinux2014_x86_64.whl",
     f"failed: polar-compiled-pkg: no carried wheel for this python ({HERE}-{HERE}-"),
    # the choice's parse of its name raised, and no wheel was installed at all (megatron-core neither)
    ("polar_absent_pkg (copy).whl", "failed: polar_absent_pkg (copy).whl: not a wheel's file name")])
def test_a_wheel_not_installed_is_a_row_and_the_others_still_are(tmp_path, other, said):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "polar_absent_pkg-1.0.0-py3-none-any.whl")
    _wheel(wheels, other)
    r, calls = _run_all(tmp_path, "serve", STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    (pip,) = (tmp_path / "pip.log").read_text().splitlines()
    installed = [os.path.basename(w) for w in pip.split() if w.endswith(".whl")]
    assert installed == ["polar_absent_pkg-1.0.0-py3-none-any.whl"], pip
    (row,) = [ln for ln in r.stdout.splitlines() if ln.startswith("| install |")]
    assert said in row and other in row and "| serve | 0 |" in r.stdout, row


def test_a_failed_install_is_a_row_not_the_end_of_the_call(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "polar_absent_pkg-1.0.0-py3-none-any.whl")
    r, calls = _run_all(tmp_path, "serve", PIP_RC=1, STAGE_SLEEP=0)
    assert r.returncode == 0, r.stderr
    assert "| install | failed" in r.stdout and "| serve | 0 |" in r.stdout
    assert calls[0].startswith("python3 benchmarks/serve_prefix.py"), calls
    assert (tmp_path / "out" / "table.md").exists()


def test_fetch_wheels_pins_each_wheel_for_each_python_and_empties_the_folder_first():
    text = (GPU / "fetch_wheels.sh").read_text()
    line = text.replace("\\\n", " ").split("pip download", 1)[1].splitlines()[0]
    names = line.split("-d .whl", 1)[1].split()
    assert "megatron-core==0.19.2" in names and all("==" in w for w in names), names
    assert "--python-version \"$py\"" in line and re.search(r'for py in \$\{PYTHONS:-3\.12 3\.13\}', text), line
    assert "rm -f .whl/*.whl" in text.split("pip download", 1)[0]
