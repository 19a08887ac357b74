"""The tokenizer a checkpoint was trained with: one answer for `polar score`, `polar serve`,
`polar.reward` and `polar finetune`, so that none of them scores or trains a model with ids from
another tokenizer.

A run that tokenizes with a tokenizer directory copies it into its checkpoints directory
(`save_beside`), and `polar convert` writes one beside its weights, so a checkpoint carries its
tokenizer. `find` looks, in order:

1. `tokenizer/` in the step directory, beside it or beside its checkpoints directory;
2. the run's config.yaml: a fine-tuning run's `finetune.tokenizer`, else the tokenizer of the
   checkpoint it started from; a pre-training run on built data, the tokenizer its data's metadata
   names; a run on the embedded synthetic data, the byte tokenizer;
3. nothing found: an error asking for the tokenizer, never a silent fall-back to bytes (ids of the
   wrong tokenizer give rewards that look plausible and mean nothing).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from engine.durable_file import Replacement

DIR = "tokenizer"
FILES = ("tokenizer.json", "polar_tokenizer.json", "tokenizer_config.json")


class TokenizerNotFound(ValueError):
    pass


class TokenizerMismatch(ValueError):
    pass


# Content with the structural literals and multi-byte characters: two tokenizers that read it alike, as
# content and as a server does, with the same special ids and vocabulary size, give a model the same ids.
_PROBE = "POLAR probe: naïve café 日本語 123, <|reward|> [UNUSED_TOKEN_130]\n  x"


def same(a: str, b: str) -> bool:
    """Whether the tokenizers `a` and `b` ("byte" or directories) give the same ids: the same
    spec or directory, else the same vocabulary size, special ids and ids of a probe text (a copy
    of a tokenizer elsewhere, or saved by another transformers version, is the same one)."""
    if a == b or (a != "byte" and b != "byte" and Path(a).resolve() == Path(b).resolve()):
        return True
    from polar.tokenizer import load_tokenizer

    ta, tb = load_tokenizer(a), load_tokenizer(b)
    ids = ("vocab_size", "bos_id", "pad_id", "reward_sep_id", "reward_token_id")
    return (all(getattr(ta, k) == getattr(tb, k) for k in ids)
            and ta.encode(_PROBE).tolist() == tb.encode(_PROBE).tolist()
            and ta.encode_served(_PROBE).tolist() == tb.encode_served(_PROBE).tolist())


def check_vocabulary(tokenizer, model_vocab: int, advice: str) -> None:
    """ValueError where the tokenizer has more ids than the model's vocabulary (`advice` ends the
    message): an id past the embedding table fails the forward of every item batched with it (on a
    GPU a device-side assert, the CUDA context with it). `polar serve` and the in-process scorer
    refuse it before scoring anything."""
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary only "
                         f"{model_vocab}: {advice}")


def _describe(spec: str) -> str:
    return "the byte tokenizer" if spec == "byte" else spec


def choose(explicit: str | None, step_dir: str, setting: str) -> str:
    """The tokenizer to read checkpoint `step_dir` with: `explicit` (the user's `setting`) where
    given, refused (TokenizerMismatch) when the checkpoint's own (`find`) is known and gives other
    ids: a model fed another tokenizer's ids scores plausibly and means nothing, and one with fewer
    ids than the model's vocabulary is not caught by any size check. Without `explicit`, the
    checkpoint's own (TokenizerNotFound when unknown)."""
    try:
        own = find(step_dir)
    except TokenizerNotFound:
        if explicit:
            return explicit  # nothing to compare with: the user's word
        raise
    try:
        agree = not explicit or same(explicit, own)
    except (OSError, ValueError):
        return explicit  # not loadable: the caller's load_tokenizer says why, naming it
    if not agree:
        given = f"{setting} {explicit}" if setting.startswith("-") else f"{setting}={explicit}"
        raise TokenizerMismatch(f"{given}: {step_dir} was trained with {_describe(own)}, which gives other ids; "
                                f"leave {setting} out to use that one")
    return explicit or own


def save_beside(ckpt_dir: str, spec: str) -> None:
    """Copies the tokenizer directory `spec` into `ckpt_dir/tokenizer/` (nothing for "byte").
    Every rank may call it: each file is written whole (a temporary file of its own) and renamed
    into place, on the disk before the rename (a resume after a crash of the machine checks the run's
    tokenizer against these files)."""
    if spec == "byte":
        return
    src = Path(spec)
    src = src.parent if src.is_file() else src
    dst = Path(ckpt_dir) / DIR
    if dst.resolve() == src.resolve():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (src / name).is_file():
            with open(src / name, "rb") as f, Replacement(dst / name, binary=True) as copy:
                shutil.copyfileobj(f, copy.file)
                copy.commit()


def differs_from_saved(ckpt_dir: str, spec: str) -> str | None:
    """The first of the tokenizer files that `ckpt_dir/tokenizer/` holds and `spec` lacks or has
    otherwise ("byte": the saved tokenizer.json), None when they agree or nothing was saved: what a
    resume must not replace, since the run's steps were trained with the saved one."""
    dst = Path(ckpt_dir) / DIR
    if not dst.is_dir():
        return None
    if spec == "byte":
        return "tokenizer.json" if (dst / "tokenizer.json").is_file() else None
    src = Path(spec)
    src = src.parent if src.is_file() else src
    if dst.resolve() == src.resolve():
        return None
    for name in FILES:
        if (dst / name).is_file() and (not (src / name).is_file()
                                       or (src / name).read_bytes() != (dst / name).read_bytes()):
            return name
    return None


def _run_config(step: Path) -> tuple[dict, Path] | None:
    for f in (step.parent.parent / "config.yaml", step.parent / "config.yaml"):
        if f.is_file():
            values = yaml.safe_load(f.read_text())
            if isinstance(values, dict):
                return values, f
    return None


def _built_data_tokenizer(path: str, where: Path) -> str:
    p = Path(path)
    metas = [Path(str(p) + ".json"), p.with_suffix(".json")] + (sorted(p.glob("*.json")) if p.is_dir() else [])
    for f in metas:
        if f.is_file():
            spec = json.loads(f.read_text()).get("tokenizer")
            if spec == "byte" or (isinstance(spec, str) and (Path(spec) / "tokenizer.json").is_file()):
                return spec
            raise TokenizerNotFound(f"{where}: the run trained on data.path={path}, whose tokenizer {spec!r} "
                                    f"(named in {f}) is not found here; pass the tokenizer directory")
    raise TokenizerNotFound(f"{where}: the run trained on data.path={path}, whose metadata is not readable here; "
                            "pass the tokenizer directory")


def find(step_dir: str) -> str:
    """"byte" or a tokenizer directory, for the checkpoint step `step_dir` (module docstring)."""
    step = Path(step_dir)
    for d in (step / DIR, step.parent / DIR, step.parent.parent / DIR):
        if (d / "tokenizer.json").is_file():
            return str(d)
    found = _run_config(step)
    if found is None:
        raise TokenizerNotFound(f"{step}: no tokenizer/ beside the checkpoint and no run config.yaml to tell "
                                "which tokenizer it was trained with; pass the tokenizer ('byte' or a directory)")
    run, where = found
    finetune = run.get("finetune")
    if isinstance(finetune, dict):
        if finetune.get("tokenizer"):
            return str(finetune["tokenizer"])
        init = (run.get("checkpoint") or {}).get("init_from")
        if init:
            from engine.checkpoint import CheckpointNotFound, resolve

            try:
                return find(resolve(init))
            except CheckpointNotFound as e:
                raise TokenizerNotFound(f"{where}: the run started from checkpoint.init_from={init} ({e}), where "
                                        "its tokenizer would be; pass the tokenizer directory") from None
    data = run.get("data") or {}
    if data.get("path"):
        return _built_data_tokenizer(data["path"], where)
    return "byte"  # the embedded synthetic data is byte-tokenized
