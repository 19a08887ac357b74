"""benchmarks/reward_async.py end to end on a tiny model: a markdown table and --json rows for both paths,
score_async's forwards larger than the loop's pool has threads, to_thread's never. Time is not asserted."""
import json

import pytest

from benchmarks import reward_async as bench  # the repository root is on the path: tests/ is a package
from tests.benchmarks.benchmark_output import markdown_tables, run_benchmark, unsilenced

TINY = ["--responses", "24", "--rollouts", "4", "--threads", "2", "--repeats", "1", "--prompt", "12",
        "--reference", "12", "--rollout", "12", "--layers", "1", "--hidden", "64", "--heads", "2", "--kv-heads", "1",
        "--ffn", "128"]


def test_both_paths_score_every_response_and_only_score_async_batches_past_the_threads(tmp_path):
    out = tmp_path / "rows.json"
    proc = run_benchmark("reward_async.py", *TINY, "--json", str(out))
    (table,) = markdown_tables(proc.stdout)
    assert table[0][:2] == ["path", "responses/s"] and "max batch" in table[0]
    assert [r[0] for r in table[1:]] == ["score_async", "to_thread"]
    assert table[2][-1] == "1.00x"
    doc = json.loads(out.read_text())
    assert doc["settings"]["threads"] == 2 and doc["max_reward_difference"] <= 1e-5  # float32 on the CPU
    a, b = doc["rows"]
    assert (a["path"], b["path"]) == ("score_async", "to_thread")
    for row, cells in zip((a, b), table[1:]):
        assert sum(row["batches"]) == row["responses"] == 24  # each response scored once a run
        assert row["forwards"] == len(row["batches"]) and row["max_batch"] == max(row["batches"])
        assert cells[table[0].index("forwards a run")] == str(row["forwards"])
        assert cells[table[0].index("max batch")] == str(row["max_batch"])
    # a thread held per response until its forward returns: no forward sees more responses than threads
    assert b["max_batch"] <= 2
    # score_async holds none: the responses in flight share forwards (all 24 wait while one is scored)
    assert a["max_batch"] > 2
    assert unsilenced(proc.stderr) == [], proc.stderr[-3000:]


@pytest.mark.parametrize("args", [["--responses", "0"], ["--threads", "0"], ["--rollouts", "0"],
                                  ["--max-batch-tokens", "0"], ["--repeats", "0"]])
def test_counts_it_cannot_run_with_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exc:  # before torch is imported
        bench.main(args)
    assert exc.value.code == 2 and args[0] in capsys.readouterr().err
