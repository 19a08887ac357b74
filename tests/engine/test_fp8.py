"""engine/fp8.py: Transformer Engine only when asked for, FP8 recipes refused where they cannot run,
and megatron's own FP8 / recomputation settings reaching TransformerConfig."""
from __future__ import annotations

import sys

import pytest
import torch

from engine.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig, TrainConfig
from engine.config_load import load_config
from engine.fp8 import check_backbone, check_fp8, te_fp8_settings
from engine.runtime import Runtime

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64,
            vocab_size=64)


@pytest.fixture
def fake_transformer_engine(tmp_path, monkeypatch):
    """An importable `transformer_engine` (with `.pytorch`) that does nothing: the situation in
    which the engine used to pick the TE layer spec silently."""
    pkg = tmp_path / "transformer_engine"
    (pkg / "pytorch").mkdir(parents=True)
    (pkg / "__init__.py").write_text("IMPORTED = True\n")
    (pkg / "pytorch" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    import transformer_engine

    assert transformer_engine.IMPORTED
    yield
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        sys.modules.pop(name)


def test_transformer_engine_is_used_only_when_asked(fake_transformer_engine):
    assert check_backbone(ModelConfig(), is_cuda=True) is False  # the default, even on a GPU with TE
    assert check_backbone(ModelConfig(transformer_impl="transformer_engine"), is_cuda=True) is True


def test_importable_transformer_engine_leaves_the_built_model_local(fake_transformer_engine, runtime):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from engine.parallelize import build_model

    chunks, config = build_model(ModelConfig(**TINY), ParallelConfig(), TrainConfig(), runtime)
    classes = {type(m) for m in chunks[0].modules()}
    assert ColumnParallelLinear in classes and RowParallelLinear in classes
    assert not any(c.__module__.startswith(("transformer_engine", "megatron.core.extensions")) for c in classes)
    assert config.fp8 is None


def test_transformer_engine_refused_without_a_gpu_or_without_te(monkeypatch):
    te = ModelConfig(transformer_impl="transformer_engine")
    with pytest.raises(ConfigError, match="model.transformer_impl=transformer_engine needs a CUDA GPU"):
        check_backbone(te, is_cuda=False)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails
    with pytest.raises(ConfigError, match="model.transformer_impl=transformer_engine: transformer_engine does not "
                                          "import .*model.transformer_impl=local"):
        check_backbone(te, is_cuda=True)


@pytest.mark.parametrize("args,message", [
    (["model.transformer_impl=transformer_engine"], "model.transformer_impl=transformer_engine needs a CUDA GPU"),
    (["train.fp8=delayed"], "train.fp8=delayed is a Transformer Engine recipe"),
    (["train.fp8=mxfp8"], "train.fp8=mxfp8 is a Transformer Engine recipe"),
    (["train.fp8=tensorwise", "model.hidden_size=72", "model.num_attention_heads=4", "model.num_query_groups=2"],
     "train.fp8=tensorwise: FP8 matrix products need .*model.hidden_size = 72"),
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"],
     "parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true"),
])
def test_refused_at_start_up_on_this_machine(tmp_path, capsys, args, message):
    """Through the entry script, before any process group: exit 2 and one `config error:` line."""
    import re

    from engine.pretrain import main

    assert main([f"run_dir={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("impl,recipe,capability,message", [
    ("local", "tensorwise", None, None),  # CPU: torch's CPU _scaled_mm (how it is tested)
    ("local", "rowwise", (9, 0), None),
    ("local", "tensorwise", (8, 9), None),
    ("local", "rowwise", (8, 9), "train.fp8=rowwise needs a GPU of compute capability 9.0 or newer; this one is 8.9"),
    ("local", "tensorwise", (8, 0), "compute capability 8.9 or newer; this one is 8.0"),
    ("local", "delayed", (9, 0), "train.fp8=delayed is a Transformer Engine recipe"),
    ("transformer_engine", "delayed", (9, 0), None),
    ("transformer_engine", "tensorwise", (9, 0), None),
    ("transformer_engine", "rowwise", (9, 0), "Transformer Engine has no per-row recipe"),
    ("transformer_engine", "mxfp8", (9, 0), "train.fp8=mxfp8 needs a GPU of compute capability 10.0"),
    ("transformer_engine", "mxfp8", (10, 0), None),
    ("local", "off", (7, 0), None),
])
def test_fp8_recipes_against_implementation_and_gpu(impl, recipe, capability, message):
    model = ModelConfig(transformer_impl=impl, **TINY)
    train = TrainConfig(fp8=recipe)
    if message is None:
        check_fp8(model, ParallelConfig(), train, impl == "transformer_engine", capability)
    else:
        with pytest.raises(ConfigError, match=message):
            check_fp8(model, ParallelConfig(), train, impl == "transformer_engine", capability)


def test_local_fp8_alignment_is_per_tensor_parallel_shard():
    """model.ffn_hidden_size=80 is a multiple of 16 on one rank; at TP2 each rank holds 40."""
    model = ModelConfig(**{**TINY, "ffn_hidden_size": 80})
    check_fp8(model, ParallelConfig(), TrainConfig(fp8="rowwise"), False, None)
    with pytest.raises(ConfigError, match=r"model.ffn_hidden_size / parallel.tp = 40"):
        check_fp8(model, ParallelConfig(tp=2), TrainConfig(fp8="rowwise"), False, None)


def test_off_reads_as_off_in_yaml_and_overrides(tmp_path):
    """YAML 1.1 reads a bare `off` as false; the setting takes it as "off", and refuses true."""
    assert load_config(EngineConfig, None, ["train.fp8=off"]).train.fp8 == "off"
    (tmp_path / "c.yaml").write_text("train:\n  fp8: off\n")
    assert load_config(EngineConfig, str(tmp_path / "c.yaml")).train.fp8 == "off"
    assert load_config(EngineConfig, None, ["train.fp8=rowwise"]).train.fp8 == "rowwise"
    with pytest.raises(ConfigError, match="train.fp8"):
        load_config(EngineConfig, None, ["train.fp8=true"])


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "mxfp8"])
def test_transformer_engine_fp8_reaches_megatron_config(recipe):
    """The TE path hands FP8 to megatron's own settings (its TransformerBlock then wraps each
    layer in TE's FP8 autocast with the matching TE recipe); the local path leaves them unset."""
    from engine.parallelize import transformer_config

    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, pp=1, dp=1, vpp=None)
    te_model = ModelConfig(transformer_impl="transformer_engine", **TINY)
    cfg = transformer_config(te_model, ParallelConfig(), TrainConfig(fp8=recipe), rt)
    assert (cfg.fp8, cfg.fp8_recipe) == ("hybrid", recipe)
    if recipe == "delayed":
        assert (cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo) == (1024, "max")
    local = transformer_config(ModelConfig(**TINY), ParallelConfig(), TrainConfig(fp8="tensorwise"), rt)
    assert local.fp8 is None
    assert te_fp8_settings(TrainConfig(fp8="off"), True) == {}


@pytest.mark.parametrize("recompute,expected", [
    ("none", (None, None, None)),
    ("selective", ("selective", None, None)),
    ("full", ("full", "uniform", 2)),
])
def test_recompute_reaches_megatron_config(recompute, expected):
    from engine.parallelize import transformer_config

    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, pp=1, dp=1, vpp=None)
    cfg = transformer_config(ModelConfig(**TINY), ParallelConfig(),
                             TrainConfig(recompute=recompute, recompute_num_layers=2), rt)
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == expected
    if recompute == "selective":
        assert cfg.recompute_modules == ["core_attn"]
