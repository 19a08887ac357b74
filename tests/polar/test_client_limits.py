"""polar/client_limits.py: how far the official client's string can pass its max_length (reached and
never passed for the byte tokenizer, bounded for a BPE), the lengths a model's positions allow, and
the argument check every command shares (a max_length that leaves no prompt budget)."""
from __future__ import annotations

import numpy as np
import pytest

from polar.client_format import ScoringItem, client_encode_batch
from polar.client_limits import BYTE_OVERRUN, overrun, settle_lengths
from polar.tokenizer import ByteTokenizer, load_tokenizer

from .test_client_format import PIECES
from .test_tokenizer import train_bpe

CHARS = ["a", "é", "数", "😀", "\x80"]  # 1 to 4 bytes a character


def _byte_items():
    """Every combination of a prompt, reference and output of 1-4 byte characters, shifted by 0-3
    ASCII bytes, long enough to be cut: the cuts fall at every offset inside a character."""
    out = []
    for pc in CHARS:
        for rc in CHARS:
            for oc in CHARS:
                for shift in range(4):
                    for n in (21, 23):
                        out.append(ScoringItem("a" * shift + pc * n, "a" * (n % 4) + rc * n, "a" * shift + oc * n))
    return out


def test_the_byte_tokenizers_overrun_is_reached_and_never_passed():
    tok, items, worst = ByteTokenizer(), _byte_items(), {}
    for max_length in range(60, 68):  # every budget parity and residue modulo 4
        served = client_encode_batch(tok, items, max_length=max_length, max_response_length=20)
        worst[max_length] = max(len(s.ids) for s in served) - max_length
    assert max(worst.values()) == BYTE_OVERRUN == overrun(tok), worst


