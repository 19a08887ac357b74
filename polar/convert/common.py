"""Helpers shared by the per-architecture converters: config parsing and checked tensor reads."""
from __future__ import annotations

import math
import os
import shutil
import socket
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
    # Python's json reads NaN, Infinity and 1e999 (as inf): a model computed from them is NaN or garbage
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except OverflowError:  # an integer past float's range
        number = math.inf
    if number is None or not math.isfinite(number):
        raise ConvertError(f"{src}/config.json: {within}{key} must be a finite number, got {value!r:.60}")
    return number


def _rope_theta(cfg: dict, params: dict, src, where: str) -> float:
    """The RoPE base: inside rope_parameters / rope_scaling (`params`) over the top-level key.
    Transformers takes 0 or a negative base without a word and rotates by inf or NaN angles."""
    theta = _number(cfg, "rope_theta", src, 10000.0)
    key = "rope_theta"
    if params.get("rope_theta") is not None:
        theta, key = _number(params, "rope_theta", src, theta, where), where + key
    if theta <= 0:
        raise ConvertError(f"{src}/config.json: {key} must be more than 0, got {theta:g}")
    return theta


def _object(cfg: dict, key: str, src) -> dict:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConvertError(f"{src}/config.json: {key} must be an object such as {{\"rope_type\": \"linear\", "
                           f"\"factor\": 2.0}} or null, got {value!r:.60}")
    return value


def _partial_rotary(cfg: dict, src) -> None:
    """Anything but 1 is refused: transformers 5's Llama, Qwen2 and Mistral code ignores the key under
    plain RoPE and, under a scaled type, computes frequencies for that part of the head only, then
    fails on the size mismatch, while vLLM (and Phi/StableLM-style models) rotate that part only; there
    is no one meaning the engine could reproduce."""
    for where, holder in (("", cfg), ("rope_parameters.", cfg.get("rope_parameters")),
                          ("rope_scaling.", cfg.get("rope_scaling"))):
        value = holder.get("partial_rotary_factor") if isinstance(holder, dict) else None
        if value is not None and (isinstance(value, bool) or value != 1):
            raise ConvertError(f"{src}/config.json: {where}partial_rotary_factor={value!r:.60} (RoPE on part of "
                               "each head) is not supported; the engine rotates every dimension of a head "
                               "(partial_rotary_factor 1 or absent)")


def rope_settings(cfg: dict, src, positions: int) -> dict:
    """rotary_base, rope_scaling and its settings from a config.json, read as transformers 5
    (modeling_rope_utils) reads them: a non-empty `rope_scaling` (transformers 4's key) replaces
    `rope_parameters` whole, and a `rope_theta` inside the one read wins over the top-level one.
    `positions`: the model's max_position_embeddings."""
    _partial_rotary(cfg, src)
    scaling = _object(cfg, "rope_scaling", src)
    where = "rope_scaling." if scaling else "rope_parameters."
    params = scaling or _object(cfg, "rope_parameters", src)
    # transformers 5's per-layer-type form ({"full_attention": {...}, ...}): no RoPE key holds an object
    # otherwise, and read flat it would be plain RoPE
    nested = sorted(key for key, value in params.items() if isinstance(value, dict))
    if nested:
        raise ConvertError(f"{src}/config.json: {where}{nested[0]}: RoPE settings per layer type are not supported; "
                           "give one rope_type, rope_theta, ... for every layer")
    theta = _rope_theta(cfg, params, src, where)
    # an explicit "rope_type": null is not "default" to transformers (it fails on it)
    kind = params["rope_type"] if "rope_type" in params else params.get("type", "default")
    if not isinstance(kind, str) or kind not in ROPE_TYPES:
        raise ConvertError(f"{src}/config.json: RoPE scaling type {kind!r:.60} is not supported (supported: "
                           f"default, linear, dynamic, llama3, yarn); convert a checkpoint without it")
    out = {"rotary_base": theta, "rope_scaling": ROPE_TYPES[kind], "rope_scaling_factor": 1.0}
    if kind == "default":
        return out
    if params.get("factor") is None:  # transformers refuses it too
        raise ConvertError(f"{src}/config.json: {kind} RoPE scaling without factor")
    out["rope_scaling_factor"] = _number(params, "factor", src, 1.0, where)
    if out["rope_scaling_factor"] <= 0:
        raise ConvertError(f"{src}/config.json: {where}factor must be more than 0, got {params['factor']!r:.60}")
    if kind == "dynamic":
        original = params.get("original_max_position_embeddings")
        if original is not None and original != positions:
            raise ConvertError(f"{src}/config.json: dynamic RoPE with original_max_position_embeddings={original} "
                               f"different from max_position_embeddings={positions} is not supported")
    if kind == "llama3":
        out.update(_llama3_settings(cfg, params, src, where, positions))
    if kind == "yarn":
        out.update(_yarn_settings(cfg, params, src, where, positions))
    return out


