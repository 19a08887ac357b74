"""engine/pretrain.py's start-up against the checkpoints it resumes or starts from, in this process: a new run into
a used checkpoint directory, a resume with other optimizer or model settings (named with the step and the
setting to type), the model settings taken from a checkpoint, a checkpoint directory it may not read. The
start-up errors of runs of their own: test_pretrain_cli.py."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError
from tests.engine.test_pretrain_cli import SMALL


def _saved_step(run_dir: Path, state: dict) -> Path:
    import json

    from engine.checkpoint import STATE_FILE

    step = run_dir / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / STATE_FILE).write_text(json.dumps(state))
    (step / "metadata.json").write_text("{}")  # megatron's: without it the step is an incomplete copy
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
    (step / checkpoint.MEGATRON_FILE).write_text("{}")
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
    from engine.start_checks import model_from_checkpoint
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


@pytest.mark.parametrize("aux_lm_weight", ["0", "0.1"])
def test_a_resume_from_an_incomplete_copy_of_a_step_is_refused_at_start_up(tmp_path, capsys, aux_lm_weight):
    """The newest step holding trainer_state.json but not megatron's metadata.json (a copy of the run that
    did not finish): the start-up checks passed it, and the run's load crashed in megatron with a traceback
    (a run with an LM head: its start-up check named the step damaged). Refused before launch, naming the
    file it lacks and the step there is then to resume from."""
    from engine.pretrain import main

    step = _saved_step(tmp_path / "run", {"step": 4})
    (step / "metadata.json").unlink()
    before = step.with_name("step_00000002")
    before.mkdir()
    (before / "trainer_state.json").write_text('{"step": 2}')
    (before / "metadata.json").write_text("{}")
    assert main([f"run_dir={tmp_path / 'run'}", "--check-config", f"train.aux_lm_weight={aux_lm_weight}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("config error:") == 1, err
    assert (f"config error: {step}: an incomplete copy of a checkpoint step: it holds trainer_state.json but not "
            f"metadata.json") in err and f"the newest complete step there is then {before}" in err, err
