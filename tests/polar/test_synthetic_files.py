"""`polar data synthetic`: each kind of file is read by the tool it is for, and every line carries
what a model should prefer (which texts share the reference's policy)."""
from __future__ import annotations

import json

import pytest

from polar import synthetic_files
from polar.pretrain_data import SyntheticDataConfig, make_splits
from polar.ranked_eval import read_ranked
from polar.records import read_records
from polar.score_input import iter_score_input

SMALL = {"train_policies": 6, "held_out_policies": 4, "prompts": 30}


def write(tmp_path, kind, *extra, n=40):
    out = tmp_path / f"{kind}.jsonl"
    args = [kind, "-o", str(out), "-n", str(n), "--train-policies", "6", "--held-out-policies", "4",
            "--prompts", "30", *extra]
    assert synthetic_files.main(args) == 0
    return out, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("kind", ["triplets", "prefs"])
def test_triplets_and_preference_records_pair_the_references_policy_against_another(tmp_path, kind):
    out, lines = write(tmp_path, kind)
    records = list(read_records(str(out)))  # what polar data build and polar finetune read
    assert len(records) == len(lines) == 40 and all(r.labels == [1, 0] for r in records)
    seen = kind == "triplets"  # the policies the default run trains on (ids below train_policies)
    for line in lines:
        assert line["policy_a"] != line["policy_b"] and line["wrapper"] == "sft"
        assert all((p < 6) == seen for p in (line["policy_a"], line["policy_b"]))
        assert line["chosen"] != line["reference"]  # two draws of one policy, not a copy


def test_items_are_groups_with_one_candidate_of_the_references_policy(tmp_path):
    out, lines = write(tmp_path, "items", "--candidates", "4")
    scored = list(iter_score_input(str(out)))  # what polar score reads
    assert [s.kind for s in scored] == ["group"] * 40 and all(len(s.items) == 4 for s in scored)
    assert len(list(read_records(str(out)))) == 40  # a training record too: labels from the policies
    places = set()
    for line in lines:
        pols = [c["policy"] for c in line["candidates"]]
        assert pols.count(line["reference_policy"]) == 1 and len(set(pols)) == 4 and min(pols) >= 6
        places.add(pols.index(line["reference_policy"]))
    assert len(places) > 1  # not always first


def test_ranked_records_rank_the_references_policy_above_another_in_both_policy_sets(tmp_path):
    out, lines = write(tmp_path, "ranked")
    assert len(read_ranked(str(out))) == 40  # what polar eval reads
    for line in lines:
        r = {x["rank"]: x["policy"] for x in line["responses"]}
        assert r[1] == r[2] != r[3]
        assert line["category"] == ("seen policies" if r[1] < 6 else "held-out policies")
    assert {line["category"] for line in lines} == {"seen policies", "held-out policies"}


def test_the_same_arguments_give_the_same_lines_and_none_of_the_runs_own_triplets(tmp_path):
    _, a = write(tmp_path / "a", "triplets")
    _, b = write(tmp_path / "b", "triplets")
    _, c = write(tmp_path / "c", "triplets", "--seed", "1")
    _, d = write(tmp_path / "d", "triplets", "--part", "1", n=20)
    assert a == b and a != c
    # another part shares no draw: a held-out file beside a training file
    assert not {x["reference"] for x in a} & {x["reference"] for x in d}
    run = make_splits(SyntheticDataConfig(**SMALL, train_triplets=400, eval_triplets=10))
    assert not {(t.prompt, t.reference) for t in run.train} & {(x["prompt"], x["reference"]) for x in a}
    # the pool is the run's: its policies' ids and prompts
    assert {x["prompt"] for x in a} <= {t.prompt for t in run.train} | {t.prompt for t in run.eval_seen} | set(
        synthetic_files._pool(0, 6, 4, 30)[1])


def test_an_existing_output_is_kept_unless_forced_and_bad_options_are_named(tmp_path, capsys):
    out, first = write(tmp_path, "prefs")
    before = out.read_bytes()
    assert synthetic_files.main(["prefs", "-o", str(out), "-n", "3"]) == 2
    assert "exists; --force replaces it" in capsys.readouterr().err and out.read_bytes() == before
    assert synthetic_files.main(["prefs", "-o", str(out), "-n", "3", "--force"]) == 0
    assert len(out.read_text().splitlines()) == 3
    for args, needle in ((["-n", "0"], "--lines 0: must be >= 1"), (["--candidates", "1"], "--candidates 1"),
                         (["--held-out-policies", "1"], "--held-out-policies 1")):
        with pytest.raises(SystemExit):
            synthetic_files.main(["items", "-o", str(tmp_path / "x.jsonl"), *args])
        assert needle in capsys.readouterr().err
    # more candidates than the policies can give distinct ones
    assert synthetic_files.main(["items", "-o", str(tmp_path / "y.jsonl"), "--train-policies", "6",
                                 "--held-out-policies", "3", "--candidates", "4"]) == 2
    assert "4 distinct policies a line, but the pool has 3" in capsys.readouterr().err
    assert not (tmp_path / "y.jsonl").exists()
