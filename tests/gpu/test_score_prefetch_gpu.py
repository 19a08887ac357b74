"""polar score on a CUDA GPU: the next chunk read, tokenized and packed on a second thread while the device
scores this one (the default), and each chunk prepared only after the one before it is scored
(--no-prefetch), give the same rows byte for byte. On CPU (tests/engine/test_score_chunks.py) the thread
is checked to overlap the forward and the rows to match at DP 1 and 2; here the forward is bf16 kernels
launched on the device while the thread works, over 25 chunks. One GPU: DP 1 only."""
import json

from tests.engine import test_score_chunks as chunks

checkpoint = chunks.checkpoint  # its small model, made and saved on this machine's GPU


def test_rows_are_the_same_bytes_with_and_without_the_preparing_thread(tmp_path, checkpoint):
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps(x) for x in chunks._lines(198)]
    lines[100:100] = ["not json", json.dumps(dict(chunks.SHORT, output="y" * 400))]  # a bad line, one too long
    inp.write_text("\n".join(lines) + "\n")
    summaries = []
    for name, extra in (("ahead", []), ("serial", ["--no-prefetch"])):
        proc = chunks._run(chunks._cmd(checkpoint, inp, tmp_path / f"{name}.jsonl", "--chunk-lines", "8",
                                       "--seq-length", "256", "--on-error", "skip", *extra), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries += [x.rsplit("; ", 2)[0] for x in proc.stdout.splitlines() if x.startswith("scored ")]
    assert (tmp_path / "ahead.jsonl").read_bytes() == (tmp_path / "serial.jsonl").read_bytes()
    rows = chunks._rows(tmp_path / "ahead.jsonl")
    assert [r["line"] for r in rows] == list(range(1, 201)) and "error" in rows[100] and "error" in rows[101]
    assert len({tuple(r["rewards"]) for r in rows if "rewards" in r}) > 100  # the rewards differ between lines
    assert len(summaries) == 2 and summaries[0] == summaries[1], summaries