def test_a_bpe_stays_within_its_bound(tmp_path):
    tok = load_tokenizer(str(train_bpe(tmp_path)))
    rng = np.random.default_rng(0)
    pieces = PIECES + ["😀" * 5, "日本語" * 4, "é" * 7]

    def text():
        return "".join(str(rng.choice(pieces)) + str(rng.choice(["", " ", "\n"]))
                       for _ in range(int(rng.integers(1, 30))))

    worst = -1
    for max_length in range(30, 70, 3):
        items = [ScoringItem(text(), text(), text(), str(rng.choice(["sft", "pretrain"]))) for _ in range(150)]
        served = client_encode_batch(tok, items, max_length=max_length, max_response_length=(max_length - 6) // 2)
        worst = max(worst, max(len(s.ids) for s in served) - max_length)
    assert 0 < worst <= overrun(tok), (worst, overrun(tok))


def test_the_defaults_are_lowered_to_what_the_positions_hold():
    tok = ByteTokenizer()
    # the embedded model's 16384 positions: the client's default would leave items of 16386 tokens and more
    length, response, note = settle_lengths(None, None, tok, 16384)
    assert (length, response) == (16384 - BYTE_OVERRUN, 4096)
    assert note.startswith("--max-length 16369 (not the client's 16384)") and "16384 positions" in note
    assert settle_lengths(16369, None, tok, 16384) == (16369, 4096, None)
    assert settle_lengths(None, None, tok, 40000) == (16384, 4096, None)  # room to spare: the client's own
    # a model of 256 positions: the response default goes too, to leave the prompt a budget
    length, response, note = settle_lengths(None, None, tok, 256)
    assert (length, response) == (241, 117) and "--max-response-length 117 (not 4096)" in note
    # every item those lengths leave fits the positions, the worst ones included
    items = [ScoringItem("a" * s + pc * 300, rc * 300, oc * 300) for pc in CHARS for rc in CHARS for oc in CHARS
             for s in range(4)]
    assert max(len(s.ids) for s in client_encode_batch(tok, items, max_length=241, max_response_length=117)) <= 256


@pytest.mark.parametrize("given, message", [
    ((16384, None), "--max-length 16384: an item the client's truncation leaves may take up to 16399 tokens"),
    ((None, 4096), "leaves no prompt budget"),  # the lowered default with a response the user asked for
    ((100, 60), "leaves no prompt budget"),
])
def test_lengths_the_positions_cannot_hold_are_refused(given, message):
    with pytest.raises(ValueError) as e:
        settle_lengths(*given, ByteTokenizer(), 16384 if given[0] == 16384 else 256)
    assert message in str(e.value)
    if given[0] == 16384:
        assert "the largest --max-length whose items fit is 16369" in str(e.value)


def _parsers():
    from engine.evaluate import parse_args as eval_args
    from engine.score import parse_args as score_args
    from polar.format_cli import main as format_main
    from polar.serve.server import parse_args as serve_args

    io = ["--input", "i", "--output", "o"]
    return {"score": lambda a: score_args(["--checkpoint", "c", *io, *a]),
            "eval": lambda a: eval_args(["--checkpoint", "c", "--input", "i", *a]),
            "format": lambda a: format_main(["--tokenizer", "byte", *io, *a]),
            "serve": lambda a: serve_args(["--checkpoint", "c", *a])}


@pytest.mark.parametrize("command", ["score", "eval", "format", "serve"])
def test_every_command_refuses_a_max_length_that_leaves_no_prompt_budget(command, capsys):
    """`polar score --max-length 100 --max-response-length 60` exited 0, and `polar format` wrote a
    1101-token item (the client keeps the whole prompt), where `polar serve` refused them."""
    with pytest.raises(SystemExit) as e:
        _parsers()[command](["--max-length", "100", "--max-response-length", "60"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--max-length 100 leaves no prompt budget" in err, err
    # both ways out, the response first: a model of few positions may allow no larger --max-length
    assert "use --max-response-length <= 47 or --max-length >= 126" in err, err


@pytest.mark.parametrize("command", ["score", "eval", "serve"])
def test_a_max_length_given_alone_lowers_the_response_default(command):
    """`polar serve --max-length 2000` was refused ("use max_length >= 8198 or a smaller max_response")
    for the response default 4096 the user never gave."""
    _parsers()[command](["--max-length", "2000"])


@pytest.mark.parametrize("command", ["score", "eval", "serve"])
def test_a_response_without_max_length_is_left_to_the_model_positions(command, capsys):
    """`polar score --max-response-length 9000` on a 16384-position model was refused at parsing with
    "use --max-response-length <= 8189 or --max-length >= 18006", counted on the client's default
    16384, and both were then refused by the positions (which allow 16369). Not given, --max-length is
    the positions' to settle (settle_lengths); polar format, which has no model, still counts it."""
    _parsers()[command](["--max-response-length", "9000"])
    assert capsys.readouterr().err == ""


def test_a_response_that_leaves_the_default_max_length_no_budget_names_what_works():
    tok = ByteTokenizer()
    # the positions bound the max_length: only a smaller response works
    with pytest.raises(ValueError) as e:
        settle_lengths(None, 9000, tok, 16384)
    msg = str(e.value)
    assert "allow --max-length 16369 at most" in msg and msg.endswith("use --max-response-length <= 8181"), msg
    assert settle_lengths(None, 8181, tok, 16384)[:2] == (16369, 8181)
    # room to spare: 16384 is the client's default, not the positions' most, and a larger one works
    with pytest.raises(ValueError) as e:
        settle_lengths(None, 9000, tok, 40000)
    msg = str(e.value)
    assert msg.startswith("--max-length 16384 (the client's default: --max-length not given) leaves no prompt"), msg
    assert msg.endswith("use --max-response-length <= 8189 or --max-length >= 18006 (the model's positions allow "
                        "up to 39985)"), msg
    assert settle_lengths(None, 8189, tok, 40000) == (16384, 8189, None)
    assert settle_lengths(18006, 9000, tok, 40000) == (18006, 9000, None)
    # a response too long for the positions' most as well: the larger max_length comes with its response
    with pytest.raises(ValueError) as e:
        settle_lengths(None, 9000, tok, 17000)
    assert str(e.value).endswith("use --max-response-length <= 8189 (the model's positions allow --max-length up "
                                 "to 16985, and with it --max-response-length <= 8489)"), str(e.value)
    assert settle_lengths(16985, 8489, tok, 17000) == (16985, 8489, None)


def test_format_without_a_model_counts_the_budget_on_its_default_max_length(capsys):
    with pytest.raises(SystemExit) as e:
        _parsers()["format"](["--max-response-length", "9000"])
    assert e.value.code == 2
    assert "use --max-response-length <= 8189 or --max-length >= 18006" in capsys.readouterr().err


def test_format_names_the_response_that_fits_a_max_length(capsys):
    with pytest.raises(SystemExit):  # a given 4096 leaves --max-length 2000 no prompt budget
        _parsers()["format"](["--max-length", "2000", "--max-response-length", "4096"])
    assert "use --max-response-length <= 997 or --max-length >= 8198" in capsys.readouterr().err
    # not given, it is lowered to what fits, as in polar score, eval and serve (the run then stops at
    # its input, which does not exist: past the lengths' check)
    assert _parsers()["format"](["--max-length", "2000"]) == 2
    err = capsys.readouterr().err
    assert "--max-response-length 997 (the largest below 4096" in err and "--input i: no such file" in err, err


def test_the_messages_for_a_model_of_few_positions_lead_to_lengths_that_settle():
    """On a 1024-position model the messages went round: --max-length 2000 -> "the largest --max-length
    whose items fit is 1009" -> --max-length 1009 -> "use max_length >= 8198" again; the working
    answer, a smaller --max-response-length, was never given."""
    tok, positions = ByteTokenizer(), 1024  # the byte tokenizer: 1009 = 1024 - 15 fits
    with pytest.raises(ValueError, match="the largest --max-length whose items fit is 1009$"):
        settle_lengths(2000, None, tok, positions)
    length, response, note = settle_lengths(1009, None, tok, positions)  # what that message says to use
    assert (length, response) == (1009, 501) and note.startswith("--max-response-length 501 (not 4096): "), note
    assert "--max-length 1009 a prompt budget" in note
    # a response given as well: the largest max_length alone would be refused next, so both are named
    with pytest.raises(ValueError, match=r"fit is 1009 \(and with it --max-response-length <= 501, for a prompt"):
        settle_lengths(2000, 4096, tok, positions)
    # a max_length from the positions, not the user's, is not blamed on --max-length
    with pytest.raises(ValueError) as e:
        settle_lengths(None, 4096, tok, positions)
    msg = str(e.value)
    assert msg.startswith("the model's 1024 positions (max_position_embeddings) allow --max-length 1009 at most"), msg
    assert msg.endswith("use --max-response-length <= 501") and ">= 8198" not in msg, msg
    assert settle_lengths(None, 501, tok, positions) == (1009, 501, "--max-length 1009 (not the client's 16384): "
                                                                     "the model has 1024 positions "
                                                                     "(max_position_embeddings), and an item the "
                                                                     "client's truncation leaves may take 15 tokens "
                                                                     "more than --max-length (a cut inside a "
                                                                     "character)")
    # serve's own flag name where it passes it
    with pytest.raises(ValueError, match="with --max-response 4096 that leaves"):
        settle_lengths(None, 4096, tok, positions, ("--max-length", "--max-response"))
