"""The run settings `polar plan` plans for: a preset or YAML plus section.key=value, read as the run that
would start from them reads them. The settings a run derives at start-up come from the same places the
run takes them: the model recorded with the checkpoint it loads, the vocabulary of its tokenizer, and
fine-tuning's pack length from its records."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Optional


def load_plan_config(config: Optional[str], overrides: list[str], say=None, sources: Optional[dict] = None):
    """The run settings a plan is for: a preset or YAML plus section.key=value (engine.config_load rules), the
    recipes' own sections ignored. A run that loads a checkpoint (checkpoint.init_from, or the run's newest
    step when it resumes) builds the model recorded with it for every model.* the user did not set
    (engine.start_checks.model_from_checkpoint, the run's own rule): a plan of the config alone planned the
    defaults' 1M-parameter model for a converted 7B; `say` gets the line naming those settings.
    model.vocab_size=0 (the recipe takes it from its tokenizer) becomes the vocabulary the run would use:
    fine-tuning's, that of its tokenizer (finetune.tokenizer, else the init checkpoint's); pre-training's, a
    built dataset's (data.path), else the byte tokenizer's. Fine-tuning's data.seq_length left out or 0
    becomes the length the run derives from its records (`say` gets the run's line naming it). `sources`, if
    given, gets where each setting a file or the command line gave came from (engine.config_load.load_config's)."""
    from engine.config import EngineConfig, validate
    from engine.config_load import load_config
    from engine.start_checks import model_from_checkpoint
    from polar.presets import resolve_config

    # no --config with finetune.* settings: the fine-tuning run's own defaults, no preset (polar finetune
    # refuses a preset's train.steps); else the file or preset, tiny_cpu by default as `polar pretrain`'s
    path = None if config is None and fine_tuning_overrides(overrides) else resolve_config(config)
    sources = {} if sources is None else sources
    cfg = load_config(EngineConfig, path, overrides, ignore=_recipe_sections(), check=False, sources=sources)
    run = _FineTuning(path, overrides) if _fine_tuning(path, overrides) else None
    if run is not None:
        # the run resumes from its own run_dir's newest step: fine-tuning's default is runs/finetune, where
        # EngineConfig's runs/default (the quick start's pre-training run) had the plan resume another model
        cfg.run_dir = run.cfg.run_dir
    follows_data = run is not None and run.cfg.data.seq_length == 0
    if follows_data:
        # EngineConfig's own default (1024) or the 0 the fine-tuning run reads as "from the data" stand in
        # until the settings pass; the length is the data's, found below (a plan of 1024 while the run
        # packed 2048 halved every activation)
        from polar.finetune_recipe import PACK_FLOOR

        cfg.data.seq_length = PACK_FLOOR
    validate(cfg, sources=sources)
    taken = model_from_checkpoint(cfg, sources)
    if taken and say is not None:
        say(taken)
    if cfg.model.vocab_size == 0:
        if run is not None:
            cfg.model.vocab_size = run.vocab_size()
        elif cfg.data.path:
            from polar.pretrain_recipe import open_built

            cfg.model.vocab_size = open_built(cfg.data.path, cfg, "data.path").meta["vocab_size"]
        else:
            from polar.tokenizer import ByteTokenizer

            cfg.model.vocab_size = ByteTokenizer.vocab_size
    if follows_data:
        cfg.data.seq_length = run.pack_length(say)
    return cfg


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

    from engine.config_load import base_file

    p: Optional[Path] = Path(path)
    while p is not None:
        values = yaml.safe_load(p.read_text()) or {}
        if section in values:
            return True
        base = values.get("base")
        p = Path(base_file(p, base)) if isinstance(base, str) and base else None  # a file, or a preset's name
    return False


def fine_tuning_overrides(overrides: list[str]) -> bool:
    """Whether section.key=value settings make a fine-tuning run."""
    return any(o.startswith("finetune.") for o in overrides)


def _fine_tuning(path: Optional[str], overrides: list[str]) -> bool:
    return fine_tuning_overrides(overrides) or (path is not None and _file_names_section(path, "finetune"))


def _pass_length() -> str:
    from polar.finetune_recipe import PACK_FLOOR, PACK_UNIT

    return (f"give data.seq_length=N, the length a run prints as `data.seq_length=N from the data` (the longest "
            f"record as one group, in whole {PACK_UNIT}-token units, at least {PACK_FLOOR})")


class _FineTuning:
    """The fine-tuning run's own settings (polar.finetune_recipe.FinetuneConfig, unchecked: a plan asks
    only for what it derives) and what it derives from them at start-up, by the recipe's functions."""

    def __init__(self, path: Optional[str], overrides: list[str]):
        import dataclasses

        from engine.config_load import load_config
        from polar.finetune_recipe import FinetuneConfig

        own = {f.name for f in dataclasses.fields(FinetuneConfig)}
        self.cfg = load_config(FinetuneConfig, path, overrides, check=False,
                               ignore=tuple(s for s in _recipe_sections() if s not in own))
        self._spec: Optional[str] = None

    def tokenizer(self) -> str:
        """finetune.tokenizer, else the tokenizer the init checkpoint was trained with, refused where they
        give other ids (polar.finetune_recipe.tokenizer_spec)."""
        from engine.checkpoint import CheckpointNotFound
        from engine.config import ConfigError
        from polar.finetune_recipe import tokenizer_spec

        if self._spec is None:
            try:
                self._spec = tokenizer_spec(self.cfg)
            except CheckpointNotFound as e:
                raise ConfigError(f"checkpoint.init_from={self.cfg.checkpoint.init_from}: {e}") from None
        return self._spec

    def _load_tokenizer(self):
        from engine.config import ConfigError
        from polar.tokenizer import load_tokenizer

        spec = self.tokenizer()
        try:
            return load_tokenizer(spec)
        except (OSError, ValueError) as e:
            raise ConfigError(f"finetune.tokenizer={spec}: {e}") from None

    def vocab_size(self) -> int:
        from engine.config import ConfigError

        if not self.cfg.checkpoint.init_from:
            raise ConfigError("model.vocab_size=0: fine-tuning takes it from its tokenizer (finetune.tokenizer or "
                              "the init checkpoint's); a plan needs it: set model.vocab_size")
        try:
            return self._load_tokenizer().vocab_size
        except ConfigError as e:  # the run's own refusal: a plan of another vocabulary would plan no run
            raise ConfigError(f"model.vocab_size=0: fine-tuning takes it from its tokenizer: {e}") from None

    def pack_length(self, say=None) -> int:
        """data.seq_length=0: the length the run derives from its records (finetune.train and finetune.eval,
        which hold every record it packs: a split of held-out records is taken from finetune.train),
        through the recipe's own reading, encoding and rounding. The lines the recipe prints go to `say`."""
        from engine.config import ConfigError
        from polar import finetune_recipe as recipe

        f = self.cfg.finetune
        given = [(f"finetune.{k}", p) for k, p in (("train", f.train), ("eval", f.eval)) if p]
        absent = [f"{k}={p}" for k, p in given if not Path(p).is_file()]
        if not f.train or absent:
            why = f"{', '.join(absent)}: no such file here" if absent else "finetune.train is not given"
            raise ConfigError(f"fine-tuning's data.seq_length follows the data, which the plan reads to find it "
                              f"({why}): {_pass_length()}")
        try:
            tok = self._load_tokenizer()
        except ConfigError as e:
            raise ConfigError(f"fine-tuning's data.seq_length follows the data, which the plan tokenizes as the "
                              f"run does ({e}): {_pass_length()}") from None
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # the recipe prints its lines: they are the plan's to print
            recipe.derived_pack_length(self.cfg, tok)
        for line in printed.getvalue().splitlines():
            if say is not None:
                say(line)
        return self.cfg.data.seq_length
