"""A fine-tuning run (engine/finetune.py) resumed with another data setting is refused naming it, as
pre-training's is (engine.resume_checks.check_resume_data_settings, applied by engine.pretrain.
check_resume_data to every recipe): it said only 'the data order changed since the checkpoint (...
packed sequence count ... digest)', or, for data.seq_length, that train.steps changed. Edited training
records are refused naming the file; another held-out file resumes with a note. The run is started as
a user starts it, by `polar finetune`, whose start-up check and run said each note on the data twice."""
from __future__ import annotations

import json

import pytest

from tests.engine import entry_runs

TINY_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.ffn_hidden_size=128"]
CHANGED = [
    # the pack length it derived from the data (1024) against one set now; train.steps follows from it
    ("data.seq_length=2048", "data.seq_length=1024 when saved, 2048 now"),
    ("data.packing=ordered", "data.packing=best_fit when saved, ordered now"),
    # the recipe's own settings its data is made of (polar.finetune_recipe.FinetuneConfig.DATA_SETTINGS)
    ("finetune.seed=3", "when saved, 3 now"),
    ("finetune.max_response=100", "when saved, 100 now"),
]


@pytest.fixture(scope="module")
def saved_finetune(tmp_path_factory):
    """A pre-training, a fine-tuning run from it stopped after its first step (started by `polar
    finetune`), then engine/finetune.py on that run with more settings: the runs the tests read, in
    turn in one process (tests/engine/entry_runs.py; `polar finetune` still checks its start-up in a
    process of its own and runs torchrun). The run that trains on (another held-out set) comes last,
    so every --check-config run before it meets the run as its first step left it.
    -> (the folder, {run: CompletedProcess})."""
    from polar.pretrain_data import SyntheticDataConfig, make_splits

    tmp = tmp_path_factory.mktemp("resume_data_finetune")
    splits = make_splits(SyntheticDataConfig(seed=2, train_policies=10, held_out_policies=2, train_triplets=40,
                                             eval_triplets=4, prompts=50))
    for name, triplets in (("prefs.jsonl", splits.train), ("held.jsonl", splits.eval_held_out)):
        with open(tmp / name, "w") as f:
            for t in triplets:
                f.write(json.dumps({"prompt": [{"role": "user", "content": t.prompt}], "reference": t.reference,
                                    "chosen": t.chosen, "rejected": t.rejected, "wrapper": "sft"}) + "\n")
    # a record edited in place (its length kept)
    lines = (tmp / "prefs.jsonl").read_text().splitlines(keepends=True)
    rec = json.loads(lines[0])
    rec["chosen"] = ("x" if rec["chosen"][0] != "x" else "y") + rec["chosen"][1:]
    (tmp / "edited.jsonl").write_text(json.dumps(rec) + "\n" + "".join(lines[1:]))
    # other training records: the same less its last five (fewer packed sequences, another digest)
    (tmp / "fewer.jsonl").write_text("".join(lines[:-5]))
    # another held-out set: the same less its first record
    (tmp / "held_other.jsonl").write_text("".join((tmp / "held.jsonl").read_text().splitlines(keepends=True)[1:]))

    def settings(*extra: str) -> list[str]:
        return [*TINY_MODEL, f"checkpoint.init_from={tmp / 'pre' / 'checkpoints'}",
                f"finetune.train={tmp / 'prefs.jsonl'}", f"finetune.eval={tmp / 'held.jsonl'}", "finetune.epochs=1",
                # a warm-up as long as the run: its warning is one of the start-up lines polar finetune says
                "finetune.warmup_fraction=1", "train.global_batch=4", "log.tensorboard=false", f"run_dir={tmp / 'ft'}",
                *extra]

    def finetune(name: str, *extra: str) -> dict:
        return entry_runs.run(name, "engine.finetune", *settings(*extra), cwd=tmp)

    runs = [entry_runs.run("pre", "engine.pretrain", *TINY_MODEL, "data.seq_length=512", "train.steps=1",
                           "train.global_batch=4", "train.warmup_steps=0", "synthetic.train_triplets=40",
                           "synthetic.eval_triplets=4", "log.tensorboard=false", "train.time_limit_s=0",
                           f"run_dir={tmp / 'pre'}", cwd=tmp),
            # as a user starts it: `polar finetune` checks the start-up in a process of its own, then runs torchrun
            entry_runs.run("first", "polar.cli", "finetune", "--nproc", "1", *settings("train.exit_at_step=1"),
                           cwd=tmp),
            *[finetune(f"changed{i}", "--check-config", changed) for i, (changed, _) in enumerate(CHANGED)],
            finetune("same", "--check-config"),
            finetune("edited", "--check-config", f"finetune.train={tmp / 'edited.jsonl'}"),
            finetune("fewer", "--check-config", f"finetune.train={tmp / 'fewer.jsonl'}"),
            finetune("held_out", "train.exit_at_step=2", f"finetune.eval={tmp / 'held_other.jsonl'}")]
    done = entry_runs.launch(tmp, runs, "resume_data_finetune")
    for name in ("pre", "first"):
        assert done[name].returncode == 0, done[name].stderr[-3000:]
    return tmp, done


