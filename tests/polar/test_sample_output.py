"""polar sample's output and its settings record (polar/sample_output.py): the ids a restart finds done,
and the record a restart compares its settings with."""
import json
import re

import pytest

from polar import sample
from polar.prompt_sources import SampleError
from polar.sample_output import check_settings, read_done_ids


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b"\xff\xfe{}"])
def test_a_settings_record_that_is_no_json_object_is_named(tmp_path, content):
    path = tmp_path / "out.jsonl.run.json"
    path.write_bytes(content)  # a list was an AttributeError traceback, bytes that are no UTF-8 a UnicodeDecodeError
    with pytest.raises(SampleError, match=f"{path}: not a settings record \\(a JSON object\\); delete it"):
        check_settings(str(path), {"seed": 0}, allow_changed=False)


def test_read_done_ids_cuts_a_torn_line_and_rejects_duplicates(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 0}\n{"id": 2}\n{"id": 3, "pro')
    assert read_done_ids(str(out)) == {0, 2}
    assert out.read_text() == '{"id": 0}\n{"id": 2}\n'
    assert "incomplete" in capsys.readouterr().err
    out.write_text('{"id": 0}\n{"id": 0}\n')
    with pytest.raises(sample.SampleError, match="o.jsonl:2: id 0 repeats line 1"):
        read_done_ids(str(out))
    out.write_text('{"id": 0}\nnot json\n')
    with pytest.raises(sample.SampleError, match="o.jsonl:2: not a record"):
        read_done_ids(str(out))


def test_read_done_ids_streams_the_output(tmp_path):
    import tracemalloc

    out = tmp_path / "o.jsonl"
    pad = "x" * 100_000
    with open(out, "w") as f:
        f.writelines(json.dumps({"id": i, "text": pad}) + "\n" for i in range(300))
        f.write('{"id": 300, "te')
    tracemalloc.start()
    try:
        assert read_done_ids(str(out)) == set(range(300))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, f"{peak} bytes held for a {out.stat().st_size}-byte output"
    assert out.read_bytes().endswith(b'"}\n') and read_done_ids(str(out)) == set(range(300))


def test_reading_back_a_long_runs_output_reports_progress(tmp_path):
    """A restart read an output of ~100 GB (~10 KB a record) for minutes without a line."""
    out = tmp_path / "o.jsonl"
    with open(out, "w") as f:  # lines of 1 KiB, 3 MiB
        f.writelines(json.dumps({"id": i, "text": "x" * (1023 - len(json.dumps({"id": i, "text": ""})))}) + "\n"
                     for i in range(3 * 1024))
    shown = []
    assert read_done_ids(str(out), shown.append, 0) == set(range(3 * 1024))  # every look at the clock
    line = re.compile(rf"reading {re.escape(str(out))}: (\d)/3 MiB \| \S+ MiB/s( \| eta \d+m\d\ds)?")
    assert [int(line.fullmatch(s).group(1)) for s in shown] == [1, 2, 3], shown  # at lines 1024, 2048, 3072
    assert all(" | eta " in s for s in shown)


def test_input_files_are_known_by_name_size_and_content_fingerprint(tmp_path):
    """Two prompt files of the same name and size, one at another path (a restart on another node), are the
    same input only if their content fingerprints match; a record without fingerprints (an older polar) has
    nothing to compare."""
    path = str(tmp_path / "out.jsonl.run.json")
    record = {"seed": 0, "corpus": ["/a/c.txt", "/a/d.txt"], "corpus_bytes": [10, 20],
              "corpus_sample_sha256": ["11", "22"], "instruction_prompts": ["/a/i.jsonl"], "instruction_bytes": [5],
              "instruction_sample_sha256": ["55"]}
    check_settings(path, record, allow_changed=False)
    moved = {**record, "corpus": ["/b/c.txt", "/b/d.txt"], "instruction_prompts": ["/b/i.jsonl"]}
    lines = []
    check_settings(path, moved, allow_changed=False, log=lines.append)
    assert lines == ["--corpus read from /b/c.txt, /b/d.txt (the output was written from /a/c.txt, /a/d.txt): the "
                     "same file names, sizes and content, taken as the same files; --instruction-prompts read from "
                     "/b/i.jsonl (the output was written from /a/i.jsonl): the same file names, sizes and content, "
                     "taken as the same files"]
    other = {**record, "corpus_sample_sha256": ["11", "23"], "instruction_sample_sha256": ["56"]}
    lines = []
    with pytest.raises(SampleError) as e:
        check_settings(path, {**other, "instruction_prompts": ["/b/i.jsonl"]}, allow_changed=False, log=lines.append)
    assert ("other settings (corpus: d.txt: the same name and size as the file the output was written from, but its "
            "content differs (another sampled fingerprint: regenerated, or another dataset's file); "
            "instruction_prompts: i.jsonl: the same name and size") in str(e.value), e.value
    assert lines == []  # not "taken as the same files"
    # a size changed too is said by the sizes alone
    with pytest.raises(SampleError, match=re.escape("(corpus_bytes: [10, 20] -> [10, 21]); use another")):
        check_settings(path, {**other, "corpus_bytes": [10, 21], "instruction_sample_sha256": ["55"]}, False)
    check_settings(path, other, allow_changed=True)
    assert json.load(open(path)) == other
    older = {k: v for k, v in record.items() if not k.endswith("_sample_sha256")}
    with open(path, "w") as f:
        json.dump(older, f)
    lines = []
    check_settings(path, {**other, "corpus": ["/b/c.txt", "/b/d.txt"]}, allow_changed=False, log=lines.append)
    assert lines == ["--corpus read from /b/c.txt, /b/d.txt (the output was written from /a/c.txt, /a/d.txt): the "
                     "same file names, taken as the same files"]
