"""polar/finetune_recipe.py without training: the settings it derives from the data (train.steps,
train.warmup_steps) are refused when set, and the step count covers the requested epochs."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from engine.config import ConfigError
from engine.config_load import load_config
from engine.data import GlobalBatchLoader
from polar import finetune_recipe as recipe
from polar.tokenizer import load_tokenizer


@pytest.mark.parametrize("setting,derived_from", [("train.steps=100", "finetune.epochs"),
                                                  ("train.warmup_steps=5", "finetune.warmup_fraction")])
def test_a_derived_setting_given_explicitly_is_refused(tmp_path, setting, derived_from):
    (tmp_path / "r.jsonl").write_text("")
    cfg = load_config(recipe.FinetuneConfig, None, [setting, f"finetune.train={tmp_path / 'r.jsonl'}"])
    with pytest.raises(ConfigError, match=f"{setting}: fine-tuning derives it from the data and {derived_from}"):
        recipe.check(cfg)


@pytest.mark.parametrize("setting", ["data.path", "data.eval_path"])
def test_a_built_dataset_named_for_fine_tuning_is_refused_not_ignored(tmp_path, setting):
    """Fine-tuning packs finetune.train's records itself: a data.path (a pre-training config's data section
    passed with --config, say) was accepted and trained on by nothing, without a word."""
    (tmp_path / "r.jsonl").write_text("")
    (tmp_path / "built").mkdir()
    cfg = load_config(recipe.FinetuneConfig, None, [f"{setting}={tmp_path / 'built'}",
                                                    f"finetune.train={tmp_path / 'r.jsonl'}"])
    with pytest.raises(ConfigError, match=f"^{setting}=.*built: fine-tuning reads its records from finetune.train"):
        recipe.check(cfg)


@pytest.mark.parametrize("global_batch,fill", [(3, " (the last batch is filled with 1 sequence(s) of epoch 2)"),
                                               (4, "")])
def test_one_epoch_trains_every_sequence_and_says_how_the_last_batch_is_filled(tmp_path, global_batch, fill):
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"prompt": "p" * (i % 7 + 3), "reference": f"ref {i}",
                                           "chosen": "c" * (i % 5 + 1), "rejected": "x" * (i % 3 + 2),
                                           "wrapper": "sft"}) + "\n" for i in range(30)))
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "data.seq_length=128",
                                                    f"train.global_batch={global_batch}", "finetune.eval_fraction=0",
                                                    f"run_dir={tmp_path / 'run'}"])
    cfg.finetune.tokenizer = "byte"  # no checkpoint to take it from
    data = recipe.prepare_data(cfg)
    assert len(data.train) == 8
    assert cfg.train.steps == math.ceil(8 / global_batch)
    loader = GlobalBatchLoader(data.train, global_batch, 1, 0, 1, seed=cfg.train.seed, pad_id=0)
    trained = [i for b in range(cfg.train.steps) for i in loader.global_batch_indices(b).tolist()]
    assert set(trained) == set(range(8))
    assert f"1 epoch(s) = {cfg.train.steps} steps{fill}, 0 warm-up" in data.description, data.description


def test_byte_is_a_tokenizer_setting_and_a_missing_directory_is_not(tmp_path):
    (tmp_path / "r.jsonl").write_text("")
    train = f"finetune.train={tmp_path / 'r.jsonl'}"
    assert load_config(recipe.FinetuneConfig, None, [train, "finetune.tokenizer=byte"]).finetune.tokenizer == "byte"
    with pytest.raises(ConfigError, match="finetune.tokenizer=.*nope: no such file"):
        load_config(recipe.FinetuneConfig, None, [train, f"finetune.tokenizer={tmp_path / 'nope'}"])


def test_a_record_too_long_for_the_pack_keeps_a_shorter_prompt_and_says_so(tmp_path, capsys):
    """max_length bounds each candidate's input; a pair is packed as its prefix once plus both
    candidates, which can exceed data.seq_length: its prompt is cut further, never the record lost."""
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"prompt": "p" * 200, "reference": "r" * 60, "chosen": "c" * 60,
                                   "rejected": "x" * 60, "wrapper": "sft"}) + "\n")
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "data.seq_length=256",
                                                    "finetune.max_length=256", "finetune.tokenizer=byte",
                                                    f"run_dir={tmp_path / 'run'}"])
    from polar.tokenizer import load_tokenizer

    packed = recipe._pack(cfg, load_tokenizer("byte"), recipe._read(str(records), "fail"), "r.jsonl")
    assert len(packed) == 1
    out = capsys.readouterr().out
    assert "r.jsonl: 1 record(s) too long for data.seq_length=256 as one group kept a shorter prompt" in out
    # and before that, what POLAR's rule itself cut: the prompt past its budget (256 - 4 - 60 - 60) // 2
    assert ("r.jsonl: truncation (POLAR's rule) 0 of 3 responses cut to their first finetune.max_response=4096 "
            "ids, BOS counted (4095 tokens of text), 1 prompts to their last tokens within "
            "finetune.max_length=256") in out


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_record_whose_responses_alone_overflow_the_pack_is_named_by_its_line(tmp_path, capsys, on_error):
    """No prompt cut makes it fit: it is named by file:line (not by its position after the held-out
    split) and stops the run, or with finetune.on_error=skip is set aside and counted."""
    records = tmp_path / "r.jsonl"
    small = {"prompt": "q", "reference": "r", "chosen": "c", "rejected": "x", "wrapper": "sft"}
    big = {**small, "reference": "r" * 300, "chosen": "c" * 300, "rejected": "d" * 300}
    records.write_text("".join(json.dumps(r) + "\n" for r in [small] * 4 + [big] + [small]))
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "data.seq_length=512",
                                                    "finetune.tokenizer=byte", f"finetune.on_error={on_error}",
                                                    f"run_dir={tmp_path / 'run'}"])
    from polar.tokenizer import load_tokenizer

    tok, read = load_tokenizer("byte"), recipe._read(str(records), on_error)
    needle = (r"train: 1 record\(s\) do not fit data.seq_length=512 as one group even with a shorter prompt: "
              rf"{records}:5")
    if on_error == "fail":
        with pytest.raises(ConfigError, match=needle):
            recipe._pack(cfg, tok, read, "train")
        return
    packed = recipe._pack(cfg, tok, read, "train")
    assert len(packed.groups) == 5
    out = capsys.readouterr().out
    assert re.search(needle, out) and "skipped (finetune.on_error=skip)" in out, out
    assert "kept a shorter prompt" not in out


def test_more_records_over_the_pack_than_are_named_end_with_a_tail(tmp_path):
    """The first SHOWN records that cannot fit are named with their lengths, then ', ...' for the rest."""
    from polar.build_repeats import SHOWN
    from polar.tokenizer import load_tokenizer

    records = tmp_path / "r.jsonl"
    small = {"prompt": "q", "reference": "r", "chosen": "c", "rejected": "x", "wrapper": "sft"}
    big = {**small, "reference": "r" * 300, "chosen": "c" * 300, "rejected": "d" * 300}
    records.write_text("".join(json.dumps(r) + "\n" for r in [small] + [big] * (SHOWN + 1)))
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "data.seq_length=512",
                                                    "finetune.tokenizer=byte", f"run_dir={tmp_path / 'run'}"])
    read = recipe._read(str(records), "fail")
    with pytest.raises(ConfigError) as raised:
        recipe._pack(cfg, load_tokenizer("byte"), read, "train")
    named = ", ".join(rf"{records}:{line} \(\d+ tokens\)" for line in range(2, SHOWN + 2))
    assert re.search(rf"train: {SHOWN + 1} record\(s\) do not fit .* prompt: {named}, \.\.\.; raise data\.seq_length",
                     str(raised.value)), str(raised.value)


def _one_per_sequence(tmp_path, n, *overrides):
    """n records, each too long to share a 128-token sequence with another: n packed sequences."""
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"prompt {i:03d} " + "p" * 20, "reference": "r" * 20,
                                           "chosen": "c" * 20, "rejected": "x" * 20}) + "\n" for i in range(n)))
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "data.seq_length=128",
                                                    "finetune.eval_fraction=0", "finetune.tokenizer=byte",
                                                    f"run_dir={tmp_path / 'run'}", *overrides])
    return cfg


def test_epochs_to_steps_counts_the_epochs_as_written_not_their_float_product(tmp_path):
    # 0.28 x 25 is 7.000000000000001 in floating point: its ceiling trained one sequence (step) too many
    cfg = _one_per_sequence(tmp_path, 25, "finetune.epochs=0.28", "train.global_batch=1")
    data = recipe.prepare_data(cfg)
    assert len(data.train) == 25
    assert cfg.train.steps == 7, data.description


@pytest.mark.parametrize("key", ["train", "eval"])
def test_a_directory_of_records_is_refused_at_start_up(tmp_path, key):
    (tmp_path / "r.jsonl").write_text("")
    overrides = [f"finetune.train={tmp_path / 'r.jsonl'}", f"finetune.{key}={tmp_path}"]
    with pytest.raises(ConfigError, match=f"finetune.{key}={tmp_path}: is a directory"):
        load_config(recipe.FinetuneConfig, None, overrides)


def test_held_out_records_that_are_all_set_aside_stop_the_run_instead_of_scoring_zero_pairs(tmp_path):
    """finetune.on_error=skip sets aside records too long for the pack; when that is every held-out
    record, the run used to evaluate on nothing and report accuracy 0.000 and loss 0 over 0 pairs."""
    cfg = _one_per_sequence(tmp_path, 4, "train.global_batch=1", "finetune.on_error=skip")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "q", "reference": "r" * 200, "chosen": "c" * 200,
                                "rejected": "x" * 200}) + "\n")
    cfg.finetune.eval = str(held)
    with pytest.raises(ConfigError, match=r"held-out data: none of its 1 record\(s\) fits data.seq_length=128"):
        recipe.prepare_data(cfg)


def test_the_record_count_leaves_out_records_set_aside_as_too_long(tmp_path):
    cfg = _one_per_sequence(tmp_path, 4, "train.global_batch=1", "finetune.on_error=skip")
    with open(cfg.finetune.train, "a") as f:
        f.write(json.dumps({"prompt": "q", "reference": "r" * 200, "chosen": "c" * 200, "rejected": "x" * 200}) + "\n")
    data = recipe.prepare_data(cfg)
    assert data.description.startswith("data: 4 fine-tuning records -> 4 packed sequences"), data.description


def test_every_record_set_aside_by_skip_is_listed_with_its_reason(tmp_path, capsys):
    """finetune.on_error=skip printed a count and the first reject only: the others could not be found."""
    cfg = _one_per_sequence(tmp_path, 4, "train.global_batch=1", "finetune.on_error=skip")
    with open(cfg.finetune.train, "a") as f:
        f.write('{"prompt": "q", "reference": "r", "chosen": "", "rejected": "x"}\nnot json\n')
        f.write(json.dumps({"prompt": "q", "reference": "r" * 200, "chosen": "c" * 200, "rejected": "x" * 200}) + "\n")
    data = recipe.prepare_data(cfg)
    rejects = tmp_path / "run" / recipe.REJECTS_FILE
    assert not rejects.exists()  # reading the data (also for --check-config) writes nothing
    recipe.write_run_files(cfg, data)  # the run's start
    listed = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in listed] == [(5, "chosen"), (6, "(line)"), (7, "(record)")]
    assert listed[1]["raw"] == "not json" and "more than data.seq_length=128" in listed[2]["reason"]
    out = capsys.readouterr().out
    assert "3 record(s) set aside (finetune.on_error=skip)" in out
    assert f"wrote the 3 record(s) set aside, each with its reason: {rejects}" in out
    # a later run in the same directory that sets none aside: the old list goes (it described other data)
    clean = _one_per_sequence(tmp_path, 4, "train.global_batch=1", "finetune.on_error=skip")
    recipe.write_run_files(clean, recipe.prepare_data(clean))
    assert not rejects.exists() and f"removed {rejects} of an earlier run" in capsys.readouterr().out


def _init_step(tmp_path, where="base/step_00000000", **model):
    import dataclasses

    from engine import checkpoint
    from engine.config import ModelConfig

    step = tmp_path / where
    step.mkdir(parents=True)
    (step / "metadata.json").write_text("{}")
    (step / checkpoint.MODEL_FILE).write_text(json.dumps({**dataclasses.asdict(ModelConfig()), "vocab_size": 260,
                                                          **model}))
    return step


def test_init_from_brings_the_model_it_holds(tmp_path, capsys):
    """`polar finetune checkpoint.init_from=runs/default/checkpoints finetune.train=prefs.jsonl` was
    refused: 'holds a model with model.hidden_size=64, model.ffn_hidden_size=176 ... set
    model.hidden_size=64 model.ffn_hidden_size=176'; the checkpoint's settings are taken instead."""
    from engine.finetune import main

    step = _init_step(tmp_path, hidden_size=64, ffn_hidden_size=176)
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"q{i}", "reference": "r", "chosen": "c", "rejected": "x"})
                               + "\n" for i in range(4)))
    args = [f"checkpoint.init_from={step}", f"finetune.train={records}", "finetune.tokenizer=byte",
            "finetune.eval_fraction=0", "train.global_batch=1", f"run_dir={tmp_path / 'run'}"]
    assert main([*args, "--check-config"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count(f"model settings from {step / 'model.json'}: model.hidden_size=64, model.ffn_hidden_size=176, "
                     "model.vocab_size=260 (") == 1, out


def test_a_run_dir_holding_an_earlier_run_is_named_when_its_model_differs_from_init_from(tmp_path, capsys):
    """`polar finetune checkpoint.init_from=ckpt/base ...` with run_dir holding an earlier run's steps
    said "model.vocab_size=260 is smaller than the tokenizer's 49154 (ckpt/base/tokenizer)": the run
    resumes run_dir's newest step, with its model, and does not load init_from, which the message never
    said. checkpoint.resume=false is no way out: it refuses a checkpoint directory holding steps."""
    from engine.finetune import main

    from .test_tokenizer import train_bpe

    base = tmp_path / "base"
    vocab = load_tokenizer(train_bpe(base / "tokenizer", vocab_size=300)).vocab_size
    step = _init_step(tmp_path, hidden_size=64, ffn_hidden_size=176, vocab_size=vocab)
    # an earlier run in run_dir, of the byte tokenizer's 260 ids
    earlier = _init_step(tmp_path, "run/checkpoints/step_00000003", hidden_size=64, ffn_hidden_size=176)
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"q{i}", "reference": "r", "chosen": "c", "rejected": "x"})
                               + "\n" for i in range(4)))
    args = [f"checkpoint.init_from={base}", f"finetune.train={records}", "finetune.eval_fraction=0",
            "train.global_batch=1"]
    assert main([*args, f"run_dir={tmp_path / 'run'}", "--check-config"]) == 2
    err = capsys.readouterr().err
    assert f"model.vocab_size=260 is smaller than the tokenizer's {vocab} ({base / 'tokenizer'}): the run resumes " \
           f"{earlier}, the newest step in {earlier.parent} (an earlier run in run_dir={tmp_path / 'run'}), and " \
           f"builds the model that step holds; checkpoint.init_from={base} is loaded only by a run that has no " \
           "step to resume. To fine-tune from it, give a new run_dir (or checkpoint.dir)" in err, err
    # what it says to do: a new run_dir builds init_from's model
    assert main([*args, f"run_dir={tmp_path / 'new'}", "--check-config"]) == 0, capsys.readouterr().err
    assert f"model settings from {step / 'model.json'}: " in capsys.readouterr().out


def test_every_model_setting_given_that_init_from_differs_in_is_named_at_once(tmp_path, capsys):
    """`polar finetune ... model.hidden_size=64` against a checkpoint of hidden 64 and FFN 176 named
    only ffn_hidden_size, after a run without it had named only hidden_size. A setting the user gives
    is still checked; those left out are the checkpoint's."""
    from engine.finetune import main

    step = _init_step(tmp_path, hidden_size=64, ffn_hidden_size=176)
    (tmp_path / "r.jsonl").write_text("")
    args = [f"checkpoint.init_from={step}", f"finetune.train={tmp_path / 'r.jsonl'}", "finetune.tokenizer=byte",
            f"run_dir={tmp_path / 'run'}"]
    for extra, named in ((["model.hidden_size=32", "model.ffn_hidden_size=128"], "model.hidden_size=64, "
                          "model.ffn_hidden_size=176"), (["model.hidden_size=32"], "model.hidden_size=64 ")):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert f"config error: checkpoint.init_from={step} holds a model with {named}" in err, err
        assert f"set {named.replace(', ', ' ')}".rstrip() in err, err