@pytest.mark.parametrize("case", range(len(CHANGED)), ids=[c for c, _ in CHANGED])
def test_a_changed_data_setting_is_named(saved_finetune, case):
    proc, named = saved_finetune[1][f"changed{case}"], CHANGED[case][1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert named in proc.stderr and "The run's training data is made from these settings" in proc.stderr, \
        proc.stderr[-3000:]
    assert "checkpoint.init_from=" in proc.stderr and "data order changed" not in proc.stderr
    assert "derived from" not in proc.stderr  # not train.steps, which the changed data setting moved


def test_polar_finetune_says_each_note_on_its_data_once(saved_finetune):
    """The start-up check `polar finetune` runs before torchrun, and the run, each read the data
    (prepare_data), and each printed its notes: every one came twice, and so did the engine's start-up
    lines (engine.pretrain.first_said): the model settings init_from brings, the warm-up warning."""
    tmp, first = saved_finetune[0], saved_finetune[1]["first"]
    assert (tmp / "ft" / "checkpoints" / "step_00000001").is_dir(), first.stdout[-3000:]
    out = first.stdout
    check, launch = out.index("config ok"), out.index("+ ")
    for line in ("finetune.eval record(s) share their prompt", "data.seq_length=1024 from the data",
                 "batch: train.global_batch=4 packed sequences carry",
                 f"model settings from {tmp / 'pre' / 'checkpoints' / 'step_00000001' / 'model.json'}: "
                 "model.vocab_size=260", "warning: train.warmup_steps=4 >= train.steps=4"):
        assert out.count(line) == 1 and out.index(line) < check < launch, out[-3000:]
    assert "data: 40 fine-tuning records" in out[launch:], out[-3000:]  # the run's own data line stays


def test_the_same_settings_resume(saved_finetune):
    proc = saved_finetune[1]["same"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held_out set" not in proc.stdout, proc.stdout  # the held-out set is the one saved: no note
    # --check-config alone says the notes, and the engine's start-up lines
    for line in ("batch: train.global_batch=4", "warning: train.warmup_steps=4 >= "):
        assert proc.stdout.count(line) == 1, proc.stdout
    # the held-out split's count rule among the data settings a step records (finetune.split_rule): a resume
    # from a step that lacks it keeps the old rule (test_finetune_recipe)
    from engine import checkpoint
    from polar.finetune_split import SPLIT_RULE

    saved = checkpoint.read_state(str(saved_finetune[0] / "ft" / "checkpoints" / "step_00000001"))
    assert saved["data_settings"]["finetune.split_rule"] == SPLIT_RULE, saved["data_settings"]


def test_an_edited_training_file_is_named(saved_finetune):
    """A record edited in place (its length kept) was refused as 'the training data changed since the
    checkpoint', naming no file; the file the run trained on before is named beside it (its config.yaml)."""
    tmp = saved_finetune[0]
    proc, edited = saved_finetune[1]["edited"], tmp / "edited.jsonl"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"the training data (finetune.train={edited}; finetune.train={tmp / 'prefs.jsonl'} when the run last "
            "started) changed since the checkpoint") in proc.stderr, proc.stderr[-3000:]


def test_other_training_records_are_named_once_beside_the_file_trained_on_before(saved_finetune):
    """Another finetune.train (fewer records) was refused naming 'the training data (finetune.train=...)'
    before each of its two figures (sequence count, digest), and never the file the run trained on."""
    tmp, proc = saved_finetune
    proc = proc["fewer"]
    named = f"the training data (finetune.train={tmp / 'fewer.jsonl'}; finetune.train={tmp / 'prefs.jsonl'} when "
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count(named) == 1 and proc.stderr.count("fewer.jsonl") == 1, proc.stderr[-3000:]
    assert "its packed sequence count: " in proc.stderr and "a digest of its packed" in proc.stderr, proc.stderr


def test_a_changed_held_out_set_resumes_with_a_note(saved_finetune):
    """Another finetune.eval between a run and its resume was taken without a word, and the eval history
    went on with the new set's numbers beside the old one's. It still resumes (the change may be meant),
    with a note naming the file and the step, which the checkpoints and summary.json record too."""
    from engine import checkpoint

    tmp, proc = saved_finetune[0], saved_finetune[1]["held_out"]
    run_dir, held = tmp / "ft", tmp / "held_other.jsonl"
    first = checkpoint.read_state(str(run_dir / "checkpoints" / "step_00000001"))["eval_sets"]
    assert list(first) == ["held_out"] and first["held_out"]["after_step"] == 0, first
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"note: the held_out set (finetune.eval={held}) is not the one "
            f"{run_dir / 'checkpoints' / 'step_00000001'} was evaluated on") in proc.stdout, proc.stdout[-3000:]
    assert ("the eval history's held_out rows up to step 1 are of the old set, from step 2 on (and the final "
            "evaluation) of this one") in proc.stdout, proc.stdout[-3000:]
    # a plain run (no check before it) says the engine's start-up lines
    assert proc.stdout.count("warning: train.warmup_steps=4 >= ") == 1, proc.stdout[-3000:]
    now = json.loads((run_dir / "summary.json").read_text())["eval_sets"]
    assert now["held_out"]["after_step"] == 1 and now["held_out"]["digest"] != first["held_out"]["digest"], now
    assert checkpoint.read_state(str(run_dir / "checkpoints" / "step_00000002"))["eval_sets"] == now


def test_each_recipe_names_its_data_by_the_setting_giving_it():
    """engine.pretrain.data_files, which the messages above name the data by, for both recipes."""
    from engine.config_load import load_config
    from engine.pretrain import data_files
    from polar.finetune_recipe import FinetuneConfig
    from polar.pretrain_recipe import PretrainConfig

    def named(cls, *overrides):
        return data_files(load_config(cls, None, list(overrides), check=False))

    assert named(FinetuneConfig, "finetune.train=p.jsonl", "finetune.eval=h.jsonl") == \
        ("finetune.train=p.jsonl", "finetune.eval=h.jsonl")
    assert named(FinetuneConfig, "finetune.train=p.jsonl") == ("finetune.train=p.jsonl", "")
    assert named(PretrainConfig, "data.path=ds/", "data.eval_path=ev/") == ("data.path=ds/", "data.eval_path=ev/")
    assert named(PretrainConfig) == ("the embedded synthetic data", "")
