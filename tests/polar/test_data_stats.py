"""polar data stats: exact length statistics from per-shard length counts, the same with the
shards shared out to worker processes, and a damaged shard named from a worker."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.data import PackedGroups
from polar import data_stats
from tests.engine.test_indexed_dataset import SEQ, random_groups, write
from tests.engine.test_indexed_dataset_checks import poke
from tests.polar import test_data_build as built


@pytest.mark.parametrize("lengths", [[5], [3, 3, 3], [0, 7], list(range(1, 101)),
                                     np.random.default_rng(0).integers(0, 300, 1001).tolist(),
                                     np.random.default_rng(1).geometric(0.01, 5000).clip(0, 4096).tolist()])
def test_length_summary_equals_numpy_on_the_lengths(lengths):
    a = np.array(lengths, np.int64)
    s = data_stats.length_summary(np.bincount(a, minlength=4097))
    assert s["mean"] == pytest.approx(a.mean(), rel=1e-12)
    assert s["p50"] == pytest.approx(np.percentile(a, 50), rel=1e-12)
    assert s["p99"] == pytest.approx(np.percentile(a, 99), rel=1e-12)
    assert s["max"] == a.max()


def test_length_summary_is_numpys_to_the_last_bit():
    # what the statistics printed before (numpy over every length), not merely close: a p99 between
    # two lengths is interpolated as numpy does, from the nearer one
    rng = np.random.default_rng(3)
    for n in [1, 2, 42, 101, 165, 218, 354, 1000]:
        for top in [1, 100, 5000, 100_000]:
            a = rng.integers(0, top + 1, n)
            s = data_stats.length_summary(np.bincount(a))
            assert (s["mean"], s["p50"], s["p99"], s["max"]) == (
                float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99)), int(a.max())), (n, top)


def test_length_summary_of_no_lengths():
    assert data_stats.length_summary(np.zeros(65, np.int64)) == {"mean": 0.0, "p50": 0.0, "p99": 0.0, "max": 0}


@pytest.mark.parametrize("top", [64, 100])
def test_log2_histogram_bins_as_the_lengths_fall(top):
    lengths = np.random.default_rng(2).integers(0, top + 1, 500)
    edges, counts = data_stats.log2_histogram(np.bincount(lengths, minlength=top + 1), top)
    assert edges[-1] >= top and list(edges[:3]) == [0, 1, 2]
    expected = np.bincount(np.searchsorted(edges, lengths, side="right") - 1, minlength=len(edges))
    np.testing.assert_array_equal(counts, expected)


@pytest.fixture
def dataset(tmp_path):
    for k in range(3):
        write(tmp_path / "ds" / f"s-{k}", PackedGroups(random_groups(300 + k, 40 + 20 * k), SEQ))
    return tmp_path / "ds"


def test_workers_give_the_same_statistics(dataset):
    one = data_stats.compute(str(dataset), workers=1)
    assert data_stats.compute(str(dataset), workers=2) == one
    lengths = PackedGroups([g for k in range(3) for g in random_groups(300 + k, 40 + 20 * k)], SEQ)
    group = np.array([len(g) for g in lengths.groups])
    assert one["groups"] == len(group) and one["lengths"]["group"]["max"] == group.max()
    assert one["lengths"]["group"]["p50"] == pytest.approx(np.percentile(group, 50))


def test_a_damaged_shard_is_named_from_a_worker(dataset, capsys):
    poke(dataset / "s-1", 2, 5, 10**9)  # a piece offset far past the token file
    assert data_stats.main([str(dataset), "--workers", "2"]) == 2
    # named by the command, as every polar command's error is (it said `error: ...`)
    assert capsys.readouterr().err.startswith(f"polar data stats: {dataset / 's-1.idx'}: ")


def test_workers_below_1_are_refused(dataset, capsys):
    with pytest.raises(SystemExit) as e:
        data_stats.main([str(dataset), "--workers", "0"])
    assert e.value.code == 2 and "--workers must be at least 1" in capsys.readouterr().err


def test_stats_report_counts_packing_and_prefix_savings(tmp_path, capsys):
    records = built.synthetic_records(120)  # as tests/polar/test_data_build.py builds them
    src = built.write_jsonl(tmp_path / "r.jsonl", records)
    built.build(src, "-o", tmp_path / "ds", "--seq-length", built.SEQ)
    capsys.readouterr()
    assert data_stats.main([str(tmp_path / "ds"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    groups = [built.expected_group(r)[0] for r in records]
    real = sum(len(g.prefix) + sum(map(len, g.candidates)) for g in groups)
    saved = sum(len(g.prefix) * (len(g.candidates) - 1) for g in groups)
    assert (s["records"], s["groups"], s["candidates"], s["tokens"]) == (120, 120, 2 * 96 + 3 * 24, real)
    assert s["shared_prefix"]["tokens_saved"] == saved
    assert s["shared_prefix"]["percent_saved"] == pytest.approx(100 * saved / (real + saved))
    assert s["packing_efficiency"] == pytest.approx(real / (s["sequences"] * built.SEQ))
    for name, total in (("prefix", 120), ("candidate", s["candidates"]), ("group", 120)):
        assert sum(s["histogram"][name]) == total, name
    starts = s["histogram"]["bin_start"]
    longest = max(len(g.prefix) + sum(map(len, g.candidates)) for g in groups)
    top_bin = max(i for i, c in enumerate(s["histogram"]["group"]) if c)
    assert starts[top_bin] <= longest < starts[top_bin + 1]
    assert s["truncation"] == {"responses_cut": 0, "prompts_cut": 0, "prompts_shortened": 0}
    assert data_stats.main([str(tmp_path / "ds")]) == 0
    text = capsys.readouterr().out
    assert "packing efficiency" in text and "shared prefixes save" in text and "prefixes" in text
    # what polar hparams --dataset divides the paper's batch (in candidates) by
    assert f"candidates per packed sequence {(2 * 96 + 3 * 24) / s['sequences']:.2f} " in text


def test_stats_sum_what_the_builds_truncated_over_the_shards(tmp_path, dataset, capsys):
    long = {"prompt": "q" * 50, "reference": "r" * 30, "chosen": "c" * 10, "rejected": "x" * 40}
    src = built.write_jsonl(tmp_path / "r.jsonl", [long, {**long, "prompt": "q"}, long])
    for k in range(2):  # each shard cuts its own records' responses and prompts
        built.build(src, "-o", tmp_path / "cut", "--seq-length", 256, "--max-length", 100, "--max-response", 20,
                    "--num-shards", 2, "--shard-index", k, "--chunk-records", 1)
    capsys.readouterr()
    s = data_stats.compute(str(tmp_path / "cut"))
    assert s["groups"] == 3 and s["truncation"] == {"responses_cut": 6, "prompts_cut": 2, "prompts_shortened": 0}
    assert "  truncation 6 responses cut to their head (max_response), 2 prompts to their tail (max_length); 0 " \
           "prompts shortened further to fit the pack" in data_stats.format_text(s)
    # lines 1 and 3 are one record: a build counts a repeat within a shard only, and stats sums the shards'
    assert s["duplicates"] == 0 and "repeat an earlier record" not in data_stats.format_text(s)
    built.build(src, "-o", tmp_path / "one", "--seq-length", 256, "--max-length", 100, "--max-response", 20)
    capsys.readouterr()
    s = data_stats.compute(str(tmp_path / "one"))
    assert s["duplicates"] == 1
    assert "  records 3 (1 repeat an earlier record of their shard) | groups 3 |" in data_stats.format_text(s)
    # shards written without the counts (the fixture's, as by a build before them): unknown, not 0
    s = data_stats.compute(str(dataset))
    assert s["truncation"] == {"responses_cut": None, "prompts_cut": None, "prompts_shortened": None}
    assert "truncation not counted by the build that wrote a shard" in data_stats.format_text(s)
