"""polar.records: both record shapes parse; every bad record is named by file, line and field."""
from __future__ import annotations

import base64
import json
import shutil

import pytest

from polar.records import RecordError, parse_line, read_records

MSG = [{"role": "user", "content": "hi"}, {"role": "user", "content": "there"}]


def line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def test_official_record_with_strings_and_message_lists():
    rec = parse_line(line({"prompt": MSG, "reference": "r", "chosen": [{"content": "c"}], "rejected": "x",
                           "wrapper": "pretrain"}), "f.jsonl", 3)
    assert rec.prompt == MSG and rec.reference == "r" and rec.candidates == [[{"content": "c"}], "x"]
    assert rec.labels == [1, 0] and rec.wrapper == "pretrain" and (rec.file, rec.line) == ("f.jsonl", 3)


def test_grouped_record_labels_from_policies_and_explicit_labels():
    rec = parse_line(line({
        "prompt": "p", "reference": "r", "reference_policy": "a", "sampled_at": "2025-01-01",
        "candidates": [{"text": "1", "policy": "b"}, {"text": "2", "policy": "a", "temperature": 1.0},
                       {"text": "3", "label": 0, "policy": "a"}, {"text": "4", "label": 1}],
    }), "f", 1)
    assert rec.labels == [0, 1, 0, 1]  # an explicit label wins over the policy
    assert rec.wrapper is None and rec.extra == {"sampled_at": "2025-01-01"}


def test_blank_lines_are_not_records():
    assert parse_line(b"  \n", "f", 1) is None


GOOD = {"prompt": "p", "reference": "r", "chosen": "c", "rejected": "x"}


@pytest.mark.parametrize("raw,field,reason", [
    (b"{not json\n", "(line)", "not valid JSON"),
    # Python's json words, reworded for a reader of the file: "Invalid control character at at column 14",
    # "Unexpected UTF-8 BOM (decode using utf-8-sig)", and a file of "\r"-ended lines read as one line
    (line(GOOD).replace(b'"p"', b'"p\x0cq"'), "(line)", "not valid JSON: Invalid control character at column 14"),
    (b"\xef\xbb\xbf" + line(GOOD), "(line)", "a UTF-8 byte order mark opens this line; one is skipped only at"),
    (line(GOOD)[:-1] + b"\r" + line(GOOD), "(line)", "after a carriage return (\\r): lines must end in \\n or"),
    (b'{"prompt": "\xff\xfe"}\n', "(line)", "invalid UTF-8 at byte 12"),
    (line([1, 2]), "(record)", "must be a JSON object"),
    (line({k: v for k, v in GOOD.items() if k != "prompt"}), "prompt", "missing"),
    (line({**GOOD, "reference": 5}), "reference", "must be a string or a list of messages, got int"),
    (line({**GOOD, "chosen": ""}), "chosen", "empty text"),
    # every pair is judged against the reference (paper Sec. 3): one of only whitespace was built into a shard
    (line({**GOOD, "reference": ""}), "reference", "the reference is empty: POLAR scores"),
    (line({**GOOD, "reference": "  "}), "reference", "the reference is empty (only whitespace)"),
    (line({**GOOD, "reference": [{"content": "\t"}]}), "reference", "(only whitespace)"),
    (line({**GOOD, "rejected": []}), "rejected", "empty text"),
    (line({**GOOD, "prompt": [{"role": "user"}]}), "prompt[0].content", "missing"),
    (line({**GOOD, "prompt": [{"content": None}]}), "prompt[0].content", "must be a string"),
    (line({**GOOD, "prompt": ["hi"]}), "prompt[0]", "a message must be an object"),
    (line({k: v for k, v in GOOD.items() if k != "rejected"}), "rejected",
     "missing: a record with chosen needs rejected too (the pair), or gives candidates instead"),
    (line({k: v for k, v in GOOD.items() if k != "chosen"}), "chosen", "missing: a record with rejected needs chosen"),
    (line({"prompt": "p", "reference": "r"}), "candidates", "missing"),
    # a misspelt field is named: other keys are metadata, so it was reported only as missing
    (line({**{k: v for k, v in GOOD.items() if k != "rejected"}, "rejectd": "x"}), "rejected",
     "or gives candidates instead; 'rejectd' given: is it 'rejected'?"),
    (line({**{k: v for k, v in GOOD.items() if k != "reference"}, "referenc": "r"}), "reference",
     "missing; 'referenc' given: is it 'reference'?"),
    (line({"prompt": "p", "reference": "r", "candidate": [{"text": "a", "label": 1}]}), "candidates",
     "missing (or chosen and rejected); 'candidate' given: is it 'candidates'?"),
    (line({**GOOD, "wrapper": "chat"}), "wrapper", "must be one of sft, pretrain"),
    (line({**GOOD, "candidates": []}), "candidates", "not both"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}]}), "candidates", "at least 2"),
    (line({"prompt": "p", "reference": "r", "candidates": "ab"}), "candidates", "must be a list"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}, {"text": "b", "label": 1}]}),
     "candidates", "no negative candidate"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 0}, {"text": "b", "label": 0}]}),
     "candidates", "no positive candidate"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}, {"text": "b", "label": 2}]}),
     "candidates[1].label", "must be 0 or 1"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}, {"text": "b", "label": True}]}),
     "candidates[1].label", "must be 0 or 1"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}, {"text": ""}]}),
     "candidates[1].text", "empty text"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}, {"text": "b"}]}),
     "candidates[1]", "needs a label"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}, {"text": "b", "policy": 3}]}),
     "reference_policy", "missing"),
    (line({"prompt": "p", "reference": "r", "reference_policy": 1,
           "candidates": [{"text": "a", "label": 1}, {"text": "b", "policy": [3]}]}),
     "candidates[1].policy", "a policy id must be"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}, "b"]}),
     "candidates[1]", "must be an object"),
    # legal JSON escapes that are no character: no tokenizer can encode them
    (line({**GOOD, "chosen": "fi\udc80ne"}), "chosen", "lone surrogate U+DC80 at character 2"),
    (line({**GOOD, "prompt": [{"content": "ok"}, {"content": "x\ud800"}]}), "prompt[1].content",
     "lone surrogate U+D800 at character 1"),
    (line({"prompt": "p", "reference": "r", "candidates": [{"text": "a", "label": 1}, {"text": "\udfff", "label": 0}]}),
     "candidates[1].text", "lone surrogate U+DFFF at character 0"),
    (line({**GOOD, "prompt": None}), "prompt", "missing (or null)"),
    # a key twice in one object: JSON readers keep the last and drop the other text without a word
    (line(GOOD)[:-2] + b', "chosen": "other"}\n', "chosen", "given twice in one object"),
    (line({**GOOD, "prompt": [{"role": "user", "content": "a"}]}).replace(b'"content": "a"', b'"content": "a", '
                                                                           b'"content": "b"'),
     "content", "given twice in one object"),
    # JSON that json.loads refuses with other errors than JSONDecodeError
    (b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", "(line)", "nested too deeply"),
    (line(GOOD)[:-2] + b', "score": ' + b"9" * 5000 + b"}\n", "(line)", "digits"),
])
def test_bad_records_name_file_line_and_field(raw, field, reason):
    with pytest.raises(RecordError) as exc:
        parse_line(raw, "data/x.jsonl", 17)
    e = exc.value
    assert (e.file, e.line, e.field) == ("data/x.jsonl", 17, field)
    assert reason in e.reason
    assert str(e).startswith(f"data/x.jsonl:17: {field}: ")


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(lines))
    return str(path)