def test_too_few_sequences_for_the_batch_says_what_to_change(tmp_path):
    # `polar finetune ... data.seq_length=16384` (the README's line) on the 200 example records named
    # the problem only: "the fine-tuning data packs into only 3 sequences of 16384 tokens"
    cfg = _one_per_sequence(tmp_path, 5, "train.global_batch=8")
    with pytest.raises(ConfigError, match=re.escape(
            "train.global_batch=8: the fine-tuning data packs into only 5 sequences of 128 tokens: set "
            "train.global_batch to at most 5, or a smaller data.seq_length")):
        recipe.prepare_data(cfg)


def test_too_few_sequences_for_the_data_parallel_ranks_says_to_use_fewer_processes(tmp_path, monkeypatch):
    """`polar finetune` (--nproc 2, its default) on data that packs into one sequence was told "set
    train.global_batch to at most 1", and then "train.global_batch=1 is not divisible by data-parallel
    size 2". WORLD_SIZE is what torchrun gives each of the --nproc processes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _one_per_sequence(tmp_path, 1, "train.global_batch=8")
    with pytest.raises(ConfigError) as e:
        recipe.prepare_data(cfg)
    # the batch too: named without it, --nproc 1 was then refused for train.global_batch=8 over 1 sequence
    assert str(e.value) == ("the fine-tuning data packs into only 1 sequences of 128 tokens, fewer than the 2 a step "
                            "needs at least (2 data-parallel rank(s) x train.micro_batch=1): use fewer processes "
                            "(--nproc 1 at most) with train.global_batch=1, a smaller data.seq_length (more, shorter "
                            "sequences), or more records"), e.value
    # a train.global_batch of 1 (the old advice) is refused here, not later by the layout check; it is kept
    with pytest.raises(ConfigError, match=r"^the fine-tuning data packs into only 1 sequences .*--nproc 1 at most\), "
                                          r"a smaller"):
        recipe.prepare_data(_one_per_sequence(tmp_path, 1, "train.global_batch=1"))
    # enough for the ranks, too few for the batch: the largest batch the two ranks divide
    with pytest.raises(ConfigError, match=re.escape(
            "set train.global_batch to at most 4 (a multiple of 2, as this layout needs), or a smaller")):
        recipe.prepare_data(_one_per_sequence(tmp_path, 5, "train.global_batch=8"))
    assert recipe.prepare_data(_one_per_sequence(tmp_path, 5, "train.global_batch=4")).train is not None
    # what the first message says to use: one process
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert len(recipe.prepare_data(_one_per_sequence(tmp_path, 1, "train.global_batch=1")).train) == 1


@pytest.mark.parametrize("world, layout, sequences", [
    (2, ["parallel.pp=2", "parallel.vpp=2", "train.micro_batch=2"], 1),  # interleaved: groups of pp per rank
    (4, ["train.micro_batch=4"], 3),  # a smaller micro_batch alone still leaves 4 ranks past 3 sequences
])
def test_the_layout_named_for_too_few_sequences_is_accepted(tmp_path, monkeypatch, world, layout, sequences):
    """Too few sequences for one step of the layout named 'a smaller train.micro_batch (now 1)' under
    interleaved pipelining, which takes parallel.pp micro-batches a rank whatever their size, and a
    micro_batch alone where the data-parallel ranks then still took more than the data: followed, each
    was refused again. Then its train.global_batch=64, past the data, was named only by a second refusal.
    What it names now, followed at once, is accepted."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = [*layout, "train.global_batch=64"]
    with pytest.raises(ConfigError) as e:
        recipe.prepare_data(_one_per_sequence(tmp_path, sequences, *args))
    named = re.search(r"\): use (.*), a smaller data\.seq_length", str(e.value)).group(1)
    args += re.findall(r"(parallel\.vpp=none|train\.micro_batch=\d+|train\.global_batch=\d+)", named)
    assert "train.global_batch=" in named, e.value
    nproc = re.search(r"--nproc (\d+) at most", named)
    monkeypatch.setenv("WORLD_SIZE", nproc.group(1) if nproc else str(world))
    assert len(recipe.prepare_data(_one_per_sequence(tmp_path, sequences, *args)).train) == sequences


