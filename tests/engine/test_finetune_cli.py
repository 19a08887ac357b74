"""engine/finetune.py's usage and errors name the command as the user called it, as engine/pretrain.py's
do (engine.pretrain.invoked_as): `polar finetune` through polar (its command line, its start-up check's
`python -m engine.finetune`, its launcher's `torchrun -m engine.finetune`), the path typed where the file
itself was run, `python -m engine.finetune` where the user ran that (it said `polar finetune` either way,
then `polar finetune` for any -m and the file's base name)."""
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


@pytest.mark.parametrize("command, prog", [
    (["-m", "polar.cli", "finetune"], "polar finetune"),
    (["engine/finetune.py"], "engine/finetune.py"),
    (["-m", "engine.finetune"], f"{Path(sys.executable).name} -m engine.finetune"),
], ids=["polar", "file", "module"])
def test_run_itself_it_is_named_as_called(command, prog):
    proc = subprocess.run([sys.executable, *command, "--bogus"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(f"usage: {prog} [-h]"), proc.stderr[-2000:]
    assert f"\n{prog}: error: unrecognized arguments: --bogus" in proc.stderr, proc.stderr[-2000:]
