import subprocess
import sys

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
