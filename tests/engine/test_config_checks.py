"""Every setting of every section is checked at start-up. The table below holds one bad value per
field; a field added without a check, or without a row here, fails `test_table_covers_every_field`."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import validate
from polar.pretrain_recipe import PretrainConfig

ROOT = Path(__file__).parents[2]
A_FILE = str(Path(__file__))  # an existing file where a directory is expected

BAD = {
    "model.num_layers": 0, "model.hidden_size": 0, "model.num_attention_heads": 0,
    "model.num_query_groups": 0, "model.ffn_hidden_size": 0, "model.vocab_size": -1,
    "model.rotary_base": 0, "model.norm_epsilon": 0, "model.init_method_std": -0.5,
    "model.max_position_embeddings": 0, "model.add_qkv_bias": "sometimes", "model.rope_scaling": "longrope",
    "model.rope_scaling_factor": 0, "model.rope_low_freq_factor": 0, "model.rope_high_freq_factor": -1,
    "model.rope_original_max_position_embeddings": 0, "model.rope_beta_fast": 0, "model.rope_beta_slow": -1,
    "model.rope_attention_factor": 0, "model.rope_mscale": -1, "model.rope_mscale_all_dim": 0,
    "model.rope_truncate": "sometimes", "model.make_vocab_size_divisible_by": 0, "model.transformer_impl": "te",
    "parallel.tp": 0, "parallel.pp": 0, "parallel.vpp": 1, "parallel.sequence_parallel": "maybe",
    "parallel.distributed_optimizer": 2, "parallel.overlap_grad_reduce": "soon",
    "parallel.overlap_param_gather": "later", "parallel.timeout_minutes": 0,
    "train.steps": -1, "train.global_batch": 0, "train.micro_batch": 0, "train.lr": -1e-3,
    "train.min_lr_ratio": 1.5, "train.warmup_steps": -1, "train.weight_decay": -0.1,
    "train.adam_beta1": 1.0, "train.adam_beta2": -0.1, "train.adam_eps": 0, "train.grad_clip": -1,
    "train.loss": "hinge", "train.aux_lm_weight": -1, "train.precision": "fp8", "train.seed": -1,
    "train.attention_backend": "flash", "train.kernels": "fast", "train.time_limit_s": -1,
    "train.exit_at_step": -1, "train.eval_interval": -1, "train.max_nonfinite_steps": 0,
    "train.fp8": "e4m3", "train.recompute": "all", "train.recompute_num_layers": 0,
    "train.profile": "nvtx", "train.profile_start": 0, "train.profile_end": 1, "train.profile_ranks": [-1],
    "train.memory_snapshot": "sometimes",
    "data.seq_length": 1, "data.packing": "random", "data.path": "/nonexistent/dataset",
    "data.eval_path": "/nonexistent/eval",
    "checkpoint.dir": A_FILE, "checkpoint.save_interval": -1, "checkpoint.resume": "maybe",
    "checkpoint.init_from": "/nonexistent/checkpoint", "checkpoint.keep": -1, "checkpoint.save_at_end": "rarely",
    "checkpoint.optimizer_format": "everything", "checkpoint.async_save": "later", "checkpoint.lock_wait_s": -1,
    "train.stop_file": "/",
    "log.interval": 0, "log.tensorboard": "loud", "log.metrics_file": "often", "log.wandb_project": "a/b",
    # a run's name is fine alone: without a project it names nothing
    "log.wandb_name": "mine", "log.wandb_entity": "team#1",
    "synthetic.seed": -1, "synthetic.train_policies": 1, "synthetic.held_out_policies": 1,
    "synthetic.train_triplets": 0, "synthetic.eval_triplets": 0, "synthetic.prompts": 0,
    "synthetic.wrapper": "chat", "synthetic.eval_seen": "maybe",
    "run_dir": A_FILE,
}
# values that are fine for their type but meaningless: they must stop the run too (the review's list)
EXTRA_BAD = {"model.rotary_base": "nan", "train.lr": "inf", "run_dir": "''",
             # a window that ends where it starts (train.profile_start's default is 10); a rank named twice
             "train.profile_end": 10, "train.profile_ranks": "[0, 0]"}


def leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from leaf_fields(type(default), name + ".")
        else:
            yield name


def test_table_covers_every_field():
    assert set(leaf_fields(PretrainConfig)) == set(BAD)


def test_every_field_declares_a_check_and_the_defaults_pass():
    validate(PretrainConfig())


def test_a_field_without_a_check_is_refused():
    @dataclasses.dataclass
    class Unchecked:
        x: int = 1

    with pytest.raises(TypeError, match="config field x declares no check"):
        validate(Unchecked())


def _value(v):
    return "''" if v == "" else str(v)


@pytest.mark.parametrize("key", sorted(BAD) + [f"{k}#extra" for k in sorted(EXTRA_BAD)])
def test_each_bad_setting_stops_at_start_up(key, tmp_path, capsys):
    """In-process (no process group is made before the checks): exit code 2, one `config error:`
    line that names the setting, nothing run (no run directory written)."""
    from engine.pretrain import main

    name = key.split("#")[0]
    value = EXTRA_BAD[name] if key.endswith("#extra") else BAD[name]
    run_dir = tmp_path / "run"
    args = [f"{name}={_value(value)}"] + ([] if name == "run_dir" else [f"run_dir={run_dir}"])
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, err
    assert name in lines[0], lines[0]
    assert not run_dir.exists()


def test_a_profiling_window_that_ends_before_it_starts_names_the_line_that_set_it(tmp_path):
    """train.profile_start and train.profile_end are each fine alone: the window [start, end) is checked
    once both are merged, and led by the file and line of the one given (the other kept its default)."""
    from engine.config import ConfigError
    from engine.config_load import load_config

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 100\n  profile: torch\n  profile_start: 40\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, str(path))
    assert str(err.value) == (f"{path}:4: train.profile_end=12 must be more than train.profile_start=40: the window "
                              "is the steps from profile_start up to, not including, profile_end")
    cfg = load_config(PretrainConfig, str(path), ["train.profile_end=42", "train.profile_ranks=all"])
    assert (cfg.train.profile_start, cfg.train.profile_end, cfg.train.profile_ranks) == (40, 42, "all")
    # YAML reads a bare `off` as false, which stands for off here
    assert load_config(PretrainConfig, str(path), ["train.profile=off", "train.profile_end=42"]).train.profile == "off"
    path.write_text("train:\n  profile: off\n  profile_ranks: [0, 8]\n")
    assert load_config(PretrainConfig, str(path)).train.profile_ranks == [0, 8]


def test_init_from_accepts_a_checkpoint_directory_or_a_step(tmp_path):
    from engine.config import ConfigError
    from engine.config_load import load_config

    ckpt = tmp_path / "ckpt"
    step = ckpt / "step_00000007"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (step / "metadata.json").write_text("{}")  # megatron's: without it the step is an incomplete copy
    (ckpt / "step_00000003.partial").mkdir()
    for path in (ckpt, step):
        cfg = load_config(PretrainConfig, None, [f"checkpoint.init_from={path}"])
        assert cfg.checkpoint.init_from == str(path)
    from engine.checkpoint import resolve

    assert resolve(str(ckpt)) == str(step) and resolve(str(step)) == str(step)
    with pytest.raises(ConfigError, match="checkpoint.init_from=.*neither a checkpoint directory"):
        load_config(PretrainConfig, None, [f"checkpoint.init_from={tmp_path}"])


@pytest.mark.parametrize("args", [["train.loss=hinge"], ["model.num_layers=0"], ["log.interval=0"]])
def test_every_rank_exits_with_2_and_only_rank_0_speaks(tmp_path, args):
    """The ranks of a 2-process job, started as torchrun would (RANK / WORLD_SIZE set), each run the
    checks before any process group: both exit with 2, one message in all."""
    script = str(ROOT / "engine" / "pretrain.py")
    procs = [subprocess.Popen([sys.executable, script, f"run_dir={tmp_path / 'run'}", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT="1", OMP_NUM_THREADS="1"))
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert outs[0][1].count("config error:") == 1 and "config error:" not in outs[1][1], outs
    assert all("Traceback" not in err for _, err in outs), outs
    assert not (tmp_path / "run").exists()


def test_under_torchrun_the_message_is_printed_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "engine" / "pretrain.py"), f"run_dir={tmp_path / 'run'}", "train.loss=hinge"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("config error: command line: train.loss='hinge'") == 1, proc.stderr[-3000:]
    assert "]: Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]  # torchrun's root cause: a worker's 2
    assert not (tmp_path / "run").exists()
