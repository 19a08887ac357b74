"""Helpers shared by the per-architecture converters: config parsing and checked tensor reads."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from polar.convert.hf_checkpoint import ConvertError, HFCheckpoint

# HF rope types this engine runs (engine/model/rope.py); "default" is plain RoPE
ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3", "yarn": "yarn"}
# llama3's own settings: config.json key -> engine model setting
LLAMA3_KEYS = {"low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_position_embeddings"}
# yarn's own settings besides the original context; the last three are optional (None)
YARN_KEYS = {"beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "attention_factor": "rope_attention_factor",
             "mscale": "rope_mscale", "mscale_all_dim": "rope_mscale_all_dim"}


def positive_int(cfg: dict, key: str, src, default=None) -> int:
    """cfg[key] (or `default` when absent) as a positive integer; a string, float or 0 read from a
    hand-edited config.json would otherwise fail later as a TypeError or ZeroDivisionError."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise ConvertError(f"{src}/config.json: no {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConvertError(f"{src}/config.json: {key} must be a positive integer, got {value!r:.60}")
    return value


def _number(cfg: dict, key: str, src, default: float, within: str = "") -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConvertError(f"{src}/config.json: {within}{key} must be a number, got {value!r:.60}")
    return float(value)


def _object(cfg: dict, key: str, src) -> dict:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConvertError(f"{src}/config.json: {key} must be an object such as {{\"rope_type\": \"linear\", "
                           f"\"factor\": 2.0}} or null, got {value!r:.60}")
    return value


def rope_settings(cfg: dict, src) -> dict:
    """rotary_base, rope_scaling and its factor from a config.json (transformers 4 `rope_theta` +
    `rope_scaling`, or transformers 5 `rope_parameters`)."""
    params = _object(cfg, "rope_parameters", src)
    scaling = _object(cfg, "rope_scaling", src)
    theta = _number(cfg, "rope_theta", src, _number(params, "rope_theta", src, 10000.0, "rope_parameters."))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    factor = _number(scaling, "factor", src, _number(params, "factor", src, 1.0, "rope_parameters."),
                     "rope_scaling.") or 1.0
    if not isinstance(kind, str) or kind not in ROPE_TYPES:
        raise ConvertError(f"{src}/config.json: RoPE scaling type {kind!r} is not supported (supported: "
                           f"none, linear, dynamic, llama3, yarn); convert a checkpoint without it")
    original = scaling.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
    if kind == "dynamic" and original is not None and original != cfg.get("max_position_embeddings"):
        raise ConvertError(f"{src}/config.json: dynamic RoPE with original_max_position_embeddings={original} "
                           f"different from max_position_embeddings={cfg.get('max_position_embeddings')} is "
                           "not supported")
    out = {"rotary_base": theta, "rope_scaling": ROPE_TYPES[kind],
           "rope_scaling_factor": factor if kind != "default" else 1.0}
    if kind == "llama3":
        for key, setting in LLAMA3_KEYS.items():
            value = scaling.get(key, params.get(key))
            if value is None:
                raise ConvertError(f"{src}/config.json: llama3 RoPE scaling without {key}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConvertError(f"{src}/config.json: rope_scaling.{key} must be a positive number, "
                                   f"got {value!r:.60}")
            out[setting] = int(value) if key == "original_max_position_embeddings" else float(value)
        if out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
            raise ConvertError(f"{src}/config.json: rope_scaling.high_freq_factor must be more than "
                               "low_freq_factor")
    if kind == "yarn":
        out.update(_yarn_settings(cfg, scaling, params, src))
    return out


def _yarn_settings(cfg: dict, scaling: dict, params: dict, src) -> dict:
    """The engine's yarn settings, read as transformers (5.x, modeling_rope_utils) reads them."""
    def number(key):
        value = scaling.get(key, params.get(key))
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConvertError(f"{src}/config.json: rope_scaling.{key} must be a non-negative number, "
                               f"got {value!r:.60}")
        return value

    # a top-level original_max_position_embeddings (Phi-3 keeps it there) wins over rope_scaling's;
    # without either the model's own context is the original one
    original = cfg.get("original_max_position_embeddings")
    original = number("original_max_position_embeddings") if original is None else original
    if original is None:
        original = positive_int(cfg, "max_position_embeddings", src, default=16384)
    if isinstance(original, bool) or not isinstance(original, (int, float)) or original < 1 or original % 1:
        raise ConvertError(f"{src}/config.json: original_max_position_embeddings must be a positive integer, "
                           f"got {original!r:.60}")
    if scaling.get("factor", params.get("factor")) is None:  # transformers refuses it too
        raise ConvertError(f"{src}/config.json: yarn RoPE scaling without factor")
    out = {"rope_original_max_position_embeddings": int(original)}
    # transformers' defaults stand in for a missing or zero beta, and mscales count only as a pair
    # of non-zero values in place of an attention factor
    out["rope_beta_fast"] = float(number("beta_fast") or 32)
    out["rope_beta_slow"] = float(number("beta_slow") or 1)
    if out["rope_beta_fast"] < out["rope_beta_slow"]:
        raise ConvertError(f"{src}/config.json: rope_scaling.beta_fast must be at least beta_slow")
    attention = number("attention_factor")
    if attention == 0:  # transformers would zero every query and key
        raise ConvertError(f"{src}/config.json: rope_scaling.attention_factor must be more than 0")
    mscale, mscale_all_dim = number("mscale"), number("mscale_all_dim")
    both = attention is None and mscale and mscale_all_dim
    out.update({"rope_attention_factor": None if attention is None else float(attention),
                "rope_mscale": float(mscale) if both else None,
                "rope_mscale_all_dim": float(mscale_all_dim) if both else None})
    truncate = scaling.get("truncate", params.get("truncate", True))
    if not isinstance(truncate, bool):
        raise ConvertError(f"{src}/config.json: rope_scaling.truncate must be true or false, got {truncate!r:.60}")
    out["rope_truncate"] = truncate
    return out


def partial_dir(dst: Path) -> Path:
    """Where a conversion writes before one rename makes it `dst`: a run cut short (a full disk, a kill)
    must leave no `dst` that looks converted yet lacks files, nor one that blocks the rerun. Beside
    `dst` (the same file system, so the rename is atomic), under a fixed name that every rank of a
    torchrun conversion agrees on and that the next run clears."""
    dst = Path(dst).absolute()
    return dst.parent / f".{dst.name}.partial"


def clear_partial(dst: Path) -> Path:
    """An empty partial_dir(dst), the leftover of an earlier run cut short removed."""
    partial = partial_dir(dst)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def write_failed(dst: Path, error) -> ConvertError:
    return ConvertError(f"{dst}: writing the converted checkpoint failed ({error}); nothing was written there")


def rope_to_hf(model) -> dict | None:
    if model.rope_scaling == "none":
        return None
    out = {"type": model.rope_scaling, "rope_type": model.rope_scaling, "factor": model.rope_scaling_factor}
    if model.rope_scaling == "llama3":
        out.update({key: getattr(model, setting) for key, setting in LLAMA3_KEYS.items()})
    if model.rope_scaling == "yarn":
        out.update({"original_max_position_embeddings": model.rope_original_max_position_embeddings,
                    "truncate": model.rope_truncate})
        out.update({key: getattr(model, setting) for key, setting in YARN_KEYS.items()
                    if getattr(model, setting) is not None})
    return out


def decoder_settings(cfg: dict, src, add_qkv_bias: bool) -> dict:
    """The engine's model settings (engine.config.ModelConfig fields) of a Llama-style decoder's
    config.json: the keys Llama, Mistral, Qwen2 and InternLM2 share."""
    heads = positive_int(cfg, "num_attention_heads", src)
    return {
        "num_layers": positive_int(cfg, "num_hidden_layers", src),
        "hidden_size": positive_int(cfg, "hidden_size", src),
        "num_attention_heads": heads,
        "num_query_groups": positive_int(cfg, "num_key_value_heads", src, default=heads),
        "ffn_hidden_size": positive_int(cfg, "intermediate_size", src),
        "vocab_size": positive_int(cfg, "vocab_size", src),
        "norm_epsilon": _number(cfg, "rms_norm_eps", src, 1e-6),
        "max_position_embeddings": positive_int(cfg, "max_position_embeddings", src, default=16384),
        "add_qkv_bias": add_qkv_bias,
        **rope_settings(cfg, src),
    }


def check_head_dim(cfg: dict, src) -> None:
    # validated before the arithmetic below, which runs ahead of decoder_settings
    hidden, heads = positive_int(cfg, "hidden_size", src), positive_int(cfg, "num_attention_heads", src)
    hd = cfg.get("head_dim")
    groups = positive_int(cfg, "num_key_value_heads", src, default=heads)
    if heads % groups:
        raise ConvertError(f"{src}/config.json: num_key_value_heads={groups} does not divide "
                           f"num_attention_heads={heads}")
    if hidden % heads:
        raise ConvertError(f"{src}/config.json: num_attention_heads={heads} does not divide hidden_size={hidden}")
    if hd is not None and hd != hidden // heads:
        raise ConvertError(f"{src}/config.json: head_dim={hd} differs from hidden_size / num_attention_heads = "
                           f"{hidden // heads}; the engine's head size is hidden_size / num_attention_heads")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{src}/config.json: hidden_act={cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")


class Reader:
    """Checked reads: each tensor is taken once, its shape compared with what config.json implies;
    `leftover` names what nothing took (an unsupported part of the architecture)."""

    def __init__(self, ckpt: HFCheckpoint, ignore: tuple[str, ...] = ()):
        self.ckpt = ckpt
        self.left = {n for n in ckpt.names() if not any(n.endswith(s) for s in ignore)}

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.ckpt.names():
            raise ConvertError(f"{self.ckpt.src}: the checkpoint has no tensor {name!r}, which its config.json "
                               "needs; is the checkpoint complete?")
        t = self.ckpt.get(name)
        if tuple(t.shape) != tuple(shape):
            raise ConvertError(f"{self.ckpt.where(name)}: tensor {name!r} has shape {tuple(t.shape)}, config.json "
                               f"implies {tuple(shape)}; the weights and config.json do not belong together")
        self.left.discard(name)
        return t

    def has(self, name: str) -> bool:
        return name in self.ckpt.names()

    def finish(self, what: str) -> None:
        if self.left:
            first = sorted(self.left)[0]
            raise ConvertError(f"{self.ckpt.where(first)}: tensor {first!r} has no place in the engine's {what} "
                               f"model ({len(self.left)} such tensor(s)): this part of the architecture is "
                               "not supported")
