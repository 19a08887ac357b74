"""engine/finetune.py's usage and errors name the command as the user called it (engine.called_as, as
engine/pretrain.py's): `polar finetune` through polar (its start-up check's `python -m engine.finetune`,
its launcher's torchrun, --print-config's process: polar says so in their environment), the path typed
where the file itself was run, `python -m engine.finetune` where the user ran that (it said `polar
finetune` either way, then `polar finetune` for any -m and the file's base name)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.called_as import COMMAND_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_called_from_another_program_it_names_the_way_to_run_it(capsys, monkeypatch):
    """Not polar (which never runs it in its own process) nor the file: the module run with -m."""
    from engine.finetune import main

    monkeypatch.delenv(COMMAND_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    err = capsys.readouterr().err
    prog = f"{Path(sys.orig_argv[0]).name} -m engine.finetune"
    assert e.value.code == 2 and err.startswith(f"usage: {prog} [-h]"), err
    assert f"\n{prog}: error: unrecognized arguments: --bogus" in err, err


@pytest.mark.parametrize("command, prog", [
    (["-m", "polar.cli", "finetune"], "polar finetune"),
    (["-m", "polar.cli", "finetune", "--print-config"], "polar finetune"),  # one process, no check first
    (["engine/finetune.py"], "engine/finetune.py"),
    (["-m", "engine.finetune"], f"{Path(sys.executable).name} -m engine.finetune"),
], ids=["polar", "polar-print-config", "file", "module"])
def test_run_itself_it_is_named_as_called(command, prog):
    env = {k: v for k, v in __import__("os").environ.items() if k != COMMAND_ENV}
    proc = subprocess.run([sys.executable, *command, "--bogus"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(f"usage: {prog} [-h]"), proc.stderr[-2000:]
    assert f"\n{prog}: error: unrecognized arguments: --bogus" in proc.stderr, proc.stderr[-2000:]