def test_held_out_records_that_are_the_training_file_are_refused(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text("")
    (tmp_path / "link.jsonl").symlink_to(records)
    for same in (records, tmp_path / "link.jsonl"):
        cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", f"finetune.eval={same}"])
        with pytest.raises(ConfigError, match="finetune.eval=.* is the finetune.train file"):
            recipe.check(cfg)


def test_a_fraction_given_with_a_held_out_file_is_refused_not_dropped(tmp_path):
    """finetune.eval_fraction=0.2 beside finetune.eval held out nothing of finetune.train, without a word."""
    (tmp_path / "r.jsonl").write_text("")
    (tmp_path / "held.jsonl").write_text("")
    given = [f"finetune.train={tmp_path / 'r.jsonl'}", f"finetune.eval={tmp_path / 'held.jsonl'}"]
    cfg = load_config(recipe.FinetuneConfig, None, [*given, "finetune.eval_fraction=0.2"])
    with pytest.raises(ConfigError, match=r"^finetune.eval_fraction=0.2 with finetune.eval=.*held.jsonl: the held-out "
                                          "records are finetune.eval's"):
        recipe.check(cfg)
    for fraction in ("0", "0.05"):  # none, or the default (which cannot be told from one given)
        cfg = load_config(recipe.FinetuneConfig, None, [*given, f"finetune.eval_fraction={fraction}"])
        with pytest.raises(ConfigError, match="^checkpoint.init_from: fine-tuning starts"):  # the next check
            recipe.check(cfg)


def test_a_fraction_above_0_holds_out_one_record_at_least(tmp_path, capsys):
    """10 records at the default eval_fraction (0.05) held out none: round(0.5) is 0 (a half to the
    even number), and only a note said so. A fraction above 0 now holds out one record at least
    (finetune_split.held_out_count); none only where every record has the same prompt (the next test)."""
    cfg = _one_per_sequence(tmp_path, 10, "train.global_batch=1", "finetune.eval_fraction=0.05")
    data = recipe.prepare_data(cfg)
    assert set(data.evals) == {"held_out"} and len(data.evals["held_out"].groups) == 1
    assert "1 held out (1 of 10 prompts, held out whole)" in data.description, data.description
    assert "holds out none" not in capsys.readouterr().out
    cfg = _one_per_sequence(tmp_path, 10, "train.global_batch=1", "finetune.eval_fraction=0")  # asked for none
    data = recipe.prepare_data(cfg)
    assert not data.evals and "holds out none" not in capsys.readouterr().out



def test_a_run_started_under_the_old_held_out_count_resumes_on_its_own_split(tmp_path, capsys):
    """The held-out count was round(fraction x records) until it became the fraction rounded down (one
    at least): 0.05 of 30 records held out 2, now 1, so a run started before was refused on resume
    ('the data order changed ... packed sequence count: 28 when saved, 29 now'; set it back), which no
    setting could do. Its checkpoints record no split rule: it resumes on its old split, saying so, and
    records rule 1 from then on; a new run records rule 2."""
    from engine import checkpoint, resume_checks
    from engine.data import GlobalBatchLoader
    from engine.pretrain import check_resume_data

    cfg = _one_per_sequence(tmp_path, 30, "train.global_batch=1", "finetune.eval_fraction=0.05")
    data = recipe.prepare_data(cfg)
    assert len(data.evals["held_out"].groups) == 1 and resume_checks.data_settings(cfg)["finetune.split_rule"] == 2
    # what the old run trained on: with one record a prompt, the first round(1.5) = 2 prompts of the
    # split's seeded order (finetune.seed=0) held out
    held = set(np.random.default_rng([0, 7]).permutation(30)[:2].tolist())
    lines = (tmp_path / "r.jsonl").read_text().splitlines(keepends=True)
    old_train = tmp_path / "old" / "train.jsonl"
    old_train.parent.mkdir()
    old_train.write_text("".join(line for i, line in enumerate(lines) if i not in held))
    old = recipe.prepare_data(_one_per_sequence(tmp_path / "old", 1, f"finetune.train={old_train}"))
    assert len(old.train.groups) == 28
    loader = GlobalBatchLoader(old.train, 1, 1, 0, 1, seed=cfg.train.seed, pad_id=old.pad_id)
    recorded = {k: v for k, v in resume_checks.data_settings(cfg).items() if k != "finetune.split_rule"}
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text("{}")  # megatron's: without it the step is an incomplete copy

    def resume(**settings):
        (step / checkpoint.STATE_FILE).write_text(json.dumps({"step": 1, "data_settings": {**recorded, **settings},
                                                              "loader": loader.state_dict()}))
        capsys.readouterr()
        cfg = _one_per_sequence(tmp_path, 30, "train.global_batch=1", "finetune.eval_fraction=0.05")
        data = recipe.prepare_data(cfg)
        return cfg, data, capsys.readouterr().out

    for settings in ({}, {"finetune.split_rule": 1}):  # saved before the rule was recorded, or since under rule 1
        cfg, data, out = resume(**settings)
        check_resume_data(cfg, data, str(step))  # refused before: 28 packed sequences when saved, 29 now
        assert _prefixes(data.train) == _prefixes(old.train) and len(data.evals["held_out"].groups) == 2
        assert resume_checks.data_settings(cfg)["finetune.split_rule"] == 1  # what its next saves record
        assert out.count("note: ") == 1 and (f"note: {step} is of a run started before the held-out count's "
                                             "rule changed: it resumes on the split it trained with, round(0.05 x "
                                             "30) = 2 record(s) aimed at, where a new run aims at 1") in out, out
    cfg, data, out = resume(**{"finetune.split_rule": 2})
    assert len(data.evals["held_out"].groups) == 1 and "held-out count" not in out
    with pytest.raises(ConfigError, match="held-out split follows rule 3 .* which this version does not know"):
        resume(**{"finetune.split_rule": 3})


def _pairs(path, prompts, chosen=lambda i: f"good answer {i}"):
    """One pair per prompt given; a prompt's records share its reference, so a packed group's prefix
    (prompt, reference, prompt) names its prompt."""
    path.write_text("".join(json.dumps({"prompt": p, "reference": f"reference of {p}", "chosen": chosen(i),
                                        "rejected": f"bad answer {i}"}) + "\n" for i, p in enumerate(prompts)))
    return path


def _prefixes(packed):
    return {bytes(np.asarray(g.prefix, dtype=np.int64)) for g in packed.groups}


def test_records_sharing_a_prompt_are_held_out_together(tmp_path, capsys):
    """Three pairs per prompt: a split by record put pairs of most held-out prompts in training too,
    so the held-out accuracy was partly measured on trained prompts."""
    records = _pairs(tmp_path / "r.jsonl", [f"prompt {i // 3}" for i in range(60)])
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "data.seq_length=128",
                                                    "finetune.eval_fraction=0.2", "finetune.tokenizer=byte",
                                                    "train.global_batch=1", f"run_dir={tmp_path / 'run'}"])
    data = recipe.prepare_data(cfg)
    train, held = _prefixes(data.train), _prefixes(data.evals["held_out"])
    assert len(train) + len(held) == 20 and not train & held
    assert len(data.evals["held_out"].groups) == 12
    assert "12 held out (4 of 20 prompts, held out whole)" in data.description, data.description


