"""The model a checkpoint step records (its model.json, a converter's model.yaml beside it or the
run's config.yaml): reading those settings, building engine.config.ModelConfig from them, and
checking a run's model against them before a load (a shape error deep inside megatron's load names
no setting).
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.checkpoint import MODEL_FILE, CheckpointError, damaged
from engine.checkpoint_request import first_line

# settings that decide which weights exist and their shapes: a checkpoint loads only into a model
# that agrees (add_qkv_bias adds q/k/v biases; transformer_impl names the norms differently: TE fuses
# them into the linear layers that follow)
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "vocab_size", "add_qkv_bias", "transformer_impl")
# settings that change what the same weights compute: a run started from a checkpoint's weights may
# change them (longer contexts, say), a resumed one may not (it went on training another function)
FUNCTION_FIELDS = ("rotary_base", "norm_epsilon", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
                   "rope_high_freq_factor", "rope_original_max_position_embeddings", "rope_beta_fast",
                   "rope_beta_slow", "rope_attention_factor", "rope_mscale", "rope_mscale_all_dim", "rope_truncate")


def saved_model_settings(step_dir: str) -> tuple[dict, str] | None:
    """(model settings, file) recorded with a checkpoint step: its own model.json, else a model.yaml
    beside the checkpoint directory (written by the converter), else the `model` section of the
    training run's config.yaml (run_dir/checkpoints/step_N). None when nothing is recorded."""
    import yaml

    from engine.yaml_load import safe_load

    p = Path(step_dir)
    if (p / MODEL_FILE).is_file():
        try:
            settings = json.loads((p / MODEL_FILE).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise damaged(p / MODEL_FILE, e) from None
        if not isinstance(settings, dict):
            raise damaged(p / MODEL_FILE, ValueError("a JSON object is expected"))
        return settings, str(p / MODEL_FILE)
    for f in (p.parent / "model.yaml", p.parent.parent / "config.yaml"):
        if f.is_file():
            try:
                loaded = safe_load(f.read_text(), str(f)) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                raise CheckpointError(f"{f}: not readable as YAML ({first_line(e)}); it records the model "
                                      f"of {step_dir}: repair it or move it away") from None
            # both hold a `model:` section (a converter's model.yaml is a run config's model part)
            model = loaded.get("model", loaded) if isinstance(loaded, dict) else None
            if isinstance(model, dict):
                return model, str(f)
    return None


def model_config_from(settings: dict, where: str):
    """engine.config.ModelConfig from recorded settings, checked like a run's; errors name `where`."""
    from engine.config import ConfigError, ModelConfig, validate
    from engine.config_load import _build

    try:
        cfg = _build(ModelConfig, settings, "model")
        validate(cfg, "model")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    if not cfg.vocab_size:
        raise ConfigError(f"{where}: model.vocab_size is 0; the checkpoint's vocabulary size is needed")
    return cfg


def model_config(step_dir: str):
    """The model a checkpoint step holds (saved_model_settings), for loaders that build it."""
    from engine.config import ConfigError

    found = saved_model_settings(step_dir)
    if found is None:
        raise ConfigError(f"{step_dir}: no model settings recorded with it (model.json in the step, model.yaml "
                          "beside it or the run's config.yaml); it was not written by this engine")
    return model_config_from(*found)


def check_model_matches(model_cfg, step_dir: str, what: str, otherwise: str = "", fields=SHAPE_FIELDS) -> None:
    """Raises ConfigError naming every setting of `fields` (the weight shapes) where the run's model and
    the checkpoint's recorded model differ (instead of a shape error deep inside the load; named one at
    a time, each fix met the next refusal); `what` names the step in the message (e.g.
    "checkpoint.init_from=DIR"), `otherwise` adds the way out besides setting them back."""
    from engine.config import ConfigError

    found = saved_model_settings(step_dir)
    if found is None:
        return
    saved, where = found
    differ = [name for name in fields if name in saved and saved[name] != getattr(model_cfg, name)]
    if differ:
        raise ConfigError(
            f"{what} holds a model with {', '.join(f'model.{n}={saved[n]}' for n in differ)} (recorded in {where}), "
            f"but this run has {', '.join(f'model.{n}={getattr(model_cfg, n)}' for n in differ)}: set "
            f"{' '.join(f'model.{n}={saved[n]}' for n in differ)} (every model.* setting it was saved with is in "
            f"{where}){otherwise}")
