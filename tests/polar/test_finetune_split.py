"""polar/finetune_split.py: whole prompts are held out, a held-out file's overlap with the training
file is found, records repeating another within one side are found, and a pair of equal texts is found."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.config_load import load_config
from polar import finetune_recipe as recipe
from polar import build_repeats
from polar.finetune_split import (SPLIT_RULE, held_out_count, legacy_held_out_count, overlap, prompt_ids, repeats,
                                  repeats_note, split_by_prompt, unrankable, where)
from polar.records import Record, record_digest


def rec(prompt, chosen="good", rejected="bad", reference="ref", line=0):
    return Record(prompt, reference, [chosen, rejected], [1, 0], None, file="f.jsonl", line=line)


def test_prompts_are_the_same_when_their_text_is_the_same_message_lists_included():
    records = [rec("a"), rec([{"role": "user", "content": "a"}]), rec("b"), rec("a")]
    assert prompt_ids(records).tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("seed", range(5))
def test_no_prompt_is_on_both_sides_and_the_held_out_share_is_near_the_fraction(seed):
    rng = np.random.default_rng(seed)
    # UltraFeedback-like: 1 to 6 pairs per prompt
    records = [rec(f"prompt {p}") for p in range(200) for _ in range(int(rng.integers(1, 7)))]
    split = split_by_prompt(records, 0.1, seed)
    ids = prompt_ids(records)
    assert not set(ids[split.held]) & set(ids[~split.held])
    assert split.held_prompts == len(set(ids[split.held])) and split.prompts == 200
    # whole prompts of at most 6 records: the closest cut is within half a prompt's records of the target
    assert abs(split.held.sum() - held_out_count(0.1, len(records))) <= 3


def test_with_one_record_per_prompt_exactly_the_fraction_is_held_out_the_same_for_the_same_seed():
    records = [rec(f"p{i}") for i in range(40)]
    a, b, c = (split_by_prompt(records, 0.25, s) for s in (3, 3, 4))
    assert a.held.sum() == 10 and (a.held == b.held).all() and not (a.held == c.held).all()


@pytest.mark.parametrize("records,fraction,held", [
    (5, 0.1, 1), (10, 0.05, 1), (2, 0.25, 1),  # round() took 0.5 to 0: none held out though asked for
    (15, 0.1, 1), (25, 0.1, 2), (35, 0.1, 3),  # 1.5 went to 2, 2.5 to 2 and 3.5 to 4
    (15, 0.5, 7), (3, 0.5, 1),  # 7.5 went to 8, 1.5 to 2: more held out than trained on
    (100, 0.29, 29), (2, 0.5, 1), (1, 0.5, 0), (10, 0.0, 0),
])
def test_the_held_out_count_is_the_fraction_rounded_down_and_one_at_least(records, fraction, held):
    """Python's round() took a half to the even number: a fraction above 0 held out no record at small
    sizes (10 records at the default 0.05), and the count went up or down as the parity fell."""
    assert held_out_count(fraction, records) == held
    split = split_by_prompt([rec(f"p{i}") for i in range(records)], fraction, 0)
    assert split.held.sum() == held and (records < 2 or not split.held.all())


@pytest.mark.parametrize("records,fraction,held", [(10, 0.05, 0), (30, 0.05, 2), (1030, 0.05, 52), (15, 0.5, 8),
                                                   (5, 0.1, 0), (35, 0.1, 4)])
def test_rule_1_is_the_round_of_runs_started_before_the_rule_was_recorded(records, fraction, held):
    """A run whose checkpoints record no split rule trained on the split of round(fraction x records):
    it resumes on that split (finetune_recipe), which the rule of new runs would change."""
    assert legacy_held_out_count(fraction, records) == held
    split = split_by_prompt([rec(f"p{i}") for i in range(records)], fraction, 0, rule=1)
    assert split.held.sum() == held
    assert split_by_prompt([rec(f"p{i}") for i in range(records)], fraction, 0).held.sum() == \
        held_out_count(fraction, records) != held and SPLIT_RULE == 2


def test_a_prompt_always_stays_to_train_on_and_one_is_held_out_when_any_record_is_asked_for():
    one_prompt = [rec("same") for _ in range(10)]
    assert not split_by_prompt(one_prompt, 0.5, 0).held.any()
    # the only prompts are bigger than the target: one of them is still held out, not none
    big = [rec("a")] * 8 + [rec("b")] * 8 + [rec("c")] * 8
    split = split_by_prompt(big, 0.05, 0)
    assert split.held_prompts == 1 and split.held.sum() == 8
    assert not split_by_prompt(big, 0.0, 0).held.any()


def test_a_prompt_of_most_records_met_early_in_the_order_is_passed_over():
    """The split stopped at the first prompt past the target: where the seeded order met a prompt of
    10 records first, it held out 10 of 11 records at 0.05 (and 10 of 20 at 0.1, seeds 9 and 11),
    leaving one record to train on, where whole prompts allow the README's 'as close to the fraction
    as whole prompts allow'."""
    for seed in range(12):
        assert split_by_prompt([rec("big")] * 10 + [rec("x")], 0.05, seed).held.sum() == 1, seed
        split = split_by_prompt([rec("big")] * 10 + [rec(f"p{i}") for i in range(10)], 0.1, seed)
        assert (split.held.sum(), split.held_prompts) == (2, 2), seed


