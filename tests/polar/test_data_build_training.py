"""A dataset built by `polar data build` read by training (pretrain.py: a run resumes at the exact
next sample, refuses other data or tokenizers), --check-config and `polar data stats`.

Starting python, torch and megatron is most of a tiny run's time: the trainings share two processes
(tests/engine/entry_runs.py, module fixture `runs`), every run up to an interruption in the first, the
resumed run and the refused resumes in the second (a resume is a process of its own, as after a real
interruption; the refusals meet the run directory the first process left)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from engine.indexed_dataset import IndexedDataset
from polar import data_stats
from polar.format import encode_groups
from tests.engine import entry_runs
from tests.polar.test_data_build import SEQ, build, synthetic_records, write_jsonl


@pytest.fixture(scope="module")
def records():
    return synthetic_records(120)


def pretrain_args(tmp_path: Path, name: str, *overrides: str) -> list:
    return [f"run_dir={tmp_path / name}",
            "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
            "model.ffn_hidden_size=64", "train.steps=4", "train.global_batch=4", "train.lr=1e-2",
            "train.warmup_steps=1", "train.time_limit_s=0", "log.interval=1", "log.tensorboard=false",
            f"data.seq_length={SEQ}", *overrides]


def pretrain(label: str, tmp_path: Path, name: str, *overrides: str) -> dict:
    """engine/pretrain.py with the tiny model as one run (`label`) of an entry_runs launch, in tmp_path."""
    return entry_runs.run(label, "engine.pretrain", *pretrain_args(tmp_path, name, *overrides), cwd=tmp_path)


def summary(done: dict, label: str, tmp_path: Path, name: str) -> dict:
    proc = done[label]
    assert proc.returncode == 0, (label, proc.stdout[-2000:] + proc.stderr[-3000:])
    return json.loads((tmp_path / name / "summary.json").read_text())


BPE_BUILD = ["--seq-length", SEQ, "--workers", 2, "--chunk-records", 16]
OTHER = {"ds_other_tok": "holds another tokenizer (tokenizer.json differs)",
         # other data at another path: the path named (a dataset moved keeps its sequences)
         "ds_other_data": "The run's training data is made from these settings"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, records):
    """Every training of the module, its data built first, in two processes: the first holds the resume
    test's uninterrupted run and its run up to step 2, the run on a BPE tokenizer's dataset up to step 2
    (train.exit_at_step=2: a checkpoint to resume from; it serves the test of what that dataset holds and
    trains and that of the refused resumes) and the run that meets a damaged packed sequence; the second
    the resumed run and the two refused resumes of the BPE run. -> {"dirs": each test's directory, "done":
    {label: CompletedProcess}, "trained": the BPE run's carried tokenizer and config.yaml after the first}."""
    from tests.engine.test_indexed_dataset_checks import poke
    from tests.polar.test_tokenizer import train_bpe

    root = tmp_path_factory.mktemp("runs")
    dirs = {name: root / name for name in ("resume", "bpe", "stats")}
    for d in dirs.values():
        d.mkdir()

    resume = dirs["resume"]
    src = write_jsonl(resume / "r.jsonl", records)
    assert build(src, "-o", resume / "ds", "--seq-length", SEQ, "--chunk-records", 40) == 0
    data = [f"data.path={resume / 'ds'}", f"data.eval_path={resume / 'ds'}"]
    second = write_jsonl(resume / "r2.jsonl", records[80:])
    assert build(second, "-o", resume / "ds_second", "--seq-length", SEQ) == 0

    bpe = dirs["bpe"]
    tok_dir = Path(train_bpe(bpe / "bpe"))
    src = write_jsonl(bpe / "r.jsonl", records[:40])
    assert build(src, "-o", bpe / "ds", *BPE_BUILD, "--tokenizer", tok_dir) == 0
    # the same ids from a tokenizer file written otherwise (another version of the library, say)
    other_tok = bpe / "bpe2"
    other_tok.mkdir()
    same = json.loads((tok_dir / "tokenizer.json").read_text())
    (other_tok / "tokenizer.json").write_text(json.dumps(same, indent=1))
    assert build(src, "-o", bpe / "ds_other_tok", *BPE_BUILD, "--tokenizer", other_tok) == 0
    other_src = write_jsonl(bpe / "r2.jsonl", records[40:80])
    assert build(other_src, "-o", bpe / "ds_other_data", *BPE_BUILD, "--tokenizer", tok_dir) == 0

    stats = dirs["stats"]
    src = write_jsonl(stats / "r.jsonl", records[:40])
    build(src, "-o", stats / "ds", "--seq-length", SEQ)
    poke(stats / "ds" / "part-00000-of-00001", 1, 1, 10**9)  # the second group's first piece
    epoch = -(-len(IndexedDataset(stats / "ds")) // 2)  # steps of 2 sequences that read every one

    # the damaged dataset as the evaluation set alone: met by the final evaluation, its first read of it
    final_fails = pretrain_args(stats, "final_fails", "train.steps=1", f"data.path={resume / 'ds'}",
                                f"data.eval_path={stats / 'ds'}", "log.tensorboard=true",
                                "log.wandb_project=polar-test")
    done = entry_runs.launch(root, [
        pretrain("straight", resume, "straight", *data, "checkpoint.save_at_end=false"),  # no resume from it
        # the straight run again, evaluated on two named sets: the training set and another
        pretrain("two_sets", resume, "two_sets", f"data.path={resume / 'ds'}", "checkpoint.save_at_end=false",
                 f"data.eval_path=same={resume / 'ds'},second={resume / 'ds_second'}"),
        pretrain("resumed_first", resume, "resumed", *data, "train.exit_at_step=2"),
        pretrain("bpe_run", bpe, "run", f"data.path={bpe / 'ds'}", "train.exit_at_step=2"),
        entry_runs.run("final_fails", "engine.pretrain", *final_fails, cwd=stats,
                       env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}),
        # with a wandb run (offline), last: a wandb run left open is finished by wandb's exit hook at the end of
        # the process (exit code 0), as in a process of its own whose main returns the error's status
        entry_runs.run("stats_run", "engine.pretrain", *pretrain_args(
            stats, "run", "train.global_batch=2", f"train.steps={epoch}", f"data.path={stats / 'ds'}",
            "log.wandb_project=polar-test"), cwd=stats, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})],
        "first")
    carried = bpe / "run" / "checkpoints" / "tokenizer" / "tokenizer.json"
    trained = (carried.read_bytes(), (bpe / "run" / "config.yaml").read_bytes())
    done.update(entry_runs.launch(root, [
        pretrain("resumed", resume, "resumed", *data),
        *(pretrain(f"refused_{ds}", bpe, "run", f"data.path={bpe / ds}") for ds in OTHER)], "second"))
    return {"dirs": dirs, "done": done, "trained": trained, "tok_dir": tok_dir}