def test_a_fraction_of_records_that_all_share_one_prompt_holds_out_none_and_says_why(tmp_path, capsys):
    records = _pairs(tmp_path / "r.jsonl", ["the one prompt"] * 20)
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "data.seq_length=128",
                                                    "finetune.eval_fraction=0.2", "finetune.tokenizer=byte",
                                                    "train.global_batch=1", f"run_dir={tmp_path / 'run'}"])
    data = recipe.prepare_data(cfg)
    assert not data.evals and len(data.train.groups) == 20
    assert "holds out none: every record has the same prompt" in capsys.readouterr().out


def test_a_held_out_file_sharing_prompts_and_records_with_the_training_file_is_noted(tmp_path, capsys):
    train = _pairs(tmp_path / "train.jsonl", [f"prompt {i}" for i in range(10)])
    held = _pairs(tmp_path / "held.jsonl", ["prompt 0", "prompt 1", "new prompt"], chosen=lambda i: f"good answer {i}"
                  if i == 0 else "another answer")
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={train}", f"finetune.eval={held}",
                                                    "data.seq_length=128", "finetune.tokenizer=byte",
                                                    "train.global_batch=1", f"run_dir={tmp_path / 'run'}"])
    recipe.prepare_data(cfg)
    out = capsys.readouterr().out
    assert (f"note: 2 of 3 finetune.eval record(s) share their prompt with a finetune.train record, 1 of them a "
            f"copy of one ({held}:1 repeats {train}:1): their accuracy is not held out") in out, out
    _pairs(held, ["new prompt"])
    recipe.prepare_data(cfg)
    assert "finetune.eval record(s) share" not in capsys.readouterr().out


