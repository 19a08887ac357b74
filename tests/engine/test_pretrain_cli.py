"""engine/pretrain.py stops at start-up with one clear message naming the bad setting.

Starting python, torch and megatron is most of a tiny run's time: the runs that need no process of their
own share one (the module's `launched`, tests/engine/entry_runs.py); a torchrun launch, a restart and a
program name as typed keep theirs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import metrics_file
from engine.config import ConfigError
from tests.engine import entry_runs

ROOT = Path(__file__).parents[2]
SMALL = ["synthetic.train_triplets=64", "synthetic.eval_triplets=16", "synthetic.prompts=50"]


def run(*args, nproc=1, tmp_path=None):  # a run in a process of its own
    cmd = [sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={tmp_path}", *SMALL, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


BAD_INPUT = [
    (["train.bogus=1"], 1, "unknown setting 'train.bogus'"),
    (["parallel.tp=3"], 1, "world size 1 is not divisible"),
    (["parallel.tp=2"], 2, "parallel.tp=2 does not divide model.num_query_groups=1"),
    (["data.seq_length=64"], 1, "data.seq_length"),
    (["model.vocab_size=100"], 1, "model.vocab_size=100"),
]
# the restart test's runs: a new run (checkpoint.resume=false) of a job that a restart names again
RESTART_ARGS = ["checkpoint.resume=false", "train.steps=2", "train.global_batch=2", "checkpoint.save_interval=1",
                "train.eval_interval=0"]
JOB = {"SLURM_JOB_ID": "4242", "TORCHELASTIC_RUN_ID": "4242"}  # the SLURM script names the rendezvous so
NOT_RESTARTED = {"TORCHELASTIC_RESTART_COUNT": None, "SLURM_RESTART_COUNT": None}


def main_with_a_full_disk(argv) -> int:
    """engine/pretrain.py's main with every checkpoint write failing as on a full disk."""
    import errno

    from megatron.core import dist_checkpointing

    from engine.pretrain import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    real, dist_checkpointing.save = dist_checkpointing.save, full
    try:
        return main(argv)
    finally:
        dist_checkpointing.save = real


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The module's runs that need no process of their own, one after the other in one: {name: (its
    run directory, its CompletedProcess)}. Each runs in its own directory, its run_dir unless given."""
    tmp = tmp_path_factory.mktemp("pretrain_cli")
    runs = []

    def add(name, *args, entry="engine.pretrain", env=None):
        (tmp / name).mkdir()
        runs.append(entry_runs.run(name, entry, f"run_dir={tmp / name}", *SMALL, *args, cwd=tmp / name, env=env))

    for i, (args, nproc, _) in enumerate(BAD_INPUT):
        if nproc == 1:
            add(f"bad_input{i}", *args)
    add("warmup", "train.steps=2", "train.warmup_steps=5", "train.lr=1e-3", "log.interval=1", "log.tensorboard=false",
        "model.num_layers=1", "train.eval_interval=1")
    add("exit_at_step", "train.steps=3", "train.exit_at_step=2", "train.eval_interval=2", "log.tensorboard=false",
        "model.num_layers=1")
    # a run, then the same command again: it resumes at its last step, trains nothing and evaluates again
    final = ["train.steps=2", "model.num_layers=1", "log.wandb_project=polar-test"]
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # no network here
    add("final", *final, env=offline)
    runs.append(entry_runs.run("final_again", "engine.pretrain", f"run_dir={tmp / 'final'}", *SMALL, *final,
                               cwd=tmp / "final", env=offline))
    add("full_disk", "train.steps=2", "checkpoint.save_interval=1", "model.num_layers=1", "log.tensorboard=false",
        entry="tests.engine.test_pretrain_cli:main_with_a_full_disk")
    add("unwritable", "train.steps=2", "model.num_layers=1", f"run_dir={tmp / 'unwritable' / 'a_file' / 'run'}")
    (tmp / "unwritable" / "a_file").write_text("")
    # the first start of the restart test's job, stopped after step 1 as a fault would
    add("restart", f"run_dir={tmp / 'restart' / 'run'}", *RESTART_ARGS, "train.exit_at_step=1",
        env={**JOB, **NOT_RESTARTED})
    done = entry_runs.launch(tmp, runs, "pretrain_cli", timeout=600)
    return {name: (tmp / name, proc) for name, proc in done.items()}


@pytest.mark.parametrize("args,nproc,needle", BAD_INPUT)
def test_bad_input_stops_with_one_message(tmp_path, launched, args, nproc, needle):
    if nproc > 1:
        proc = run(*args, "model.num_query_groups=1", nproc=nproc, tmp_path=tmp_path)
    else:
        proc = launched[f"bad_input{BAD_INPUT.index((args, nproc, needle))}"][1]
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("config error:") == 1, proc.stderr[-3000:]  # one message, from rank 0
    # no Python traceback from the training processes (torchrun adds its own failure summary,
    # while a worker's traceback would be printed with a "[rankN]:" prefix)
    if nproc == 1:
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:
        assert "]: Traceback" not in proc.stderr, proc.stderr[-3000:]


def _saved_step(run_dir: Path, state: dict) -> Path:
    import json

    from engine.checkpoint import STATE_FILE

    step = run_dir / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / STATE_FILE).write_text(json.dumps(state))
    return step


def test_a_new_run_into_a_used_checkpoint_directory_is_refused_at_start_up(tmp_path, capsys):
    """Its steps among the other run's: pruning and resume go by step number and mix the two runs."""
    from engine.pretrain import main

    step = _saved_step(tmp_path / "run", {"step": 4})
    assert main([f"run_dir={tmp_path / 'run'}", "checkpoint.resume=false", *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"config error: checkpoint.resume=false, but {step.parent} already holds checkpoints" in err, err
    assert "pick a new run_dir or checkpoint.dir" in err and f"checkpoint.init_from={step}" in err


def test_a_resume_with_changed_optimizer_settings_is_refused_at_start_up(tmp_path, capsys):
    from engine.pretrain import main

    step = _saved_step(tmp_path / "run", {"step": 4, "settings": {"train.lr": 0.123, "train.steps": 7},
                                          "loader": {"consumed_batches": 4, "global_batch": 3}})
    assert main([f"run_dir={tmp_path / 'run'}", "train.steps=9", "train.global_batch=8", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("config error:") == 1 and f"config error: resuming from {step}: train.lr=0.123 when saved" in err
    assert "train.steps=7 when saved, 9 now" in err and "train.global_batch=3 when saved, 8 now" in err, err
    assert f"checkpoint.init_from={step}" in err


def test_a_resume_into_another_model_shape_names_the_step_and_the_setting(tmp_path, capsys):
    import dataclasses

    from engine import checkpoint
    from engine.config import ModelConfig
    from engine.pretrain import main

    step = _saved_step(tmp_path / "run", {"step": 4})
    (step / checkpoint.MODEL_FILE).write_text(json.dumps({**dataclasses.asdict(ModelConfig()), "hidden_size": 96}))
    assert main([f"run_dir={tmp_path / 'run'}", "model.hidden_size=64", *SMALL]) == 2  # the user's own value
    err = capsys.readouterr().err
    assert (f"config error: {step}, the step this run resumes from (checkpoint.resume=true), holds a model with "
            "model.hidden_size=96") in err, err


def test_a_warmup_longer_than_the_run_is_reported_with_the_lr_it_reaches(launched):
    """Its summary also gives the training-only rates beside tokens_per_second, which divides by the
    whole fit (first step, evaluations, saves: a resumed GPU run read 7,431 tok/s where its lines showed
    ~9,600), and each set's best evaluation."""
    tmp_path, proc = launched["warmup"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("warning: train.warmup_steps=5 >= train.steps=2: the learning rate stops at 40% of train.lr=0.001 "
            "and never decays") in proc.stdout, proc.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    history = summary["history"]
    train = [r for r in history if "loss" in r and "eval" not in r]
    assert [r["lr"] for r in train] == pytest.approx([2e-4, 4e-4])
    # step 1's line is its warm-up alone: the figures are step 2's, the one window of training only
    assert train[0]["includes_warmup"] and "includes_warmup" not in train[1]
    assert summary["train_only_steps"] == 1 and summary["train_only_seconds"] == pytest.approx(train[1]["step_time_s"])
    assert summary["train_tokens_per_s"] == pytest.approx(train[1]["tokens_per_s"])
    assert summary["train_groups_per_s"] == pytest.approx(train[1]["triplets_per_s"])
    assert summary["tflops_per_s_per_rank"] == pytest.approx(train[1]["tflops_per_s"])
    assert summary["mfu"] is None  # no peak on a CPU
    # evaluated at step 1 (train.eval_interval) and at the end, step 2
    for name in ("held_out", "seen"):
        seen = [(r["step"], r["pair_accuracy"]) for r in history if r.get("eval") == name]
        seen.append((2, summary["evaluations"][name]["pair_accuracy"]))
        assert [s for s, _ in seen] == [1, 2]
        best = max(acc for _, acc in seen)
        at = next(s for s, acc in seen if acc == best)
        assert summary["best_eval"][name] == {"step": at, "pair_accuracy": best}, summary["best_eval"]


def test_a_run_ending_at_exit_at_step_on_an_evaluation_step_evaluates_once(launched):
    """fit evaluated step 2 (train.eval_interval) and its checkpoint keeps those rows; the final evaluation
    evaluated the same weights again (minutes per set at scale): it takes fit's results."""
    tmp_path, proc = launched["exit_at_step"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "exit_at_step" and summary["steps"] == 2
    for name in ("held_out", "seen"):
        rows = [r for r in summary["history"] if r.get("eval") == name]
        assert [r["step"] for r in rows] == [2], rows
        assert summary["evaluations"][name] == {k: v for k, v in rows[0].items() if k not in ("step", "eval")}
    assert "evaluating ..." not in proc.stdout, proc.stdout[-3000:]
    # RUN_DIR/metrics.jsonl: the periodic line, and the final one taking its figures (it reached summary.json
    # only); the periodic evaluations stay one per evaluation step
    rows = [r for r in metrics_file.read(tmp_path / metrics_file.NAME) if r["kind"] == "eval"]
    assert [(r["set"], r["step"], r.get("final", False)) for r in rows] == \
        [("held_out", 2, False), ("seen", 2, False), ("held_out", 2, True), ("seen", 2, True)], rows
    for r in rows:
        assert {k: r[k] for k in summary["evaluations"][r["set"]]} == summary["evaluations"][r["set"]], r


def test_the_final_evaluation_reaches_the_metrics_file_tensorboard_and_wandb_once(launched):
    """Where users look for the run's headline figure: it was in summary.json alone. Marked final, at the last
    trained step; the same command after the run had finished (a restart after a stop during the final save,
    say) resumes at that step, trains nothing and evaluates again: the file still holds one final line a set."""
    from tests.engine.test_trainer import _scalars
    from tests.engine.wandb_records import history, offline_runs

    FINAL = ("loss", "pair_accuracy", "lm_loss")  # the periodic evaluation's scalars (the auxiliary LM loss on)

    tmp_path, first = launched["final"]
    again = launched["final_again"][1]
    assert first.returncode == 0 and again.returncode == 0, first.stderr[-3000:] + again.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_at_step"] == 2 and summary["steps"] == 2, summary
    evaluations = summary["evaluations"]
    assert set(evaluations) == {"held_out", "seen"}, evaluations
    rows = metrics_file.read(tmp_path / metrics_file.NAME)
    assert [(r["kind"], r.get("set"), r["step"], r.get("final", False)) for r in rows] == \
        [("train", None, 2, False), ("eval", "held_out", 2, True), ("eval", "seen", 2, True)], rows
    for r in rows[1:]:
        assert {k: r[k] for k in evaluations[r["set"]]} == evaluations[r["set"]], r
    # TensorBoard: final_SET/ scalars at step 2, apart from the periodic eval_SET/ curves, once: the second
    # start's (a second point at the step, which TensorBoard's Python loader showed beside the first); the
    # step's training point, which its writer drops with the first start's final ones, is written again
    for name, result in evaluations.items():
        for k in (k for k in FINAL if k in result):
            points = _scalars(tmp_path / "tensorboard", f"final_{name}/{k}")
            assert points == [(2, pytest.approx(result[k]))], (name, k, points)
    train = [r for r in summary["history"] if "eval" not in r]
    for k in ("loss", "lr", "grad_norm"):
        assert _scalars(tmp_path / "tensorboard", f"train/{k}") == [(r["step"], pytest.approx(r[k])) for r in train], k
    # wandb: the same keys at the last logged step (its steps stay increasing)
    logged = history(offline_runs(tmp_path)[0])
    assert [r["_step"] for r in logged] == [2], logged
    assert {k: v for k, v in logged[0].items() if k.startswith("final_")} == \
        {f"final_{name}/{k}": result[k] for name, result in evaluations.items() for k in FINAL if k in result}


def test_check_config_warns_of_a_warmup_the_run_never_finishes(capsys, monkeypatch, tmp_path):
    """--check-config said only 'config ok' for a preset's 3000 warm-up steps kept by train.steps=2000
    (the learning rate then never reaches train.lr nor decays); the run itself warned."""
    from engine.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.chdir(tmp_path)
    assert main(["--check-config", "--config", "polar_1_8b", "train.steps=2000"]) == 0
    out = capsys.readouterr().out
    assert ("warning: train.warmup_steps=3000 >= train.steps=2000: the learning rate stops at 67% of "
            "train.lr=1.4e-05 and never decays") in out and "config ok" in out, out
    assert main(["--check-config", "--config", "polar_1_8b", "train.steps=3000"]) == 0
    assert "reaches train.lr=1.4e-05 only at the last step and never decays" in capsys.readouterr().out
    assert main(["--check-config", "--config", "polar_1_8b", "train.steps=3001"]) == 0
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("launch,prog", [
    (["engine/pretrain.py"], "engine/pretrain.py"),
    (["-m", "engine.pretrain"], f"{Path(sys.executable).name} -m engine.pretrain"),
    ([str(Path(sys.executable).with_name("polar")), "pretrain"], "polar pretrain"),  # the installed command
    (["-m", "polar.cli", "pretrain"], "polar pretrain"),
    (["-m", "polar.cli", "pretrain", "--print-config"], "polar pretrain"),  # one process, no check first
], ids=["script", "module", "polar", "polar-module", "polar-print-config"])
def test_a_misspelt_option_is_named_under_the_program_as_called_with_the_option_meant(launch, prog):
    """`polar pretrain --confg x` printed `usage: pretrain.py ...` and `pretrain.py: error: unrecognized
    arguments: --confg`: neither the command the user typed nor the option meant."""
    cmd = launch if launch[0].endswith("polar") else [sys.executable, *launch]
    from engine.called_as import COMMAND_ENV

    proc = subprocess.run([*cmd, "--confg", "x", "--chek-config", "--bogus"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != COMMAND_ENV})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"usage: {prog} [-h] [--config CONFIG]"), proc.stderr
    assert proc.stderr.endswith(f"\n{prog}: error: unrecognized arguments: --confg (did you mean --config?) "
                                "--chek-config (did you mean --check-config?) --bogus\n"), proc.stderr


def test_settings_may_come_before_and_after_the_options(capsys):
    from engine.pretrain import main

    assert main(["train.lr=1e-4", "--config", "tiny_cpu", "run_dir=somewhere", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0001" in out and "run_dir: somewhere" in out, out


def _step_of_model(step: Path, **model) -> Path:
    """A step of the default run's model (tiny_cpu, the byte tokenizer's vocabulary) but for `model`."""
    import dataclasses

    from engine import checkpoint
    from engine.config_load import load_config
    from polar.presets import resolve_config
    from polar.pretrain_recipe import PretrainConfig

    default = dataclasses.asdict(load_config(PretrainConfig, resolve_config("tiny_cpu")).model)
    step.mkdir(parents=True)
    (step / checkpoint.STATE_FILE).write_text(json.dumps({"step": 4}))
    (step / checkpoint.MODEL_FILE).write_text(json.dumps({**default, "vocab_size": 260, **model}))
    return step


def test_a_resume_into_another_model_offers_a_new_run_and_says_it_wins_over_init_from(tmp_path, capsys):
    """Pre-training from an imported checkpoint in a run_dir that holds another run: the run resumes
    that run (init_from is never read), so setting the model back is only one way out."""
    from engine.pretrain import main

    step = _step_of_model(tmp_path / "run" / "checkpoints" / "step_00000004", num_layers=4)
    base = _step_of_model(tmp_path / "base" / "step_00000000", num_layers=2)
    assert main([f"run_dir={tmp_path / 'run'}", "model.num_layers=2", *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"set model.num_layers=4 (every model.* setting it was saved with is in {step / 'model.json'}), or " \
           "start a new run (a new run_dir=..." in err, err
    assert "init_from" not in err, err
    assert main([f"run_dir={tmp_path / 'run'}", "model.num_layers=2", f"checkpoint.init_from={base}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("config error:") == 1 and f"config error: {step}, the step this run resumes from" in err, err
    assert (f"checkpoint.init_from={base} is not loaded: a resume from the run's checkpoints "
            f"({step.parent}) takes precedence over it") in err, err


@pytest.mark.parametrize("setting,needle", [
    ("model.transformer_impl=transformer_engine", "model.transformer_impl=transformer_engine needs a CUDA GPU"),
    ("train.fp8=delayed", "train.fp8=delayed is a Transformer Engine recipe"),
    ("train.kernels=cuda", "train.kernels=cuda needs a CUDA GPU"),
    ("train.kernels=triton", "train.kernels=triton needs a CUDA GPU"),
    ("train.attention_backend=triton", "train.attention_backend=triton needs a CUDA GPU"),
    ("train.profile=cuda", "train.profile=cuda starts and stops the CUDA profiler (for nsys), and this run has no"),
    ("train.memory_snapshot=true", "train.memory_snapshot=true records the CUDA caching allocator's history"),
])
@pytest.mark.parametrize("check_config", [True, False])
def test_a_setting_this_machine_cannot_run_is_named_before_the_resume_is_compared(tmp_path, capsys, monkeypatch,
                                                                                  setting, needle, check_config):
    """The resumed step's model differs from every setting here: what cannot run on this machine at
    all is reported first (asking to set it back to resume would be no help)."""
    import torch

    from engine.pretrain import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _step_of_model(tmp_path / "run" / "checkpoints" / "step_00000004", num_layers=4, hidden_size=96)
    args = [f"run_dir={tmp_path / 'run'}", setting, *SMALL] + (["--check-config"] if check_config else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("config error:") == 1 and needle in err and "resumes from" not in err, err


def test_a_save_that_fails_during_training_stops_with_one_message_and_no_traceback(launched):
    """A full disk at a save during training (main_with_a_full_disk): the error names the checkpoint and
    what was kept, as a message (exit 1: not the settings' fault), not a traceback from every rank."""
    tmp_path, proc = launched["full_disk"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error: writing the checkpoint") == 1, proc.stderr[-3000:]
    assert (f"error: writing the checkpoint {tmp_path / 'checkpoints' / 'step_00000001.partial'} failed (OSError: "
            "[Errno 28] No space left on device); no complete checkpoint was written yet") in proc.stderr


def test_a_run_directory_that_cannot_be_written_is_named_at_start_up(launched):
    """A file in the run directory's path (or a read-only mount): one config error naming it, before
    training, not a traceback."""
    tmp_path, proc = launched["unwritable"]
    run_dir = tmp_path / "a_file" / "run"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("config error:") == 1, proc.stderr[-3000:]
    assert f"config error: run_dir={run_dir} is not writable (NotADirectoryError" in proc.stderr, proc.stderr[-3000:]


def test_a_resume_into_a_model_that_computes_otherwise_is_refused(tmp_path, capsys):
    """The same weight shapes, another function: RoPE base and scaling and the norms' epsilon change
    what the resumed weights compute, so a resume refuses them as it does a shape (a run started from
    the weights with checkpoint.init_from may change them)."""
    from engine.pretrain import main

    step = _step_of_model(tmp_path / "run" / "checkpoints" / "step_00000004", rotary_base=500000.0,
                          norm_epsilon=1e-6)
    # given by the user (left out, they are the checkpoint's: test_a_run_builds_the_model_its_checkpoint_holds)
    assert main([f"run_dir={tmp_path / 'run'}", *SMALL, "model.rotary_base=10000", "model.norm_epsilon=1e-5",
                 "--check-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("config error:") == 1 and f"config error: {step}, the step this run resumes from" in err, err
    assert "model.rotary_base=500000.0, model.norm_epsilon=1e-06 (recorded in" in err, err
    assert "set model.rotary_base=500000.0 model.norm_epsilon=1e-06" in err, err




@pytest.mark.parametrize("how", ["resume", "init_from"])
def test_a_run_builds_the_model_its_checkpoint_holds(tmp_path, capsys, how):
    """`checkpoint.init_from=DIR` (or the run's own checkpoint it resumes) with the default preset:
    tiny_cpu's model (hidden 64, RoPE base 1e4) was refused against the checkpoint's (hidden 96, RoPE
    base 5e5), with the settings to type; a preset's value is no choice of the user's, so the
    checkpoint's are taken, said once, and shown by --print-config. A value the user gives is kept
    and still checked against the checkpoint."""
    from engine.pretrain import main

    where = tmp_path / "run" / "checkpoints" if how == "resume" else tmp_path / "base"
    step = _step_of_model(where / "step_00000004", hidden_size=96, ffn_hidden_size=256, rotary_base=500000.0)
    args = [f"run_dir={tmp_path / 'run'}", *SMALL] + ([f"checkpoint.init_from={where}"] if how == "init_from" else [])
    # the vocabulary (model.vocab_size=0: the tokenizer's) is no change on resume: test_a_resume_notes_no_model_...
    note = (f"model settings from {step / 'model.json'}: model.hidden_size=96, model.ffn_hidden_size=256, "
            + ("model.vocab_size=260, " if how == "init_from" else "")
            + "model.rotary_base=500000.0 (a model.* setting given in a --config file or on the command line is kept)")
    code = main([*args, "--check-config"])
    out, err = capsys.readouterr()
    assert out.count(note) == 1, out
    # past the model checks: a resume then reads the step back, which holds no weights here
    assert (code, err) == (0, "") if how == "init_from" else (code == 2 and "does not read back" in err), err
    assert main([*args, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# {note}\n") and "hidden_size: 96" in printed and "rotary_base: 500000.0" in printed
    assert main([*args, "model.hidden_size=64", "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "holds a model with model.hidden_size=96 (recorded in" in err and "ffn_hidden_size" not in err, err
    # a file of the user's is the user's choice too; the preset under it is not
    (tmp_path / "mine.yaml").write_text("base: tiny_cpu\nmodel:\n  ffn_hidden_size: 176\n")
    assert main([*args, "--config", str(tmp_path / "mine.yaml"), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "holds a model with model.ffn_hidden_size=256 (recorded in" in err and "hidden_size=96" not in err, err


def test_a_resume_notes_no_model_setting_where_only_the_vocabulary_was_resolved(tmp_path):
    """A run with model.vocab_size=0 (the tokenizer's; tiny_cpu's) records the size it resolved (the byte
    tokenizer's 260): every resume of it said 'model settings from ...: model.vocab_size=260', comparing the
    0 with it, though nothing had changed. The size is still taken (the model is built with it), and a
    setting that does differ is still said."""
    from engine.config_load import load_config
    from engine.pretrain import model_from_checkpoint
    from polar.presets import resolve_config
    from polar.pretrain_recipe import PretrainConfig

    for name, model, said in (("same", {}, ""), ("other", {"norm_epsilon": 1e-6}, "model.norm_epsilon=1e-06 (")):
        step = _step_of_model(tmp_path / name / "checkpoints" / "step_00000004", **model)
        sources: dict = {}
        cfg = load_config(PretrainConfig, resolve_config("tiny_cpu"), [f"run_dir={tmp_path / name}"], sources=sources)
        assert cfg.model.vocab_size == 0
        note = model_from_checkpoint(cfg, sources)
        assert note.startswith(f"model settings from {step / 'model.json'}: {said}") if said else note == "", note
        assert "vocab_size" not in note and cfg.model.vocab_size == 260, note


def test_a_restart_of_the_same_job_resumes_though_its_first_start_asked_for_a_new_run(launched):
    """checkpoint.resume=false refuses a directory holding checkpoints; a torchrun restart or SLURM
    requeue of that run found its own checkpoints there and stopped at start-up, ending the job the
    restart was to keep going. Another job's checkpoints stay refused, restart or not. (Runs in
    subprocesses: a training run inside a pytest worker meets the groups other test files left up.
    The first start is one of `launched`'s; the restart, a start of its own, is a process of its own.)"""
    from engine.config_load import load_config
    from engine.pretrain import check_checkpoints, resume_on_restart
    from polar.pretrain_recipe import PretrainConfig

    tmp_path, first = launched["restart"]
    args, job = RESTART_ARGS, JOB
    clean = {k: v for k, v in os.environ.items() if k not in NOT_RESTARTED}

    def start(*extra, **env):
        cmd = [sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={tmp_path / 'run'}", *SMALL, *args,
               *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**clean, "OMP_NUM_THREADS": "1", **job, **env})

    assert first.returncode == 0, first.stderr[-3000:]  # the first start, stopped after step 1

    def cfg():
        return load_config(PretrainConfig, None, [f"run_dir={tmp_path / 'run'}", *args])

    by_hand = cfg()
    assert resume_on_restart(by_hand, env=job) == ""  # the same command started again by hand: still refused
    with pytest.raises(ConfigError, match="checkpoint.resume=false, but"):
        check_checkpoints(by_hand)
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        restarted = cfg()
        assert f"this is a restart of the same job ({var}=1; " in resume_on_restart(restarted, env={**job, var: "1"})
        assert restarted.checkpoint.resume
    others = ({"SLURM_JOB_ID": "4243", "TORCHELASTIC_RUN_ID": "4243"}, {**job, "TORCHELASTIC_RUN_ID": "other"},
              {"TORCHELASTIC_RUN_ID": "none"}, {})
    for other in others:  # not the job that wrote them
        assert resume_on_restart(cfg(), env={**other, "TORCHELASTIC_RESTART_COUNT": "1"}) == "", other
    restart = start(TORCHELASTIC_RESTART_COUNT="1")
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "this is a restart of the same job (TORCHELASTIC_RESTART_COUNT=1; " in restart.stdout
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert resumed["resumed_at_step"] == 1
    # its one step is the resumed fit's first, its warm-up: nothing is left to measure training alone
    assert resumed["train_only_steps"] == 0 and resumed["train_tokens_per_s"] is None and resumed["mfu"] is None


@pytest.mark.parametrize("call, resume, env", [
    ("main", "true", {}),  # check_checkpoints
    ("main", "false", {"TORCHELASTIC_RESTART_COUNT": "1"}),  # resume_on_restart
    ("prepare_checked_data", "true", {}),  # the run's own data check, which --check-config makes too
])
@pytest.mark.parametrize("module, name, refused", [("io", "open", "latest"),
                                                  ("os", "stat", "step_00000002/trainer_state.json")])
def test_a_checkpoint_directory_that_cannot_be_read_at_start_up_is_one_config_error(tmp_path, capsys, monkeypatch,
                                                                                   call, resume, env,
                                                                                   module, name, refused):
    """Every rank looks for the newest checkpoint at start-up, before any process group: a `latest`
    marker, or the state file of the step it names, that the run may not read was a PermissionError
    traceback (only a config error was caught); now one config error names the checkpoint directory
    and the file system's error, exit 2. The OS call a checkpoint directory's reader makes is refused for
    the one path as a file system would refuse it (the tests run as root, whom chmod does not stop); then
    engine/pretrain.py's main, or the one start-up check that the command line reaches only after another
    (all before any process group: in this process)."""
    import errno

    from engine import pretrain
    from engine.config_load import load_config
    from engine.rank_stop import stop_alike
    from polar import pretrain_recipe
    from tests.engine.test_checkpoint import _step

    root = tmp_path / "run" / "checkpoints"
    for n in (1, 2):
        _step(root, n)
    (root / "latest").write_text("step_00000002")
    real = getattr(sys.modules[module], name)

    def refusing(path, *args, **kwargs):
        if not isinstance(path, int) and os.fsdecode(path).endswith(f"{os.sep}{refused}"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real(path, *args, **kwargs)

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = [f"run_dir={tmp_path / 'run'}", *SMALL, f"checkpoint.resume={resume}"]
    monkeypatch.setattr(sys.modules[module], name, refusing)
    if call == "main":
        code = pretrain.main(argv)
    else:
        try:
            pretrain.prepare_checked_data(load_config(pretrain_recipe.PretrainConfig, None, argv), pretrain_recipe)
            code = 0
        except ConfigError as e:
            code = stop_alike(0, f"config error: {e}", pretrain.EXIT_CONFIG)
    monkeypatch.setattr(sys.modules[module], name, real)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err == (
        f"config error: {root}: the newest checkpoint could not be looked for (PermissionError: [Errno 13] "
        f"Permission denied: '{root / refused}'); make the checkpoint directory and its files readable by the run, "
        f"then run it again\n"), err[-3000:]


@pytest.mark.parametrize("error, said", [
    ("ConfigError", "config error: a group is longer than data.seq_length"),
    ("NonFiniteError", "error: a group is longer than data.seq_length"),
    ("DatasetFormatError", "data error on rank 0: a group is longer than data.seq_length; `polar data stats"),
])
def test_the_checkpoint_a_stopped_run_kept_is_said_after_its_error(tmp_path, capsys, monkeypatch, error, said):
    """An error raised while a checkpoint was written in the background carries a note naming the step
    the run kept (engine.trainer.Trainer.fit); the one-line errors the entry point prints keep it."""
    import engine.pretrain as pretrain
    from engine.shard_format import DatasetFormatError
    from engine.nonfinite_steps import NonFiniteError

    kinds = {"ConfigError": ConfigError, "NonFiniteError": NonFiniteError, "DatasetFormatError": DatasetFormatError}

    def run(cfg, recipe):
        e = kinds[error]("a group is longer than data.seq_length")
        e.add_note("the checkpoint kept: step_00000002 (the write pending at the error was finished)")
        raise e

    monkeypatch.setattr(pretrain, "run", run)
    assert pretrain.main([f"run_dir={tmp_path / 'run'}", *SMALL]) in (1, 2, 3)
    err = capsys.readouterr().err
    assert said in err and err.rstrip().endswith(
        "\nthe checkpoint kept: step_00000002 (the write pending at the error was finished)"), err


def test_a_token_id_outside_the_vocabulary_is_not_sent_to_an_index_check(tmp_path, capsys, monkeypatch):
    """`polar data stats` and --check-config check a dataset's index, never its tokens: walking the README, a
    .bin whose ids were poked past the vocabulary passed both, and the run then stopped on it saying that
    they check every shard. That pointer stays for a damaged index only (test_indexed_dataset_checks)."""
    import engine.pretrain as pretrain
    from engine.shard_format import DatasetTokenError

    def run(cfg, recipe):
        raise DatasetTokenError("ds/p.bin: packed sequence 0: token id 65535 at token 5 of its 9, outside 0..259")

    monkeypatch.setattr(pretrain, "run", run)
    assert pretrain.main([f"run_dir={tmp_path / 'run'}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "data error on rank 0: ds/p.bin: packed sequence 0: token id 65535" in err, err
    assert "polar data stats" not in err and "--check-config" not in err, err


def test_a_misspelt_option_is_matched_without_its_dashes():
    """`--tp 2` (a setting's name, not an option) was told `(did you mean --help?)`: the shared dashes
    alone made it near; polar's own line for an option before the command had compared without them."""
    from engine.pretrain import unrecognized

    options = ["--help", "--config", "--print-config", "--check-config"]
    assert unrecognized(["--tp", "2"], options) == "unrecognized arguments: --tp 2"
    assert unrecognized(["--confg=x"], options) == "unrecognized arguments: --confg=x (did you mean --config?)"
