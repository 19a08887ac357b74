"""Helpers shared by the per-architecture converters: config parsing and checked tensor reads."""
from __future__ import annotations

import torch

from polar.convert.hf_checkpoint import ConvertError, HFCheckpoint

# HF rope types this engine runs (engine/model/rope.py); "default" is plain RoPE
ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic"}


def require(cfg: dict, key: str, src) -> object:
    if cfg.get(key) is None:
        raise ConvertError(f"{src}/config.json: no {key!r}")
    return cfg[key]


def rope_settings(cfg: dict, src) -> dict:
    """rotary_base, rope_scaling and its factor from a config.json (transformers 4 `rope_theta` +
    `rope_scaling`, or transformers 5 `rope_parameters`)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    factor = float(scaling.get("factor", params.get("factor", 1.0)) or 1.0)
    if kind not in ROPE_TYPES:
        raise ConvertError(f"{src}/config.json: RoPE scaling type {kind!r} is not supported (supported: "
                           f"none, linear, dynamic); convert a checkpoint without it")
    original = scaling.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
    if kind == "dynamic" and original is not None and original != cfg.get("max_position_embeddings"):
        raise ConvertError(f"{src}/config.json: dynamic RoPE with original_max_position_embeddings={original} "
                           f"different from max_position_embeddings={cfg.get('max_position_embeddings')} is "
                           "not supported")
    return {"rotary_base": float(theta), "rope_scaling": ROPE_TYPES[kind],
            "rope_scaling_factor": factor if kind != "default" else 1.0}


def rope_to_hf(model) -> dict | None:
    if model.rope_scaling == "none":
        return None
    return {"type": model.rope_scaling, "rope_type": model.rope_scaling, "factor": model.rope_scaling_factor}


def decoder_settings(cfg: dict, src, add_qkv_bias: bool) -> dict:
    """The engine's model settings (engine.config.ModelConfig fields) of a Llama-style decoder's
    config.json: the keys Llama, Mistral, Qwen2 and InternLM2 share."""
    heads = require(cfg, "num_attention_heads", src)
    return {
        "num_layers": require(cfg, "num_hidden_layers", src),
        "hidden_size": require(cfg, "hidden_size", src),
        "num_attention_heads": heads,
        "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "ffn_hidden_size": require(cfg, "intermediate_size", src),
        "vocab_size": require(cfg, "vocab_size", src),
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 16384)),
        "add_qkv_bias": add_qkv_bias,
        **rope_settings(cfg, src),
    }


def check_head_dim(cfg: dict, src) -> None:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim")
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