def check_here(capsys, *overrides) -> tuple[int, str]:
    """`engine/pretrain.py --check-config` run by its main in this process, and what it wrote to stderr:
    the check ends before any process group starts, and a process of its own costs seconds of imports."""
    from engine import pretrain as entry

    capsys.readouterr()
    code = entry.main(["--check-config", *map(str, overrides)])
    return code, capsys.readouterr().err


def test_training_on_a_built_dataset_resumes_at_the_exact_sample(runs):
    tmp_path, done = runs["dirs"]["resume"], runs["done"]
    straight = summary(done, "straight", tmp_path, "straight")
    summary(done, "resumed_first", tmp_path, "resumed")
    resumed = summary(done, "resumed", tmp_path, "resumed")
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(straight["history"], resumed["history"]):
        # the same global batches in the same order: the same losses, step by step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-7), a["step"]
    assert len({round(r["loss"], 6) for r in straight["history"]}) > 1  # steps differ, so order matters
    assert straight["eval_pair_accuracy"] == pytest.approx(resumed["eval_pair_accuracy"])
    # the totals count the whole training; only the rate is the resumed process's own
    assert resumed["steps"] == straight["steps"] == 4 and resumed["tokens"] == straight["tokens"] > 0
    assert resumed["resumed_at_step"] == 2 and straight["resumed_at_step"] == 0
    assert 0 < resumed["tokens_this_run"] < resumed["tokens"] == straight["tokens_this_run"]
    assert straight["data"] == str(tmp_path / "ds") and straight["eval_pairs"] > 0


