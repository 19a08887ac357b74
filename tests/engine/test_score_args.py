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
