"""The run settings `polar plan` plans for: a preset or YAML plus section.key=value, read as the run that
would start from them reads them, with the model recorded with the checkpoint it loads and the vocabulary
of its tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def _recipe_sections() -> tuple:
    """Top-level sections only a training recipe reads (synthetic:, finetune:): a plan needs none of them,
    and checking them would ask for the recipe's data files on the machine that plans."""
    import dataclasses

    from engine.config import EngineConfig
    from polar.finetune_recipe import FinetuneConfig
    from polar.pretrain_recipe import PretrainConfig

    engine = {f.name for f in dataclasses.fields(EngineConfig)}
    return tuple(sorted({f.name for cls in (PretrainConfig, FinetuneConfig) for f in dataclasses.fields(cls)}
                        - engine))


def _file_names_section(path: str, section: str) -> bool:
    """Whether a config file or one of its bases has a top-level `section` (load_config has already refused
    a missing base or a cycle)."""
    import yaml

    from engine.config import base_file

    p: Optional[Path] = Path(path)
    while p is not None:
        values = yaml.safe_load(p.read_text()) or {}
        if section in values:
            return True
        base = values.get("base")
        p = Path(base_file(p, base)) if isinstance(base, str) and base else None  # a file, or a preset's name
    return False


def _fine_tuning(path: str, overrides: list[str]) -> bool:
    return _file_names_section(path, "finetune") or any(o.startswith("finetune.") for o in overrides)


def load_plan_config(config: Optional[str], overrides: list[str], say=None):
    """The run settings a plan is for: a preset or YAML plus section.key=value (engine.config rules), the
    recipes' own sections ignored. A run that loads a checkpoint (checkpoint.init_from, or the run's newest
    step when it resumes) builds the model recorded with it for every model.* the user did not set
    (engine.pretrain.model_from_checkpoint, the run's own rule): a plan of the config alone planned the
    defaults' 1M-parameter model for a converted 7B; `say` gets the line naming those settings.
    model.vocab_size=0 (the recipe takes it from its tokenizer) becomes the vocabulary the run would use:
    fine-tuning's, that of the tokenizer its init checkpoint was trained with; pre-training's, a built
    dataset's (data.path), else the byte tokenizer's."""
    from engine.config import ConfigError, EngineConfig, load_config, validate
    from engine.pretrain import model_from_checkpoint
    from polar.presets import resolve_config

    path = resolve_config(config)
    sources: dict = {}
    cfg = load_config(EngineConfig, path, overrides, ignore=_recipe_sections(), check=False, sources=sources)
    finetune = _fine_tuning(path, overrides)
    if finetune and cfg.data.seq_length == 0:  # EngineConfig's check would say only "must be >= 2"
        raise ConfigError("fine-tuning's data.seq_length=0 follows the data: give data.seq_length=N (the length a run "
                          "prints as `data.seq_length=N from the data`)")
    validate(cfg, sources=sources)
    taken = model_from_checkpoint(cfg, sources)
    if taken and say is not None:
        say(taken)
    if cfg.model.vocab_size == 0:
        if finetune:
            cfg.model.vocab_size = _init_tokenizer_vocab(cfg)
        elif cfg.data.path:
            from polar.pretrain_recipe import open_built

            cfg.model.vocab_size = open_built(cfg.data.path, cfg, "data.path").meta["vocab_size"]
        else:
            from polar.tokenizer import ByteTokenizer

            cfg.model.vocab_size = ByteTokenizer.vocab_size
    return cfg


def _init_tokenizer_vocab(cfg) -> int:
    """The vocabulary of the tokenizer fine-tuning's init checkpoint was trained with (the recipe's
    default for finetune.tokenizer, polar.checkpoint_tokenizer.find)."""
    from engine.checkpoint import resolve
    from engine.config import ConfigError
    from polar.checkpoint_tokenizer import TokenizerNotFound, find
    from polar.tokenizer import load_tokenizer

    refusal = ("model.vocab_size=0: fine-tuning takes it from its tokenizer (finetune.tokenizer or the init "
               "checkpoint's); a plan needs it: set model.vocab_size")
    if not cfg.checkpoint.init_from:
        raise ConfigError(refusal)
    try:
        spec = find(resolve(cfg.checkpoint.init_from))
        return load_tokenizer(spec).vocab_size
    except (TokenizerNotFound, OSError, ValueError) as e:
        raise ConfigError(f"{refusal} ({e})") from None