def test_several_named_evaluation_sets_are_each_evaluated_as_one_set_alone(runs):
    """data.eval_path=NAME=PATH,NAME=PATH: each set reported under its name (summary.json, metrics file, the
    log), the one that is the straight run's set with the straight run's figures; training is not touched."""
    from engine import metrics_file

    tmp_path, done = runs["dirs"]["resume"], runs["done"]
    straight = summary(done, "straight", tmp_path, "straight")
    both = summary(done, "two_sets", tmp_path, "two_sets")
    assert [r["loss"] for r in both["history"]] == [r["loss"] for r in straight["history"]]
    assert list(both["evaluations"]) == ["same", "second"] and list(both["eval_sets"]) == ["same", "second"]
    assert both["evaluations"]["same"] == pytest.approx(straight["evaluations"]["eval"], rel=1e-6)
    second = both["evaluations"]["second"]
    # every pair of the second set, not the first set's figures again
    assert second["pairs"] == int(IndexedDataset(tmp_path / "ds_second").per_sequence["pairs"].sum()) > 0
    assert second["loss"] != both["evaluations"]["same"]["loss"]
    assert "eval_pair_accuracy" not in both  # the headline keys of a lone set only: each named one is its own
    rows = metrics_file.read(tmp_path / "two_sets" / metrics_file.NAME)
    assert [(r.get("set"), r.get("final")) for r in rows if r["kind"] == "eval"] == [("same", True), ("second", True)]
    log = done["two_sets"].stdout
    groups = {name: IndexedDataset(tmp_path / ds).num_groups for name, ds in (("same", "ds"), ("second", "ds_second"))}
    assert f"; evaluated on same ({groups['same']:,} groups), second ({groups['second']:,} groups)\n" in log, log[:2000]
    for name, r in both["evaluations"].items():
        assert (f"evaluation of {name}: pair accuracy {r['pair_accuracy']:.3f}, loss {r['loss']:.4f} "
                f"({r['pairs']} pairs)") in log, log[-2000:]


def test_training_takes_one_shard_and_refuses_an_empty_evaluation_set(tmp_path, records, capsys):
    """data.path may name one shard (as `polar data stats` takes it); an evaluation set whose every
    record was rejected reported accuracy 0.000 over 0 pairs."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    build(src, "-o", tmp_path / "ds", "--seq-length", SEQ)
    empty = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    # one build refuses to make no group; two shards (the first gets no chunk) are written all the same
    for i in range(2):
        assert build(empty, "-o", tmp_path / "ev", "--seq-length", SEQ, "--on-error", "skip", "--num-shards", 2,
                     "--shard-index", i) == 0
    assert "holds no group (0 records read, 0 rejected): shard 0 of 2 is written" in capsys.readouterr().err
    shard = tmp_path / "ds" / "part-00000-of-00001"
    base = [f"run_dir={tmp_path / 'run'}", f"data.seq_length={SEQ}", "train.global_batch=2", f"data.path={shard}"]
    code, err = check_here(capsys, *base)
    assert code == 0, err[-2000:]
    code, err = check_here(capsys, *base, f"data.eval_path={tmp_path / 'ev'}")
    assert code == 2 and f"data.eval_path={tmp_path / 'ev'} holds no packed sequences" in err, err[-2000:]


def test_an_evaluation_set_of_another_tokenizer_is_refused_at_start_up(runs, capsys):
    """Before any process group (--check-config too): an evaluation set whose ids mean other tokens was only
    caught where the vocabulary sizes differed, not for another tokenizer file of the same size."""
    bpe, resume = runs["dirs"]["bpe"], runs["dirs"]["resume"]
    base = [f"run_dir={bpe / 'check'}", f"data.seq_length={SEQ}", "train.global_batch=2", f"data.path={bpe / 'ds'}"]
    code, err = check_here(capsys, *base, f"data.eval_path={bpe / 'ds_other_data'}")  # the same tokenizer
    assert code == 0, err[-2000:]
    code, err = check_here(capsys, *base, f"data.eval_path=same={bpe / 'ds_other_data'},other={bpe / 'ds_other_tok'}")
    assert code == 2 and (f"data.eval_path's other={bpe / 'ds_other_tok'} and data.path={bpe / 'ds'} disagree on "
                          "tokenizer_digest: ") in err and "built with different tokenizers" in err, err[-2000:]
    code, err = check_here(capsys, *base, f"data.eval_path={resume / 'ds'}")  # the byte tokenizer: 260 ids
    assert code == 2 and f"data.eval_path={resume / 'ds'} and data.path={bpe / 'ds'} disagree on vocab_size" in err, \
        err[-2000:]


def test_training_refuses_a_dataset_packed_at_another_length(tmp_path, records, capsys):
    """Refused by the recipe's checks, before any process group starts: engine/pretrain.py's main run in this
    process (a process of its own costs seconds of imports) with the run's own arguments, no --check-config."""
    from engine import pretrain as entry

    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    build(src, "-o", tmp_path / "ds", "--seq-length", 1024)
    capsys.readouterr()
    code = entry.main([f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'ds'}", f"data.seq_length={SEQ}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert f"data.seq_length={SEQ}, but data.path={tmp_path / 'ds'} is packed at 1024" in err, err[-2000:]
    assert not (tmp_path / "run").exists()  # nothing of the run was started


BPE_BUILD = ["--seq-length", SEQ, "--workers", 2, "--chunk-records", 16]


def test_an_hf_tokenizer_dataset_holds_the_whole_string_ids_and_trains(runs, records):
    """With a BPE that merges across the prompt/response boundary, every group is what
    encode_groups gives for that tokenizer (each candidate's whole input tokenized at once), the
    metadata carries its vocabulary and special ids, and pretrain.py trains on it."""
    from polar.tokenizer import load_tokenizer

    tmp_path, tok_dir = runs["dirs"]["bpe"], runs["tok_dir"]
    trained = summary(runs["done"], "bpe_run", tmp_path, "run")  # train.exit_at_step=2 of 4
    tok = load_tokenizer(tok_dir)
    recs = records[:40]
    ds = IndexedDataset(tmp_path / "ds")
    m = ds.meta
    assert (m["vocab_size"], m["pad_id"], m["bos_id"], m["reward_token_id"]) == (
        tok.vocab_size, tok.pad_id, tok.bos_id, tok.reward_token_id)
    assert m["tokenizer"] == str(Path(tok_dir).resolve())  # absolute: found from any working directory
    seen = 0
    for i in range(len(ds)):
        for g, rid in zip(ds.sequences([i])[0], ds.sources(i)):
            rec = recs[rid]
            cands = [c["text"] for c in rec["candidates"]] if "candidates" in rec else [rec["chosen"], rec["rejected"]]
            enc = encode_groups(tok, [rec["prompt"]], [rec["reference"]], [cands], rec.get("wrapper", "sft"),
                                max_length=SEQ)[0]
            for k, cand in enumerate(g.candidates):
                np.testing.assert_array_equal(np.concatenate([g.prefix, cand]), enc.full(k))
            seen += 1
    assert seen == len(recs)
    assert trained["steps"] == 2 and [r["step"] for r in trained["history"]] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in trained["history"])
    # the checkpoints carry the tokenizer, which scoring finds without being told
    from engine.checkpoint import resolve
    from engine.score import tokenizer_spec

    carried = tmp_path / "run" / "checkpoints" / "tokenizer"
    assert (carried / "tokenizer.json").read_bytes() == (Path(tok_dir) / "tokenizer.json").read_bytes()
    assert tokenizer_spec("", resolve(str(tmp_path / "run"))) == str(carried)


