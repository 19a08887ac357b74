"""Building the engine model for a conversion, and its model.yaml."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from engine.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from engine.yaml_load import safe_load
from polar.convert.hf_checkpoint import ConvertError

MODEL_YAML = "model.yaml"


def runtime(tp: int, pp: int):
    """The megatron runtime at TP tp / PP pp: started here, or the one this process already runs
    (tests, or a caller that set it up) when its layout matches."""
    from engine.runtime import current_or_new_runtime, world_size_from_env

    world = world_size_from_env()
    if world % (tp * pp):
        raise ConvertError(f"--tp {tp} --pp {pp} needs a world size divisible by {tp * pp} "
                           f"(run under torchrun --nproc_per_node {tp * pp}); this run has {world} process(es)")
    try:
        return current_or_new_runtime(ParallelConfig(tp=tp, pp=pp, distributed_optimizer=False), seed=1234)
    except ConfigError as e:
        raise ConvertError(str(e)) from e


def build(model: ModelConfig, tp: int = 1, pp: int = 1, lm_head: bool = False):
    """(model chunks, runtime) in fp32 with the torch kernels: conversions move weights, not speed.
    lm_head: with the auxiliary LM head (a causal LM's output layer travels with the weights)."""
    from engine.parallelize import build_model
    from engine.runtime import validate_layout, world_size_from_env

    par = ParallelConfig(tp=tp, pp=pp, distributed_optimizer=False)
    world = world_size_from_env()
    train = TrainConfig(precision="fp32", global_batch=max(world // (tp * pp), 1), aux_lm_weight=float(lm_head))
    try:
        validate_layout(model, par, train, max(world, tp * pp), model.max_position_embeddings)
    except ConfigError as e:
        raise ConvertError(f"the model cannot run at --tp {tp} --pp {pp}: {e}") from e
    rt = runtime(tp, pp)
    # the weights are loaded right after: random initialisation would be wasted time
    chunks, _ = build_model(model, par, train, rt, initialize=False)
    return chunks, rt


def write_model_yaml(path: Path, model: ModelConfig) -> None:
    path.write_text("# the model section of a run config (pass this file with --config, or merge it)\n"
                    + yaml.safe_dump({"model": dataclasses.asdict(model)}, sort_keys=False))


def read_model_config(path: Path) -> ModelConfig:
    """The `model:` section of a model.yaml or a run's config.yaml."""
    from engine.config_load import _build

    path = Path(path)

    try:
        values = safe_load(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as e:  # --config names a file that is missing, a directory, ...
        raise ConvertError(f"{path}: cannot be read ({e})") from e
    except yaml.YAMLError as e:
        raise ConvertError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
        raise ConvertError(f"{path}: no 'model:' section")
    try:
        return _build(ModelConfig, values["model"], "model")
    except ConfigError as e:
        raise ConvertError(f"{path}: {e}") from e
