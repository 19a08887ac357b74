"""Typed run configuration: nested dataclasses, YAML files and `a.b=value` overrides.

The engine never parses a command line of its own: entry scripts build one top-level dataclass
from a YAML file plus overrides with `load_config`, and hand each component the section it needs.
Unknown keys, wrong types and impossible layouts stop the run at start-up with a message that
names the setting, long before a cluster allocation is wasted.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, always naming the offending setting."""


@dataclass
class ModelConfig:
    """Llama-style decoder backbone with a scalar value head."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2  # grouped-query attention: KV heads
    ffn_hidden_size: int = 384  # SwiGLU inner size
    vocab_size: int = 0  # 0: taken from the tokenizer by the entry script
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    max_position_embeddings: int = 16384
    # q/k/v projections with a bias (Qwen2); the output projection and the MLP never have one
    add_qkv_bias: bool = False
    # RoPE position scaling: none | linear (positions / factor) | dynamic (NTK, as HF Llama and
    # InternLM2 define it: the identity while positions stay below max_position_embeddings, which
    # is all this engine runs: longer packed sequences are refused)
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    # the embedding table is padded to a multiple of lcm(this, parallel.tp) rows (megatron splits
    # it evenly over TP); padded rows stay zero and no token id reaches them
    make_vocab_size_divisible_by: int = 1


@dataclass
class ParallelConfig:
    """Process layout. Data parallelism takes whatever the world size leaves."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B); None = off
    # megatron sequence parallelism: activations outside attention and MLP are split along the
    # sequence over the TP ranks (needs tp > 1 and data.seq_length divisible by tp)
    sequence_parallel: bool = False
    distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 8  # packed sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 1  # packed sequences per forward pass
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    warmup_steps: int = 10
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    loss: str = "pairwise"  # pairwise (Bradley-Terry, POLAR Eq. 7) | infonce
    # weight of an auxiliary next-token loss on the packed tokens (0 = off). It needs an LM head
    # (vocab-parallel) on the last stage; it helps a backbone trained from scratch learn to read text
    aux_lm_weight: float = 0.0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | fp32 | bf16
    seed: int = 1234
    # shared-prefix attention: torch (reference, runs everywhere) | triton (a CUDA GPU, or
    # TRITON_INTERPRET=1 on CPU for testing)
    attention_backend: str = "torch"
    # reward readout + contrastive loss: torch (reference) | triton (fused kernels; a CUDA GPU, or
    # TRITON_INTERPRET=1 on CPU for testing) | cuda (fused kernels of engine._C_cuda; a CUDA GPU)
    kernels: str = "torch"
    time_limit_s: float = 0.0  # 0 = none; otherwise stop (and checkpoint) after this long
    exit_at_step: int = 0  # 0 = none; otherwise save and exit after this step (fits a job slot)


@dataclass
class DataConfig:
    seq_length: int = 1024  # packed sequence length; a group never spans two sequences
    packing: str = "best_fit"  # best_fit | ordered (data built in memory; a built dataset is packed already)
    path: str = ""  # a built dataset directory (`polar data build`); empty = the entry script's own data
    eval_path: str = ""  # a built dataset to evaluate on after training; empty = none (or the script's own)


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: <run_dir>/checkpoints
    save_interval: int = 0  # steps; 0 = only at the end
    resume: bool = True  # continue from the newest complete checkpoint in dir
    init_from: str = ""  # load model weights (any TP/PP layout) before training
    keep: int = 2  # complete checkpoints kept


@dataclass
class LogConfig:
    interval: int = 10
    tensorboard: bool = True


@dataclass
class EngineConfig:
    """Everything the engine needs; entry scripts extend it with their own data sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run_dir: str = "runs/default"


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
        return _build(typ, value, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls, values: dict, where: str):
    types = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown setting '{prefix}{unknown[0]}'; valid keys{' of ' + where if where else ''}: "
            + ", ".join(sorted(names))
        )
    obj = cls()
    for key, value in values.items():
        sub = f"{where}.{key}" if where else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _merge(current, value, sub)
        else:
            value = _coerce(value, types[key], sub)
        setattr(obj, key, value)
    return obj


def _merge(obj, values: dict, where: str):
    merged = dataclasses.asdict(obj)
    _deep_update(merged, values)
    return _build(type(obj), merged, where)


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def parse_overrides(overrides: list[str]) -> dict:
    """`train.lr=1e-5 parallel.tp=2` -> nested dict. Values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


def load_config(cls, path: Optional[str] = None, overrides: Optional[list[str]] = None):
    """Defaults of `cls`, then the YAML file at `path`, then command-line overrides."""
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        values = loaded or {}
        if "base" in values:  # presets may build on another file, relative to themselves
            base = values.pop("base")
            base_values = dataclasses.asdict(load_config(cls, str(p.parent / base)))
            _deep_update(base_values, values)
            values = base_values
    if overrides:
        _deep_update(values, parse_overrides(overrides))
    return _build(cls, values, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
