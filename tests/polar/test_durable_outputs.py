"""The small files polar's tools publish whole (written beside, renamed over) are on the disk
before the rename names them, and their directory after it: after a crash of the machine a rename
that reached the disk (on Lustre or NFS at once) named an empty or short file."""
from __future__ import annotations

import json
import os

from polar import format_cli, synthetic_files
from polar.checkpoint_tokenizer import save_beside
from polar.sample_output import check_settings
from polar.score_output import RowWriter, partial_paths
from tests.engine.durable_record import published_durably, record


def test_polar_samples_settings_record(tmp_path, monkeypatch):
    calls = record(monkeypatch.setattr)
    path = str(tmp_path / "out.jsonl.run.json")
    check_settings(path, {"n": 4}, allow_changed=False)
    published_durably(calls, path)
    assert json.load(open(path)) == {"n": 4} and os.listdir(tmp_path) == ["out.jsonl.run.json"]


def test_polar_scores_record_before_any_row_and_its_rename_before_the_record_goes(tmp_path, monkeypatch):
    """Rows are fsynced as they are written: a record not on the disk left rows a rerun refuses
    (no record beside them), as did a removal of the record that reached the disk before the
    rename of the rows to the output."""
    calls = record(monkeypatch.setattr)
    out = str(tmp_path / "out.jsonl")
    partial, settings = partial_paths(out)
    w = RowWriter(out, {"max_length": 8})
    published_durably(calls, settings)
    w.write([{"line": 1, "rewards": [0.5]}])
    w.finish()
    renamed = calls.index(("replace", os.path.realpath(partial), os.path.realpath(out)))
    assert ("fsync", os.path.realpath(tmp_path)) in calls[renamed + 1:]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_polar_data_synthetic_output(tmp_path, monkeypatch):
    calls = record(monkeypatch.setattr)
    out = tmp_path / "t.jsonl"
    assert synthetic_files.main(["triplets", "-o", str(out), "-n", "3", "--train-policies", "6",
                                 "--held-out-policies", "4", "--prompts", "30"]) == 0
    published_durably(calls, out)
    assert len(out.read_text().splitlines()) == 3 and os.listdir(tmp_path) == ["t.jsonl"]


def test_the_tokenizer_saved_beside_the_checkpoints(tmp_path, monkeypatch):
    src = tmp_path / "bpe"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"marker": 1}')
    (src / "polar_tokenizer.json").write_text('{"reward_token": "<r>"}')
    calls = record(monkeypatch.setattr)
    save_beside(str(tmp_path / "ckpt"), str(src))
    got = tmp_path / "ckpt" / "tokenizer"
    for name in ("tokenizer.json", "polar_tokenizer.json"):
        published_durably(calls, got / name)
        assert (got / name).read_bytes() == (src / name).read_bytes()
    assert sorted(os.listdir(got)) == ["polar_tokenizer.json", "tokenizer.json"]


def test_polar_formats_output_and_nothing_left_when_lines_are_bad(tmp_path, monkeypatch):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "Why?", "reference": "Because.", "output": "No."}) + "\n")
    out = tmp_path / "out" / "o.jsonl"
    calls = record(monkeypatch.setattr)
    assert format_cli.main(["--tokenizer", "byte", "--input", str(inp), "--output", str(out)]) == 0
    published_durably(calls, out)
    assert len(out.read_text().splitlines()) == 1 and os.listdir(out.parent) == ["o.jsonl"]
    inp.write_text("not json\n")
    assert format_cli.main(["--tokenizer", "byte", "--input", str(inp), "--output", str(tmp_path / "b.jsonl")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]
