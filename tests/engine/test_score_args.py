"""`polar score`'s arguments (engine/score.py): a count it cannot run with is argparse's usage error
(exit 2, naming the option), not a traceback after the model is loaded (--max-length -1) or a
ZeroDivisionError at start-up (--tp 0)."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("args", [["--max-length", "-1"], ["--max-response-length", "-5"], ["--seq-length", "-1"],
                                  ["--tp", "0"], ["--pp", "0"], ["--nproc", "0"], ["--chunk-lines", "-1"],
                                  ["--tp", "x"]])
def test_a_count_it_cannot_run_with_is_an_argument_error(args, capsys):
    from engine.score import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {args[0]}: " in err, err
    assert "must be at least" in err or "invalid int value: 'x'" in err


def test_the_defaults_and_zeroes_that_mean_a_default_pass():
    from engine.score import parse_args

    a = parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--seq-length", "0", "--chunk-lines", "0"])
    # the client's lengths: its 16384 and 4096, or less where the model's positions need it (settled once read)
    assert (a.max_length, a.max_response_length, a.tp, a.pp, a.nproc, a.chunk_lines) == (None, None, 1, 1, 1, 0)


def test_an_error_is_led_by_the_command_as_the_user_called_it(tmp_path, capsys):
    """Its errors began `error:` where every polar command names itself (`polar data stats: ...`);
    run as the file itself (python or torchrun engine/score.py) they name the file, as its usage does."""
    import subprocess
    import sys
    from pathlib import Path

    from engine.score import main

    (tmp_path / "in.jsonl").write_text('{"prompt": "p", "reference": "r", "output": "o"}\n')
    args = ["--checkpoint", str(tmp_path / "x"), "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out.jsonl")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"polar score: --checkpoint {tmp_path / 'x'}: no such directory\n", err
    script = Path(__file__).resolve().parents[2] / "engine" / "score.py"
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == f"score.py: --checkpoint {tmp_path / 'x'}: no such directory\n", \
        proc.stderr[-2000:]
