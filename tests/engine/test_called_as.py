"""engine.called_as: the entry scripts' usage and errors name the program as the user called it. polar
says where it runs an entry (polar.launch passes the name to its in-process --nproc 1 run, and sets
engine.called_as.COMMAND_ENV for torchrun's workers); otherwise the path typed, or `python -m engine.X`.
`python -m engine.score` was told `polar score` (any -m run was taken for polar's), engine/score.py
run as a file was named `score.py`, and engine/evaluate.py said `polar eval` however it was run, its
errors `error:`. engine/pretrain.py and engine/finetune.py: test_pretrain_cli, test_finetune_cli."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.called_as import COMMAND_ENV

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable).name
ENTRIES = {"score": ("engine/score.py", "engine.score", ["--output", "out.jsonl"]),
           "eval": ("engine/evaluate.py", "engine.evaluate", [])}


def _ways(tool: str) -> list:
    """(command after the interpreter, the program name expected) for each way to run the tool."""
    path, module, _ = ENTRIES[tool]
    ways = [(["-m", "polar.cli", tool], f"polar {tool}"),  # in polar's process (--nproc 1)
            ([path], path),
            (["-m", module], f"{PYTHON} -m {module}")]
    if tool == "eval":  # torchrun's workers (the environment polar.launch gives them: one tool shows it)
        ways.append((["-m", "polar.cli", tool, "--nproc", "2"], f"polar {tool}"))
    return ways


@pytest.mark.parametrize("tool, command, prog", [(t, *w) for t in ENTRIES for w in _ways(t)],
                         ids=[f"{t}-{i}" for t in ENTRIES for i in ("polar", "file", "module", "polar-torchrun")
                              if i != "polar-torchrun" or t == "eval"])
def test_usage_and_errors_name_the_program_as_called(tmp_path, tool, command, prog):
    env = {k: v for k, v in os.environ.items() if k != COMMAND_ENV}  # no launcher of ours above this one
    given = ["--checkpoint", str(tmp_path / "none"), "--input", str(tmp_path / "in.jsonl"), *ENTRIES[tool][2]]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *command, *given, *extra], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=300)

    bad = run("--bogus")
    assert bad.returncode != 0 and f"usage: {prog} [-h]" in bad.stderr, bad.stderr[-3000:]
    assert f"\n{prog}: error: unrecognized arguments: --bogus\n" in bad.stderr, bad.stderr[-3000:]
    if "--nproc" in command:  # the workers' error, as the others'; torchrun's report around it
        return
    missing = run()
    assert missing.returncode == 2 and missing.stderr == f"{prog}: --checkpoint {tmp_path / 'none'}: no such " \
        "directory\n", missing.stderr[-3000:]


def test_another_program_calling_an_entry_is_told_how_to_run_it(capsys, monkeypatch):
    """Called from another program's process (neither polar nor the file run itself), the entry names
    the way to run it, not the program calling it (argparse's default) nor polar."""
    from engine.evaluate import main

    monkeypatch.delenv(COMMAND_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2 and f"\n{PYTHON} -m engine.evaluate: error: " in capsys.readouterr().err
    monkeypatch.setenv(COMMAND_ENV, "polar eval")  # as polar's launch sets it for the processes it starts
    with pytest.raises(SystemExit):
        main(["--bogus"])
    assert "\npolar eval: error: " in capsys.readouterr().err