def test_read_records_fail_stops_at_the_first_bad_line(tmp_path):
    p = write_lines(tmp_path / "r.jsonl", [line(GOOD), line(GOOD), line({**GOOD, "chosen": 1}), b"{bad\n"])
    got = []
    with pytest.raises(RecordError, match=r"r\.jsonl:3: chosen: "):
        for rec in read_records(p):
            got.append(rec)
    assert len(got) == 2


def test_read_records_skip_keeps_every_reject_whole(tmp_path):
    bad_utf8 = b'{"prompt": "caf\xe9"}\n'
    p = write_lines(tmp_path / "r.jsonl", [line(GOOD), bad_utf8, b"\n", line({**GOOD, "chosen": ""}), line(GOOD)])
    rejects = []
    recs = list(read_records(p, on_error="skip", rejects=rejects))
    assert [r.line for r in recs] == [1, 5]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "(line)"), (4, "chosen")]
    assert base64.b64decode(rejects[0]["raw_base64"]) == bad_utf8.rstrip(b"\n")  # nothing lost
    assert json.loads(rejects[1]["raw"]) == {**GOOD, "chosen": ""}
    assert all(r["file"] == p for r in rejects)
    with pytest.raises(ValueError, match="on_error"):
        list(read_records(p, on_error="ignore"))


def test_a_surrogate_pair_is_one_character():
    rec = parse_line(b'{"prompt": "\\ud83d\\ude00", "reference": "r", "chosen": "c", "rejected": "x"}', "f", 1)
    assert rec.prompt == "\U0001F600"


def test_skip_without_a_rejects_list_is_refused_before_any_record_is_dropped(tmp_path):
    """Skipping with nowhere to put the rejects dropped every bad record without a word."""
    p = write_lines(tmp_path / "r.jsonl", [line(GOOD), b"{bad\n", line(GOOD)])
    got = read_records(p, on_error="skip")
    assert next(got).line == 1
    with pytest.raises(ValueError, match="needs a `rejects` list"):
        next(got)