def test_overlap_counts_shared_prompts_and_names_each_copy_with_its_training_record():
    train = [rec("a", line=1), rec("b", line=2), rec("b", line=3)]
    held = [rec("a", chosen="other", line=1), rec("b", line=2), rec("c", line=3), rec("b", line=4)]
    same, copies = overlap(train, held)
    assert same == 3
    assert [(h.line, t.line) for h, t in copies] == [(2, 2), (4, 2)]
    assert overlap(train, [rec("z")]) == (0, [])


def test_a_preferred_and_a_rejected_of_the_same_text_is_unrankable_two_preferred_are_not():
    same_pair = rec("p", chosen="x", rejected="x", line=1)
    grouped = Record("p", "r", ["x", "y", [{"role": "assistant", "content": "x"}]], [1, 1, 0], None, line=2)
    two_good = Record("p", "r", ["x", "x", "z"], [1, 1, 0], None, line=3)
    assert unrankable([same_pair, grouped, two_good, rec("p")]) == [same_pair, grouped]
    assert where([rec("p", line=i) for i in range(1, 5)]) == "f.jsonl:1, f.jsonl:2, f.jsonl:3, ..."


def test_a_record_repeating_an_earlier_one_exactly_is_found_other_fields_aside():
    first = rec("a", line=1)
    same = [rec([{"role": "user", "content": "a"}], line=2),  # the same text, as the format joins it
            Record("a", "ref", ["good", "bad"], [1, 0], "sft", file="f.jsonl", line=3, extra={"id": 9})]
    other = [rec("a", chosen="bad", rejected="good", line=4),  # another order is another record
             Record("a", "ref", ["good", "bad"], [1, 1], None, file="f.jsonl", line=5),
             Record("a", "ref", ["good", "bad"], [1, 0], "pretrain", file="f.jsonl", line=6)]
    found = repeats([first, *same, *other], "sft")
    assert [(r.line, f.line) for r, f in found] == [(2, 1), (3, 1)]
    assert [(r.line, f.line) for r, f in repeats([first, *other], "pretrain")] == [(6, 1)]


def test_fine_tuning_and_a_build_name_the_same_repeats_alike():
    """repeats_note named 3 pairs by a literal beside build_repeats.SHOWN, each wording the pairs its
    own way: the same records name the same SHOWN pairs, worded alike, in either."""
    records = [rec(f"p{i % 2}", line=i + 1) for i in range(2 + build_repeats.SHOWN + 1)]
    found = build_repeats.Repeats()
    digests = b"".join(record_digest(r.prompt, r.reference, r.candidates, r.labels, "sft") for r in records)
    found.add(np.arange(len(records)), np.frombuffer(digests, np.uint64).reshape(-1, 2))
    count, first = found.find([{"path": "f.jsonl", "first_record": 0}])
    assert count == len(first) + 1 == build_repeats.SHOWN + 1
    shown = build_repeats.named(count, first)
    assert shown.count(" repeats ") == build_repeats.SHOWN and shown.endswith(", ...")
    assert shown in build_repeats.summary_line(count, first, 1)
    assert f"wrapper; {shown}): kept" in repeats_note("fine-tuning data", records, "sft")


def test_fine_tuning_names_records_repeated_in_its_training_and_held_out_files(tmp_path, capsys):
    """A sampler's output appended to itself was trained twice over without a word: only a held-out
    record repeating a training one was reported."""
    lines = [json.dumps({"prompt": f"prompt {i}", "reference": "r" * 20, "chosen": "c" * 20,
                         "rejected": "x" * 20}) + "\n" for i in range(6)]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(lines + lines[:4]))
    held.write_text(lines[5].replace("prompt 5", "new") * 2)
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={train}", f"finetune.eval={held}",
                                                    "data.seq_length=256", "finetune.tokenizer=byte",
                                                    "train.global_batch=1", f"run_dir={tmp_path / 'run'}"])
    data = recipe.prepare_data(cfg)
    assert len(data.train.groups) == 10  # kept
    out = capsys.readouterr().out
    assert (f"note: fine-tuning data: 4 of 10 record(s) repeat an earlier record exactly (the same prompt, "
            f"reference, candidates, labels and wrapper; {train}:7 repeats {train}:1, {train}:8 repeats {train}:2, "
            f"{train}:9 repeats {train}:3, ...): kept, each counts as often as it appears") in out, out
    assert "note: held-out data: 1 of 2 record(s) repeat an earlier record exactly" in out, out