def test_a_refused_resume_leaves_the_run_as_it_was(runs, capsys):
    """A resume the engine refuses (other data, or data tokenized by another tokenizer than the one
    the checkpoints carry) is refused before anything of the run directory is written: the carried
    tokenizer and config.yaml stay those of the trained steps; --check-config refuses it too (it
    passed, and the launched run then failed under torchrun)."""
    tmp_path, trained = runs["dirs"]["bpe"], runs["trained"]
    carried = tmp_path / "run" / "checkpoints" / "tokenizer" / "tokenizer.json"
    base = pretrain_args(tmp_path, "run")
    for ds, message in OTHER.items():
        # the run refuses after its process group started (the second launch's runs, after the first's)
        proc = runs["done"][f"refused_{ds}"]
        assert proc.returncode == 2 and message in proc.stderr, (ds, proc.stderr[-2000:])
        assert (carried.read_bytes(), (tmp_path / "run" / "config.yaml").read_bytes()) == trained, ds
        code, err = check_here(capsys, *base, f"data.path={tmp_path / ds}")
        assert code == 2 and message in err, (ds, "--check-config", err[-2000:])
        assert (carried.read_bytes(), (tmp_path / "run" / "config.yaml").read_bytes()) == trained, (ds, "check")


def test_a_built_datasets_vocabulary_is_not_checked_against_the_byte_tokenizers(tmp_path, records):
    """The byte tokenizer's check belongs to the embedded default only: a misplaced `else` ran it
    for every built dataset without data.eval_path, refusing a vocabulary smaller than its 260."""
    from engine.config_load import load_config
    from polar import pretrain_recipe

    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    build(src, "-o", tmp_path / "ds", "--seq-length", SEQ)
    meta = tmp_path / "ds" / "part-00000-of-00001.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "vocab_size": 200}))
    cfg = load_config(pretrain_recipe.PretrainConfig, None,
                      [f"data.path={tmp_path / 'ds'}", f"data.seq_length={SEQ}", "train.global_batch=2"])
    pretrain_recipe.check(cfg)
    assert cfg.model.vocab_size == 200