def _original_context(cfg: dict, params: dict, src, where: str, positions: int) -> int:
    """llama3's and yarn's original context as transformers 5 takes it: a top-level
    original_max_position_embeddings (Phi-3 keeps it there) over the scaling's own, the model's
    max_position_embeddings without either."""
    key = "original_max_position_embeddings"
    if key in cfg:
        original = cfg[key]
    else:
        original, key = params.get(key, positions), where + key
    if isinstance(original, bool) or not isinstance(original, (int, float)) or original < 1 or original % 1:
        raise ConvertError(f"{src}/config.json: {key} must be a positive integer, got {original!r:.60}")
    return int(original)


def _llama3_settings(cfg: dict, params: dict, src, where: str, positions: int) -> dict:
    out = {"rope_original_max_position_embeddings": _original_context(cfg, params, src, where, positions)}
    for key in ("low_freq_factor", "high_freq_factor"):
        value = params.get(key)
        if value is None:
            raise ConvertError(f"{src}/config.json: llama3 RoPE scaling without {key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConvertError(f"{src}/config.json: {where}{key} must be a positive number, got {value!r:.60}")
        out[LLAMA3_KEYS[key]] = float(value)
    if out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
        raise ConvertError(f"{src}/config.json: {where}high_freq_factor must be more than low_freq_factor")
    return out


def _yarn_settings(cfg: dict, params: dict, src, where: str, positions: int) -> dict:
    """The engine's yarn settings, read as transformers (5.x, modeling_rope_utils) reads them."""
    def number(key):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConvertError(f"{src}/config.json: {where}{key} must be a non-negative number, got {value!r:.60}")
        return value

    out = {"rope_original_max_position_embeddings": _original_context(cfg, params, src, where, positions)}
    # transformers' defaults stand in for a missing or zero beta, and mscales count only as a pair
    # of non-zero values in place of an attention factor
    out["rope_beta_fast"] = float(number("beta_fast") or 32)
    out["rope_beta_slow"] = float(number("beta_slow") or 1)
    if out["rope_beta_fast"] < out["rope_beta_slow"]:
        raise ConvertError(f"{src}/config.json: {where}beta_fast must be at least beta_slow")
    attention = number("attention_factor")
    if attention == 0:  # transformers would zero every query and key
        raise ConvertError(f"{src}/config.json: {where}attention_factor must be more than 0")
    mscale, mscale_all_dim = number("mscale"), number("mscale_all_dim")
    both = attention is None and mscale and mscale_all_dim
    out.update({"rope_attention_factor": None if attention is None else float(attention),
                "rope_mscale": float(mscale) if both else None,
                "rope_mscale_all_dim": float(mscale_all_dim) if both else None})
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConvertError(f"{src}/config.json: {where}truncate must be true or false, got {truncate!r:.60}")
    out["rope_truncate"] = truncate
    return out


def partial_dir(dst: Path) -> Path:
    """Where a conversion writes before one rename makes it `dst`: a run cut short (a full disk, a kill)
    must leave no `dst` that looks converted yet lacks files, nor one that blocks the rerun. Beside
    `dst` (the same file system, so the rename is atomic), under a fixed name that every rank of a
    torchrun conversion agrees on and that the next run clears: Partial keeps a second conversion
    to `dst` off it while one runs."""
    dst = Path(dst).absolute()
    return dst.parent / f".{dst.name}.partial"


OWNER = ".polar-convert-owner"  # in the partial directory while a run holds it: which process


class Partial:
    """partial_dir(dst), this run's from claim() until publish() or drop(): locked (flock, which the
    kernel drops when the process dies, killed or not). Two conversions to one `dst` at once shared
    it: the second cleared the first's files under it and both wrote into one directory, which either
    could publish half-written or mixed. The second is now refused (ConvertError naming `dst` and the
    first's process) and touches nothing; a run cut short leaves it unlocked, for the next to clear."""

    def __init__(self, dst: Path):
        self.dst, self.path = Path(dst), partial_dir(dst)
        self._fd: int | None = None

    def claim(self) -> Path:
        """The directory, empty (the leftover of a run cut short removed) and locked."""
        from engine.file_lock import claim

        # the owner read only if refused: the run holding it may have written its name by then
        self._fd, _ = claim(self.path, lambda: ConvertError(
            f"{self.dst}: another conversion to it is running ({self._owner()}, writing {self.path}); wait for it "
            "to end or stop it, or choose another destination"), directory=True)
        for child in list(self.path.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        (self.path / OWNER).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        return self.path

    def _owner(self) -> str:
        from engine.file_lock import holder

        return holder(self.path / OWNER)

    def publish(self) -> None:
        """The directory renamed to `dst` (an empty `dst` directory is replaced too), and let go."""
        (self.path / OWNER).unlink()
        os.replace(self.path, self.dst)
        # let go only now: a run waiting for it finds the name gone, not a directory to clear
        self._release()

    def drop(self) -> None:
        """The directory removed and let go, if claimed; else nothing (another run's, or none)."""
        if self._fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        os.close(fd)


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


def key_value_heads(cfg: dict, src, absent: tuple[str, int] | None = None) -> tuple[int, str]:
    """num_key_value_heads as transformers 5 sets it, and what the messages say of its source. A key
    left out takes the config class's own default: `absent` (architecture, value), Qwen2Config's 32
    and MistralConfig's 8 whatever the heads; None for num_attention_heads (LlamaConfig, InternLM2Config).
    Null is num_attention_heads to each class that accepts it."""
    heads = positive_int(cfg, "num_attention_heads", src)
    if "num_key_value_heads" not in cfg:
        if absent is not None:
            return absent[1], f" (absent: {absent[0]}'s default is {absent[1]})"
        return heads, " (absent: num_attention_heads, transformers' default)"
    if cfg["num_key_value_heads"] is None:
        return heads, " (null: num_attention_heads)"
    return positive_int(cfg, "num_key_value_heads", src), ""


def decoder_settings(cfg: dict, src, add_qkv_bias: bool, default_positions: int,
                     kv_absent: tuple[str, int] | None = None) -> dict:
    """The engine's model settings (engine.config.ModelConfig fields) of a Llama-style decoder's
    config.json: the keys Llama, Mistral, Qwen2 and InternLM2 share. `default_positions`: the
    architecture's own max_position_embeddings where config.json has none (it bounds dynamic RoPE
    and is the original context of llama3 and yarn without one); `kv_absent`: key_value_heads'."""
    heads = positive_int(cfg, "num_attention_heads", src)
    positions = positive_int(cfg, "max_position_embeddings", src, default=default_positions)
    return {
        "num_layers": positive_int(cfg, "num_hidden_layers", src),
        "hidden_size": positive_int(cfg, "hidden_size", src),
        "num_attention_heads": heads,
        "num_query_groups": key_value_heads(cfg, src, kv_absent)[0],
        "ffn_hidden_size": positive_int(cfg, "intermediate_size", src),
        "vocab_size": positive_int(cfg, "vocab_size", src),
        "norm_epsilon": _number(cfg, "rms_norm_eps", src, 1e-6),
        "max_position_embeddings": positions,
        "add_qkv_bias": add_qkv_bias,
        **rope_settings(cfg, src, positions),
    }


def check_head_dim(cfg: dict, src, kv_absent: tuple[str, int] | None = None) -> None:
    # validated before the arithmetic below, which runs ahead of decoder_settings
    hidden, heads = positive_int(cfg, "hidden_size", src), positive_int(cfg, "num_attention_heads", src)
    hd = cfg.get("head_dim")
    groups, source = key_value_heads(cfg, src, kv_absent)
    if heads % groups:
        raise ConvertError(f"{src}/config.json: num_key_value_heads={groups}{source} does not divide "
                           f"num_attention_heads={heads}")
    if hidden % heads:
        raise ConvertError(f"{src}/config.json: num_attention_heads={heads} does not divide hidden_size={hidden}")
    if hd is not None and hd != hidden // heads:
        raise ConvertError(f"{src}/config.json: head_dim={hd} differs from hidden_size / num_attention_heads = "
                           f"{hidden // heads}; the engine's head size is hidden_size / num_attention_heads")
    # transformers' "swish" is the same SiLU
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConvertError(f"{src}/config.json: hidden_act={cfg['hidden_act']!r:.60} is not supported (SwiGLU with "
                           "silu only)")


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