def test_unreadable_json_is_a_named_reject_under_skip(tmp_path):
    deep = b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}\n"
    p = write_lines(tmp_path / "r.jsonl", [line(GOOD), deep, line({**GOOD, "chosen": "\ud800"}), line(GOOD)])
    rejects = []
    assert [r.line for r in read_records(p, on_error="skip", rejects=rejects)] == [1, 4]
    assert [(r["file"], r["line"], r["field"]) for r in rejects] == [(p, 2, "(line)"), (p, 3, "chosen")]
    assert rejects[0]["raw"].encode() + b"\n" == deep


def test_record_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(RecordError("f", 2, "prompt", "missing")))
    assert (e.file, e.line, e.field, str(e)) == ("f", 2, "prompt", "f:2: prompt: missing")


def test_a_bom_opening_the_file_is_not_part_of_line_1(tmp_path):
    p = write_lines(tmp_path / "r.jsonl", [b"\xef\xbb\xbf" + line(GOOD), b"\xef\xbb\xbf" + line(GOOD)])
    rejects = []
    assert [r.line for r in read_records(p, on_error="skip", rejects=rejects)] == [1]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "(line)")]  # elsewhere it is no BOM


@pytest.mark.parametrize("encoding, named", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16LE"),
                                             ("utf-16-be", "UTF-16BE"), ("utf-32", "UTF-32"),
                                             ("utf-32-le", "UTF-32LE"), ("utf-32-be", "UTF-32BE")])
def test_utf16_or_utf32_text_is_one_error_naming_its_conversion(tmp_path, encoding, named):
    """A file of UTF-16 (PowerShell 5's `>`) or UTF-32 text was read as UTF-8: every line a reject of its
    own ("invalid UTF-8", "not valid JSON"), one line more than the file had. It is one error for the file,
    naming the encoding and an iconv command whose output reads."""
    import shutil
    import subprocess

    p = tmp_path / "r.jsonl"
    p.write_text((json.dumps(GOOD) + "\n") * 3, encoding=encoding)
    with pytest.raises(RecordError, match=rf"^{p}:1: \(file\): {named} text, not UTF-8 JSONL text: convert it "
                                          rf"first \(iconv -f {named} -t UTF-8 {p} > {tmp_path}/r\.utf8\.jsonl\)$"):
        list(read_records(str(p), on_error="skip", rejects=[]))
    if shutil.which("iconv"):
        subprocess.run(f"iconv -f {named} -t UTF-8 {p} > {tmp_path}/r.utf8.jsonl", shell=True, check=True)
        assert len(list(read_records(str(tmp_path / "r.utf8.jsonl")))) == 3


@pytest.mark.skipif(not (shutil.which("iconv") and shutil.which("gunzip")), reason="runs the named commands")
def test_the_command_named_for_a_file_runs_where_its_path_has_a_space_or_a_quote(tmp_path):
    """The iconv (and gunzip) command of the message is one to paste: a path with a space or a quote
    split into other words in a shell, so it converted nothing."""
    import gzip
    import re
    import subprocess

    d = tmp_path / "my data's"
    d.mkdir()
    wide, packed = d / "r 1.jsonl", d / "r 2.jsonl.gz"
    wide.write_text((json.dumps(GOOD) + "\n") * 3, encoding="utf-16")
    packed.write_bytes(gzip.compress((json.dumps(GOOD) + "\n").encode()))
    for p, out in ((wide, d / "r 1.utf8.jsonl"), (packed, d / "r 2.jsonl")):
        with pytest.raises(RecordError) as e:
            list(read_records(str(p)))
        command = re.search(r"first \((.*)\)$", str(e.value)).group(1)
        subprocess.run(command, shell=True, check=True, cwd=tmp_path)
        assert len(list(read_records(str(out)))) == (3 if p == wide else 1)


def test_text_opening_with_nul_free_ascii_or_a_utf8_bom_is_read_as_utf8(tmp_path):
    p = write_lines(tmp_path / "r.jsonl", [b"\xef\xbb\xbf" + line(GOOD), b"\n", line(GOOD)])
    assert [r.line for r in read_records(p)] == [1, 3]
    assert [r.line for r in read_records(write_lines(tmp_path / "s.jsonl", [b"\n", line(GOOD)]))] == [2]


def test_a_pipe_or_a_directory_is_one_error_naming_it(tmp_path):
    """Every reader of JSONL lines (finetune, score, eval, format) stopped with a traceback on a pipe
    (`--input <(zcat r.jsonl.gz)`: "File or stream is not seekable") or a directory (IsADirectoryError)."""
    import os

    r, w = os.pipe()
    os.write(w, line(GOOD))
    os.close(w)
    try:
        with pytest.raises(RecordError, match=r"^/dev/fd/\d+:1: \(file\): not a regular file \(a pipe or a device\)"):
            list(read_records(f"/dev/fd/{r}", on_error="skip", rejects=[]))
    finally:
        os.close(r)
    with pytest.raises(RecordError, match=rf"^{tmp_path}:1: \(file\): a directory, not a file$"):
        list(read_records(str(tmp_path), on_error="skip", rejects=[]))
