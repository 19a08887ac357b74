import subprocess
import sys

import pytest

from polar import cli


def test_env_reports_versions(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "megatron-core" in out and "engine._C" in out


def test_pretrain_passes_settings_to_the_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "polar.cli", "pretrain", "--nproc", "1", "--print-config", "train.lr=0.5"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lr: 0.5" in proc.stdout


@pytest.mark.parametrize("argv, usage", [
    (["sample", "--help"], "usage: polar sample"),
    (["data", "build", "--help"], "usage: polar data build"),
    (["data", "stats", "--help"], "usage: polar data stats"),
    (["format", "--help"], "usage: polar format"),
    (["hparams", "--help"], "usage: polar hparams"),
])
def test_tool_subcommands_reach_their_own_parsers(capsys, argv, usage):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(usage)


def test_data_without_a_tool_lists_the_tools(capsys):
    assert cli.main(["data"]) == 2
    err = capsys.readouterr().err
    assert "polar data build" in err and "polar data stats" in err
