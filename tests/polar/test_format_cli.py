import json

import pytest

from polar import cli
from polar.client_format import client_encode
from polar.format_cli import main
from polar.tokenizer import ByteTokenizer

from .test_tokenizer import train_bpe

ITEMS = [
    {"prompt": "Why?", "reference": "Because.", "output": "No idea.", "wrapper": "sft"},
    {"prompt": [{"role": "user", "content": "hi"}, {"role": "user", "content": "日本😀"}],
     "reference": [{"role": "assistant", "content": "hello <|reward|>"}], "output": "",
     "wrapper": "pretrain", "id": 7},
    {"prompt": "", "reference": "r", "output": "[UNUSED_TOKEN_130]x"},
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_each_line_gets_the_client_string_and_ids(tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [json.dumps(x, ensure_ascii=False) for x in ITEMS])
    out = tmp_path / "out" / "o.jsonl"
    assert cli.main(["format", "--tokenizer", "byte", "--input", inp, "--output", str(out),
                     "--max-length", "40", "--max-response-length", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(ITEMS)
    for item, row in zip(ITEMS, rows):
        want = client_encode(ByteTokenizer(), item["prompt"], item["reference"], item["output"],
                             item.get("wrapper", "sft"), max_length=40, max_response_length=6)
        assert row == {"text": want.text, "ids": want.ids.tolist()}
    assert rows[2]["text"] == "\nr<|reward|>\nx[UNUSED_TOKEN_130]"  # an empty prompt and output are scored


def test_an_output_naming_the_input_is_refused(tmp_path, capsys):
    """The ids replaced the texts they came from (the output is renamed over its path at the end)."""
    inp = write_lines(tmp_path / "in.jsonl", [json.dumps(ITEMS[0])])
    same = str(tmp_path / "." / "in.jsonl")  # another spelling of the same path
    assert cli.main(["format", "--tokenizer", "byte", "--input", inp, "--output", same]) == 2
    assert "is the --input file" in capsys.readouterr().err
    assert json.loads((tmp_path / "in.jsonl").read_text()) == ITEMS[0]


def test_hf_tokenizer_directory(tmp_path):
    d = train_bpe(tmp_path / "bpe")
    inp = write_lines(tmp_path / "in.jsonl", [json.dumps(x) for x in ITEMS])
    out = tmp_path / "o.jsonl"
    assert main(["--tokenizer", d, "--input", inp, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["text"] == "Why?\nBecause.<|reward|>Why?\nNo idea.[UNUSED_TOKEN_130]"
    assert len(rows) == 3 and all(isinstance(i, int) for r in rows for i in r["ids"])


def test_bad_lines_are_all_reported_and_nothing_is_written(tmp_path, capsys):
    lines = [json.dumps(ITEMS[0]),
             json.dumps({"prompt": "p", "reference": "r"}),
             "{not json",
             "",
             json.dumps({"prompt": "p", "reference": 3, "output": "o"}),
             json.dumps({"prompt": [{"role": "u"}], "reference": "r", "output": "o"}),
             json.dumps({"prompt": "p", "reference": "r", "output": "o", "wrapper": "chat"}),
             json.dumps(["a list"])]
    inp = write_lines(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "o.jsonl"
    assert main(["--tokenizer", "byte", "--input", inp, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    for expected in [f"{inp}:2: output: missing", f"{inp}:3: (line): not valid JSON",
                     f"{inp}:4: (line): blank line", f"{inp}:5: reference: must be a string",
                     f"{inp}:6: prompt[0].content: missing", f"{inp}:7: wrapper: must be one of",
                     f"{inp}:8: (record): must be a JSON object", "7 bad line(s)"]:
        assert expected in err
    assert f"{inp}:1:" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.jsonl"]


def test_an_empty_reference_is_a_bad_line_as_every_reward_path_has_it(tmp_path, capsys):
    """`polar score`, `polar serve` and polar.reward refuse an item whose reference is empty or only
    whitespace (POLAR compares the output with it, paper Sec. 3); `polar format` wrote its string and
    ids, the text of a request no server would score."""
    blank_messages = [{"role": "assistant", "content": ""}, {"role": "assistant", "content": " "}]
    lines = [json.dumps(ITEMS[0]),
             json.dumps({"prompt": "p", "reference": "", "output": "o"}),
             json.dumps({"prompt": "p", "reference": " \n\t", "output": "o"}),
             json.dumps(ITEMS[2]),
             json.dumps({"prompt": "p", "reference": blank_messages, "output": "o"})]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "o.jsonl"
    assert main(["--tokenizer", "byte", "--input", inp, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    for expected in [f"{inp}:2: reference: the reference is empty: POLAR scores an output against",
                     f"{inp}:3: reference: the reference is empty (only whitespace)",
                     f"{inp}:5: reference: the reference is empty (only whitespace)",
                     "polar format: 3 bad line(s); nothing written"]:
        assert expected in err, err
    assert f"{inp}:1:" not in err and f"{inp}:4:" not in err
    assert not out.exists()


def test_invalid_utf8_line(tmp_path, capsys):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"prompt": "\xff", "reference": "r", "output": "o"}\n')
    assert main(["--tokenizer", "byte", "--input", str(p), "--output", str(tmp_path / "o")]) == 2
    assert f"{p}:1: (line): invalid UTF-8" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--tokenizer", "byte", "--input", "x", "--output", "y", "--max-length", "-1"])
    assert main(["--tokenizer", "byte", "--input", str(tmp_path / "nope"), "--output", "y"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--tokenizer", "byte", "--input", str(tmp_path), "--output", "y"]) == 2
    assert f"--input {tmp_path}: a directory, not a file" in capsys.readouterr().err
    p = write_lines(tmp_path / "in.jsonl", [json.dumps(ITEMS[0])])
    assert main(["--tokenizer", str(tmp_path / "no_tok"), "--input", p, "--output",
                 str(tmp_path / "o")]) == 2
    assert "no_tok" in capsys.readouterr().err


def test_lines_that_would_raise_are_reported_not_raised(tmp_path, capsys):
    # json.loads raises ValueError (not JSONDecodeError) for an integer past Python's digit limit and
    # RecursionError for deep nesting; "\\ud800" is a legal JSON escape but no character, which reached
    # the tokenizer as a UnicodeEncodeError; a key given twice was kept last-wins without a word
    lines = [json.dumps(ITEMS[0]),
             '{"prompt": "a", "reference": "b", "output": "c", "x": ' + "1" * 5000 + "}",
             '{"prompt": "a", "reference": "b", "output": "c", "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
             '{"prompt": "p", "reference": "r", "output": "o\\ud800"}',
             '{"prompt": [{"content": "\\udc80"}], "reference": "r", "output": "o"}',
             '{"prompt": "p", "reference": "r", "output": "o", "output": "x"}']
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "o.jsonl"
    assert main(["--tokenizer", "byte", "--input", inp, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: (line): JSON that cannot be read" in err
    assert f"{inp}:3: (line): JSON nested too deeply" in err
    assert f"{inp}:4: output: lone surrogate U+D800 at character 1" in err
    assert f"{inp}:5: prompt[0].content: lone surrogate U+DC80" in err
    assert f"{inp}:6: output: given twice in one object" in err
    assert "5 bad line(s)" in err and not out.exists()


def test_output_gets_the_mode_of_any_new_file(tmp_path):
    # the output was written through mkstemp, whose 0600 mode os.replace kept: unreadable to the group
    import os

    inp = write_lines(tmp_path / "in.jsonl", [json.dumps(ITEMS[0])])
    out = tmp_path / "o.jsonl"
    old = os.umask(0o022)
    try:
        assert main(["--tokenizer", "byte", "--input", inp, "--output", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_a_lowered_max_length_lowers_the_default_response_length_as_score_and_serve_do(tmp_path, capsys):
    """--max-length 4000 alone: polar score, eval and serve take max_response_length min(4096, (4000 - 6) // 2)
    = 1997 (polar.client_limits.fitting_response); polar format kept 4096 and refused the pair."""
    item = {"prompt": "p" * 30, "reference": "r" * 2500, "output": "o" * 2500}
    inp = write_lines(tmp_path / "in.jsonl", [json.dumps(item)])
    out = tmp_path / "o.jsonl"
    assert cli.main(["format", "--tokenizer", "byte", "--input", inp, "--output", str(out),
                     "--max-length", "4000"]) == 0
    assert "--max-response-length 1997" in capsys.readouterr().err
    want = client_encode(ByteTokenizer(), item["prompt"], item["reference"], item["output"], "sft",
                         max_length=4000, max_response_length=1997)
    assert json.loads(out.read_text(encoding="utf-8")) == {"text": want.text, "ids": want.ids.tolist()}


def test_a_compressed_or_piped_input_is_refused_by_name(tmp_path, capsys):
    """A gzip input ended in a traceback (exit 1), and a pipe (`--input <(zcat ...)`) was said to be
    no such file."""
    import gzip
    import os

    gz = tmp_path / "in.jsonl"
    gz.write_bytes(gzip.compress((json.dumps(ITEMS[0]) + "\n").encode()))
    out = tmp_path / "o.jsonl"
    assert main(["--tokenizer", "byte", "--input", str(gz), "--output", str(out)]) == 2
    assert f"{gz}:1: (file): gzip-compressed, not JSONL text: decompress it first" in capsys.readouterr().err
    assert not out.exists() and os.listdir(tmp_path) == ["in.jsonl"]  # nor a temporary file
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(["--tokenizer", "byte", "--input", str(fifo), "--output", str(out)]) == 2
    assert f"--input {fifo}: not a regular file (a pipe or a device)" in capsys.readouterr().err
