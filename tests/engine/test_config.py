import re

import pytest

from engine.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig, TrainConfig, load_config
from engine.runtime import validate_layout


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 5.0e-4\nmodel:\n  num_layers: 8\n")
    cfg = load_config(EngineConfig, str(f), ["train.lr=1e-5", "parallel.tp=2", "parallel.vpp=null"])
    assert cfg.train.lr == 1e-5 and cfg.model.num_layers == 8 and cfg.parallel.tp == 2
    assert cfg.parallel.vpp is None and cfg.train.steps == TrainConfig().steps


def test_base_file_is_inherited(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  hidden_size: 256\n  num_layers: 6\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  num_layers: 12\n")
    cfg = load_config(EngineConfig, str(tmp_path / "child.yaml"))
    assert cfg.model.hidden_size == 256 and cfg.model.num_layers == 12


@pytest.mark.parametrize("override,needle", [
    (["train.learning_rate=1"], "train.learning_rate"),
    (["optim.lr=1"], "optim"),
    (["train.steps=many"], "train.steps"),
    (["parallel.distributed_optimizer=maybe"], "parallel.distributed_optimizer"),
    (["train.lr"], "train.lr"),
])
def test_bad_settings_name_themselves(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(EngineConfig, None, override)


@pytest.mark.parametrize("model,par,train,world,needle", [
    (dict(num_attention_heads=6, num_query_groups=2, hidden_size=96), dict(tp=4), {}, 4, "parallel.tp=4"),
    ({}, dict(tp=2), {}, 3, "world size 3"),
    (dict(num_layers=3), dict(pp=2), {}, 2, "model.num_layers=3"),
    ({}, dict(pp=2, vpp=2), dict(global_batch=3), 2, "multiple of parallel.pp"),
    ({}, {}, dict(global_batch=6, micro_batch=4), 2, "train.global_batch=6"),
    (dict(num_query_groups=3), {}, {}, 1, "model.num_query_groups=3"),
])
def test_impossible_layouts_stop_with_the_setting(model, par, train, world, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate_layout(ModelConfig(**model), ParallelConfig(**par), TrainConfig(**train), world, 1024)


@pytest.mark.parametrize("par,seq_length,needle", [
    (dict(sequence_parallel=True), 64, "parallel.sequence_parallel=true needs parallel.tp > 1 (got parallel.tp=1)"),
    (dict(tp=2, sequence_parallel=True), 63,
     "parallel.sequence_parallel=true needs data.seq_length=63 divisible by parallel.tp=2"),
])
def test_sequence_parallel_refusals_name_the_settings(par, seq_length, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate_layout(ModelConfig(), ParallelConfig(**par), TrainConfig(), 2, seq_length)


def test_sequence_parallel_accepted_with_tp_dividing_the_sequence():
    assert validate_layout(ModelConfig(), ParallelConfig(tp=2, sequence_parallel=True), TrainConfig(), 4, 64) == 2
    # without sequence parallelism the sequence length is not constrained by tp
    assert validate_layout(ModelConfig(), ParallelConfig(tp=2), TrainConfig(), 2, 63) == 1
