"""Fine-tuning records as a user's tools write them (polar/finetune_recipe.py reading polar/records.py's
lines): a Windows editor's file (a byte order mark, CRLF line ends, no newline after the last record,
blank lines) reads every record under the line number an editor shows, and a record cut short is
named by the column where its line ends."""
from __future__ import annotations

import json
import re

import pytest

from engine.config import ConfigError
from polar import finetune_recipe as recipe

REC = {"prompt": "p", "reference": "r", "chosen": "c", "rejected": "x"}


def test_a_windows_file_reads_every_record_at_its_editor_line(tmp_path):
    lines = [json.dumps({**REC, "prompt": f"p{i}"}) for i in range(3)]
    path = tmp_path / "prefs.jsonl"
    # line 2 blank, line 4 only spaces, line 6 the last, without its newline
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([lines[0], "", lines[1], "   ", "\t", lines[2]]).encode())
    records = recipe._read(str(path), "fail")
    assert [(r.line, r.prompt, r.candidates) for r in records] == [(1, "p0", ["c", "x"]), (3, "p1", ["c", "x"]),
                                                                  (6, "p2", ["c", "x"])]


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_a_record_cut_short_is_named_at_the_end_of_its_line(tmp_path, end):
    """A record missing its closing brace was reported "Expecting ',' delimiter at column 1": json
    counts the line's newline, and its column 1 is of the line after it. The column of the line's end
    and what it means are said now, with CRLF ends too."""
    whole = json.dumps(REC).encode()
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(whole + end + whole[:-1] + end + whole[:30] + end + whole + end)
    with pytest.raises(ConfigError) as e:
        recipe._read(str(path), "fail")
    assert f"{path}:2: (line): not valid JSON: Expecting ',' delimiter at the end of the line (column " \
           f"{len(whole)}): the record is cut short" in str(e.value), e.value
    rejects: list = []
    recipe._read(str(path), "skip", rejects)
    # line 3 ends inside a string: json calls the newline a control character
    assert [(r["line"], re.sub(r"column \d+", "column N", r["reason"])) for r in rejects] == [
        (2, "not valid JSON: Expecting ',' delimiter at the end of the line (column N): the record is cut short"),
        (3, "not valid JSON: Unterminated string at the end of the line (column N): the record is cut short")]
    assert f"(column {len(whole[:30]) + 1})" in rejects[1]["reason"]


def test_a_preference_pair_without_a_reference_is_told_what_the_reference_is(tmp_path):
    """A preference set's record (prompt, chosen, rejected: HH-RLHF's, UltraFeedback's pairs) was
    refused with "reference: missing" alone, which did not say what was to go there."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "x"}) + "\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}:1: reference: missing: POLAR scores a response against a reference response to the same "
            "prompt (paper Sec. 3), so every record gives one (of three ranked responses A > B > C: reference A, "
            "chosen B, rejected C)")):
        recipe._read(str(path), "fail")


def test_the_records_cut_to_fit_are_named_by_file_and_line(tmp_path, capsys):
    """What POLAR's rule cut (finetune.max_response, finetune.max_length), and the prompts cut further to
    fit data.seq_length, were counted only: which records trained on a part of their text was not said.
    Named after a record set aside before them (finetune.on_error=skip), each at its own line."""
    from engine.config_load import load_config
    from polar.tokenizer import load_tokenizer

    small = {"prompt": "q", "reference": "r", "chosen": "c", "rejected": "x", "wrapper": "sft"}
    lines = [small, {**small, "reference": "r" * 300, "chosen": "c" * 300, "rejected": "d" * 300},  # set aside
             {**small, "prompt": "p" * 400},  # its prompt, stored twice, cut to fit the pack
             {**small, "chosen": "c" * 400}]  # past finetune.max_response
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={path}", "data.seq_length=512",
                                                    "finetune.max_response=350", "finetune.on_error=skip",
                                                    "finetune.tokenizer=byte", f"run_dir={tmp_path / 'run'}"])
    packed = recipe._pack(cfg, load_tokenizer("byte"), recipe._read(str(path), "skip"), "train")
    assert len(packed.groups) == 3
    out = capsys.readouterr().out
    assert re.search(rf"train: truncation \(POLAR's rule\) 1 of 9 responses cut .* 0 prompts to their last tokens "
                     rf"within finetune.max_length=16384, in 1 record\(s\): {path}:4\n", out), out
    assert re.search(rf"train: 1 record\(s\) too long for data.seq_length=512 as one group kept a shorter prompt "
                     rf"\(\d+ prompt tokens beyond finetune.max_length's rule\): {path}:3\n", out), out
