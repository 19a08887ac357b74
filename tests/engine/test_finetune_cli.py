"""engine/finetune.py's usage and errors name the command as the user called it: `polar finetune`
through polar (its command line, or its launcher's `torchrun -m engine.finetune`), the file's name
where the file itself was run, as engine/pretrain.py's do (it said `polar finetune` either way)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_through_polar_it_is_polar_finetune(capsys):
    from engine.finetune import main

    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: polar finetune [-h]"), err
    assert "\npolar finetune: error: unrecognized arguments: --bogus" in err, err


def test_run_as_a_file_it_is_the_files_name():
    proc = subprocess.run([sys.executable, str(ROOT / "engine" / "finetune.py"), "--bogus"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: finetune.py [-h]"), proc.stderr[-2000:]
    assert "\nfinetune.py: error: unrecognized arguments: --bogus" in proc.stderr, proc.stderr[-2000:]
