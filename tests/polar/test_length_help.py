"""The --max-response-length help of the commands that settle the client's lengths (polar score, eval,
serve) states the rule polar/client_limits.py applies: it said the default 4096 was lowered only
"where the default --max-length is lowered below 8198", while a --max-length given below 8198 lowers
it too (--max-length 4000: 1997, said at start-up)."""
from __future__ import annotations

import argparse
import importlib
import itertools
import re

import pytest

from polar.client_limits import settle_lengths, usage_check
from polar.tokenizer import ByteTokenizer

COMMANDS = [("engine.score", "--max-response-length"), ("engine.evaluate", "--max-response-length"),
            ("polar.serve.server", "--max-response")]
RULE = re.compile(r"default: min\((\d+), \(L - (\d+)\) // (\d+)\) for the --max-length L in use, given or its default")


def option_help(module: str, flag: str, capsys) -> str:
    """The help of `flag` in the module's `--help`, its lines joined."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).parse_args(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag))
    block = [lines[start], *itertools.takewhile(lambda s: not s.startswith("  -"), lines[start + 1:])]
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize("module, flag", COMMANDS)
def test_the_help_states_the_response_length_each_max_length_gets(module, flag, capsys):
    found = RULE.search(option_help(module, flag, capsys))
    assert found, option_help(module, flag, capsys)
    cap, minus, over = (int(g) for g in found.groups())

    def stated(length: int) -> int:
        return min(cap, (length - minus) // over)

    tok, positions = ByteTokenizer(), 1 << 20  # positions that lower no --max-length
    for length in (4000, 8197, 8198, 16384, 50000):  # given
        assert settle_lengths(length, None, tok, positions)[1] == stated(length), length
    # not given: the default 16384, or what a model of 4000 positions allows (3985 with the byte tokenizer)
    for model_positions in (positions, 4000):
        length, response, _ = settle_lengths(None, None, tok, model_positions)
        assert response == stated(length), (model_positions, length, response)
    # and the argument check takes the same default: --max-length 4000 alone is no usage error
    usage_check(argparse.ArgumentParser(), 4000, None)