def test_copies_in_a_held_out_file_are_named_as_a_build_names_repeats(tmp_path, capsys):
    """The note named held-out copies by a literal 3 (copies[:3], > 3) beside build_repeats.SHOWN, in a
    wording of its own ('h = t'): it names SHOWN of them, worded as the other repeat notes are."""
    from polar import build_repeats

    n = build_repeats.SHOWN + 1
    train = _pairs(tmp_path / "train.jsonl", [f"prompt {i}" for i in range(n + 2)])
    held = _pairs(tmp_path / "held.jsonl", [f"prompt {i}" for i in range(n)])
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={train}", f"finetune.eval={held}",
                                                    "data.seq_length=128", "finetune.tokenizer=byte",
                                                    "train.global_batch=1", f"run_dir={tmp_path / 'run'}"])
    recipe.prepare_data(cfg)
    shown = build_repeats.named(n, [(f"{held}:{i}", f"{train}:{i}") for i in range(1, build_repeats.SHOWN + 1)])
    assert shown.endswith(", ...")
    assert f"{n} of them a copy of one ({shown}): their accuracy" in capsys.readouterr().out


def test_a_pair_of_the_same_text_is_named(tmp_path, capsys):
    records = _pairs(tmp_path / "r.jsonl", [f"prompt {i}" for i in range(10)],
                     chosen=lambda i: f"bad answer {i}" if i in (2, 5) else "fine")
    cfg = load_config(recipe.FinetuneConfig, None, [f"finetune.train={records}", "data.seq_length=128",
                                                    "finetune.eval_fraction=0", "finetune.tokenizer=byte",
                                                    "train.global_batch=1", f"run_dir={tmp_path / 'run'}"])
    data = recipe.prepare_data(cfg)
    assert len(data.train.groups) == 10  # kept: noted, not dropped
    assert (f"note: fine-tuning data: 2 record(s) hold a preferred and a rejected response of the same text "
            f"({records}:3, {records}:6)") in capsys.readouterr().out