def check_config(tmp_path: Path, data: Path, capsys) -> tuple[int, str]:
    """engine/pretrain.py --check-config on the built dataset `data`: (exit code, stderr)."""
    return check_here(capsys, f"run_dir={tmp_path / 'run'}", f"data.seq_length={SEQ}", "train.global_batch=2",
                      f"data.path={data}")


def test_stats_and_check_config_check_every_sequence_of_the_index(runs, capsys):
    """A run checks a packed sequence when it reads it, and stops there naming it; `polar data
    stats` and --check-config check the whole index before, naming the shard. The dataset (its
    second group's first piece poked) and the run that reads every sequence: the fixture `runs`."""
    tmp_path = runs["dirs"]["stats"]
    shard = tmp_path / "ds" / "part-00000-of-00001"
    capsys.readouterr()
    assert data_stats.main([str(tmp_path / "ds")]) == 2
    assert f"{shard}.idx: group offsets do not run from 0" in capsys.readouterr().err
    code, err = check_config(tmp_path, tmp_path / "ds", capsys)
    assert code == 2 and f"config error: data.path: {shard}.idx: group offsets do not run" in err, err[-2000:]
    run = runs["done"]["stats_run"]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.search(rf"data error on rank 0: {re.escape(str(shard))}\.idx: packed sequence \d+: group offsets",
                     run.stderr), run.stderr[-3000:]
    # the run failed in a step: its wandb run is finished as failed (exit code 1), with the steps it logged; fit
    # left it to wandb's exit hook, which marked it finished (exit code 0)
    from tests.engine.wandb_records import exit_code, finished_runs, history

    (wandb_run,) = finished_runs(tmp_path / "run", 1)
    assert exit_code(wandb_run) == 1 and history(wandb_run), exit_code(wandb_run)


def test_a_final_evaluation_that_fails_ends_the_run_with_its_error_and_its_wandb_run_marked_failed(runs):
    """The final evaluation meets a damaged sequence of the evaluation set: the run stops as on any data error
    (exit status 2, its one line last), and the logs fit left open for the results are closed, the wandb run
    finished as failed. They were left open, the wandb run to wandb's exit hook, which marked it finished
    (exit code 0): engine/pretrain.py's `sys.exit(main())` takes sys.exit before wandb.init hooks it."""
    from engine import metrics_file
    from tests.engine.test_trainer import _scalars
    from tests.engine.wandb_records import exit_code, finished_runs, history

    run_dir, run = runs["dirs"]["stats"] / "final_fails", runs["done"]["final_fails"]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    shard = runs["dirs"]["stats"] / "ds" / "part-00000-of-00001"
    assert run.stderr.rstrip().splitlines()[-1].startswith(f"data error on rank 0: {shard}.idx: packed sequence "), \
        run.stderr[-3000:]
    assert "evaluating ..." in run.stdout and not (run_dir / "summary.json").exists()
    # the training's figures, and no final ones
    assert [(r["kind"], r["step"]) for r in metrics_file.read(run_dir / metrics_file.NAME)] == [("train", 1)]
    assert [s for s, _ in _scalars(run_dir / "tensorboard", "train/loss")] == [1]
    (wandb_run,) = finished_runs(run_dir, 1)
    assert [r["_step"] for r in history(wandb_run)] == [1] and exit_code(wandb_run) == 1


def test_stats_and_check_config_name_a_shard_whose_header_names_no_token_dtype(tmp_path, records, capsys):
    """A damaged header is a named error with exit code 2, not a numpy traceback."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:20])
    build(src, "-o", tmp_path / "ds", "--seq-length", SEQ)
    shard = tmp_path / "ds" / "part-00000-of-00001"
    with open(f"{shard}.idx", "r+b") as f:
        f.seek(16)  # the token dtype's name
        f.write(b"zz".ljust(8, b"\0"))
    capsys.readouterr()
    assert data_stats.main([str(tmp_path / "ds")]) == 2
    assert f"{shard}.idx: token dtype b'zz', expected uint16 or int32" in capsys.readouterr().err
    code, err = check_config(tmp_path, tmp_path / "ds", capsys)
    assert code == 2 and f"{shard}.idx: token dtype b'zz'" in err, err[-2000:]
