"""engine.cli_types.ArgumentParser: the parser every polar tool and entry script builds, refusing an unknown
option with the one nearest it, as `polar pretrain --confg x` is refused."""
import pytest

from engine.cli_types import ArgumentParser


def _refusal(capsys, argv: list[str]) -> str:
    ap = ArgumentParser(prog="tool")
    ap.add_argument("--seq-length", type=int)
    ap.add_argument("--output")
    ap.add_argument("inputs", nargs="*")
    with pytest.raises(SystemExit) as exc:
        ap.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_unknown_option_is_named_with_the_one_meant(capsys):
    # argparse said `unrecognized arguments: --seq-lenght 5`, leaving the reader to find the typo
    assert _refusal(capsys, ["a.jsonl", "--seq-lenght", "5"]) == (
        "tool: error: unrecognized arguments: --seq-lenght (did you mean --seq-length?) 5")
    assert _refusal(capsys, ["--outptu=x"]) == (
        "tool: error: unrecognized arguments: --outptu=x (did you mean --output?)")
    # nothing near: the word alone, as before
    assert _refusal(capsys, ["--zzz"]) == "tool: error: unrecognized arguments: --zzz"


def test_known_options_parse_as_argparse_parses_them():
    ap = ArgumentParser(prog="tool")
    ap.add_argument("--seq-length", type=int)
    ap.add_argument("inputs", nargs="*")
    args = ap.parse_args(["a", "b", "--seq-len", "7"])  # an unambiguous beginning still parses (allow_abbrev)
    assert args.seq_length == 7 and args.inputs == ["a", "b"]