def test_a_warmup_as_long_as_the_fine_tuning_is_warned_of_with_the_settings_it_comes_from():
    """The warning told a fine-tuning run to set train.warmup_steps below train.steps, which fine-tuning
    refuses (both derived from its data); it now names finetune.warmup_fraction and finetune.epochs."""
    from engine.config import TrainConfig
    from engine.pretrain import schedule_warning
    from polar.finetune_recipe import DERIVED_SETTINGS

    warning = schedule_warning(TrainConfig(steps=7, warmup_steps=7, lr=1e-5), DERIVED_SETTINGS)
    assert "reaches train.lr=1e-05 only at the last step and never decays" in warning, warning
    assert "otherwise lower finetune.warmup_fraction or raise finetune.epochs" in warning, warning
    assert "set train.warmup_steps" not in warning
    assert schedule_warning(TrainConfig(steps=8, warmup_steps=7), DERIVED_SETTINGS) == ""


def test_a_run_dir_holding_a_pretraining_run_is_refused_as_such(tmp_path, capsys):
    """`polar finetune checkpoint.init_from=runs/default/checkpoints run_dir=runs/default` resumed the
    pre-training run's step and was refused for its optimizer settings ('train.lr=0.002 when saved,
    1e-05 now ... set them back'), advice that leads to a pre-training run resumed on preference records.
    The step's data settings, which hold no finetune.* setting, tell it apart now."""
    from engine import checkpoint
    from engine.finetune import main

    step = _init_step(tmp_path, where="pre/checkpoints/step_00000010", hidden_size=64)
    (step.parent / checkpoint.LATEST).write_text(step.name)
    state = {"step": 10, "loader": {}, "settings": {"train.lr": 0.002},
             "data_settings": {"data.path": "", "data.seq_length": 512, "synthetic.seed": 0}}
    (step / checkpoint.STATE_FILE).write_text(json.dumps(state))
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"q{i}", "reference": "r", "chosen": "c", "rejected": "x"})
                               + "\n" for i in range(4)))
    args = [f"checkpoint.init_from={step.parent}", f"finetune.train={records}", "finetune.tokenizer=byte",
            "finetune.eval_fraction=0", "train.global_batch=1"]
    assert main([*args, f"run_dir={tmp_path / 'pre'}", "--check-config"]) == 2
    err = capsys.readouterr().err
    assert (f"config error: run_dir={tmp_path / 'pre'}: its newest step, {step}, is a pre-training run's (its data "
            "settings are data.*, synthetic.*), which fine-tuning does not resume: give the "
            f"fine-tuning run a run_dir (or checkpoint.dir) of its own, with checkpoint.init_from={step} to start "
            "from its weights") in err, err
    # what it says to do
    assert main([*args, f"run_dir={tmp_path / 'ft'}", "--check-config"]) == 0, capsys.readouterr().err
    # a pre-training run on a built dataset records no synthetic.*, but its data.path
    cfg = load_config(recipe.FinetuneConfig, None, [*args, f"run_dir={tmp_path / 'pre'}"])
    state["data_settings"] = {"data.path": "/data/ds", "data.seq_length": 512}
    (step / checkpoint.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"a pre-training run's \(its data settings are data\.\*, "
                                          r"data\.path=/data/ds\)"):
        recipe._refuse_another_recipes_run(cfg)
    # a fine-tuning run's own step is resumed as before, and so is one saved before finetune.* was recorded
    for saved in ({"data.seq_length": 512, "data.path": "", "data.packing": "best_fit", "finetune.seed": 0},
                  {"data.seq_length": 512, "data.path": "", "data.packing": "best_fit"}):
        (step / checkpoint.STATE_FILE).write_text(json.dumps({**state, "data_settings": saved}))
        assert recipe._refuse_another_recipes_run(cfg) is None
