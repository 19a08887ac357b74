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
    from tests.engine.wandb_records import finished_runs, history

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
    logged = history(finished_runs(tmp_path, 1)[0])
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


def test_check_config_refuses_a_bad_sigterm_repeat_window(capsys, monkeypatch, tmp_path):
    """POLAR_SIGTERM_REPEAT_S is read by fit (engine.stop_signal): a bad value was found only once every rank
    had built its model and loaded its data, each saying it; the start-up checks now refuse it, naming it."""
    from engine.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLAR_SIGTERM_REPEAT_S", "-1")
    assert main(["--check-config", "--config", "polar_1_8b"]) == 2
    err = capsys.readouterr().err
    assert "config error: POLAR_SIGTERM_REPEAT_S='-1': expected a positive number of seconds" in err, err
    monkeypatch.setenv("POLAR_SIGTERM_REPEAT_S", "30")
    assert main(["--check-config", "--config", "polar_1_8b"]) == 0


def test_check_config_names_a_directory_the_run_cannot_write_and_creates_none(capsys, monkeypatch, tmp_path):
    """Walking the README: `polar pretrain run_dir=X`, X under a file (or on a read-only mount), passed its
    start-up check (`config ok`) and launched torchrun, whose ranks then stopped with the run's config error
    and torchrun's failure report (exit 1). The check names it as the run does, and a run directory or
    checkpoint directory that does not exist yet is not created by it."""
    from engine.pretrain import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "run"
    assert main(["--check-config", f"run_dir={bad}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"config error: run_dir={bad} is not writable (NotADirectoryError" in err, err
    assert main(["--check-config", f"run_dir={tmp_path / 'run'}", f"checkpoint.dir={bad}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"config error: checkpoint directory {bad} is not writable (NotADirectoryError" in err, err
    assert main(["--check-config", f"run_dir={tmp_path / 'new' / 'run'}", *SMALL]) == 0
    assert "config ok" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


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


def test_a_restart_of_the_same_job_resumes_though_its_first_start_asked_for_a_new_run(launched):
    """checkpoint.resume=false refuses a directory holding checkpoints; a torchrun restart or SLURM
    requeue of that run found its own checkpoints there and stopped at start-up, ending the job the
    restart was to keep going. Another job's checkpoints stay refused, restart or not. (Runs in
    subprocesses: a training run inside a pytest worker meets the groups other test files left up.
    The first start is one of `launched`'s; the restart, a start of its own, is a process of its own.)"""
    from engine.config_load import load_config
    from engine.start_checks import check_checkpoints, resume_on_restart
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
