"""The tokenizer beside a converted checkpoint: tokenizer.json with the two POLAR reward tokens and
polar_tokenizer.json naming the four special token strings.

    polar_tokenizer.json = {"bos": str, "pad": str, "reward_sep": str, "reward_token": str}

(strings, not ids: ids are looked up in tokenizer.json when it is loaded). A tokenizer that lacks
a reward token gets it as a special added token, so its vocabulary grows; the caller grows the
embedding with it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from polar.convert.hf_checkpoint import ConvertError, _read_json
from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, HFTokenizer

SETTINGS = "polar_tokenizer.json"


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # tokenizer_config.json may store an AddedToken as a dict
        return value.get("content")
    return value if isinstance(value, str) else None


def read_library(path: Path):
    """tokenizer.json as a `tokenizers` Tokenizer; a file the library cannot read is a ConvertError
    naming it (the library raises a bare Exception)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConvertError(f"{path}: not a tokenizer.json the `tokenizers` library can read ({e})") from e


def library_vocab_size(lib) -> int:
    """The rows an embedding needs for every id of `lib` (ids may leave holes), as HFTokenizer counts."""
    ids = lib.get_vocab(with_added_tokens=True).values()
    return max(lib.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def gguf_tokenizer_dir(src: Path, gguf_file: str, work: Path) -> Path:
    """Writes the GGUF file's tokenizer as tokenizer.json (+ tokenizer_config.json) into `work`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file)
    tok.save_pretrained(str(work))
    return work


def special_strings(tok_dir: Path, config: dict, bos: str | None, pad: str | None) -> tuple[str, str]:
    """BOS and PAD strings: the arguments, else tokenizer_config.json, else config.json's ids."""
    tc_path = tok_dir / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.is_file() else {}
    lib = read_library(tok_dir / "tokenizer.json")

    def from_id(key: str) -> str | None:
        tid = config.get(key)
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        return lib.id_to_token(tid) if isinstance(tid, int) else None

    bos = bos or _token_text(tc.get("bos_token")) or from_id("bos_token_id")
    pad = (pad or _token_text(tc.get("pad_token")) or from_id("pad_token_id")
           or _token_text(tc.get("eos_token")) or from_id("eos_token_id"))
    if not bos:
        raise ConvertError(f"{tok_dir}: the tokenizer names no BOS token (tokenizer_config.json bos_token, "
                           "config.json bos_token_id); pass --bos TOKEN")
    if not pad:
        raise ConvertError(f"{tok_dir}: the tokenizer names no pad or EOS token; pass --pad TOKEN")
    return bos, pad


def _serve_with_bos(lib, bos: str) -> None:
    """The engine reads every input as BOS + the text's ids (POLAR's inputs start with BOS, as
    InternLM2's tokenizer adds it). A server (transformers, vLLM, SGLang) encodes the serving string
    through the file's post-processor, which some sources leave without BOS (Qwen2's only adjusts
    offsets): the exported file prepends it, keeping the source's own processor for the rest."""
    from tokenizers import processors

    bos_id = lib.token_to_id(bos)
    if lib.encode("a", add_special_tokens=True).ids[:1] == [bos_id]:
        return  # the source already serves BOS first (Llama's template)
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, bos_id)])
    lib.post_processor = template if lib.post_processor is None else processors.Sequence([lib.post_processor, template])


def write_tokenizer(tok_dir: Path, dst: Path, bos: str, pad: str, reward_sep: str = REWARD_SEP_TEXT,
                    reward_token: str = REWARD_TOKEN_TEXT) -> HFTokenizer:
    """dst/tokenizer.json (the reward tokens added as special tokens where missing),
    dst/tokenizer_config.json and dst/polar_tokenizer.json; returns the loaded tokenizer."""
    from tokenizers import AddedToken

    src_file = tok_dir / "tokenizer.json"
    if not src_file.is_file():
        raise ConvertError(f"{tok_dir}: no tokenizer.json; pass --tokenizer DIR with the model's tokenizer.json "
                           "(e.g. AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
    dst.mkdir(parents=True, exist_ok=True)
    lib = read_library(src_file)
    for text in (bos, pad):
        if lib.token_to_id(text) is None:
            raise ConvertError(f"{src_file}: the vocabulary has no {text!r}; pass the tokenizer's own token with "
                               "--bos / --pad")
    lib.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                       single_word=False) for t in (reward_sep, reward_token)])
    _serve_with_bos(lib, bos)
    lib.save(str(dst / "tokenizer.json"))
    tc_src = tok_dir / "tokenizer_config.json"
    tc = _read_json(tc_src) if tc_src.is_file() else {}
    # a self-contained fast tokenizer: no slow-tokenizer class or remote code needed to load it
    tc = {k: v for k, v in tc.items() if k not in ("auto_map", "tokenizer_file", "added_tokens_decoder")}
    tc.update({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "pad_token": pad,
               "eos_token": _token_text(tc.get("eos_token")) or pad,
               "add_bos_token": False, "add_eos_token": False,
               "additional_special_tokens": [reward_sep, reward_token]})
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    (dst / SETTINGS).write_text(json.dumps({"bos": bos, "pad": pad, "reward_sep": reward_sep,
                                            "reward_token": reward_token}, indent=1))
    return HFTokenizer(dst, bos=bos, pad=pad, reward_sep=reward_sep, reward_token=reward_token)


def read_settings(tok_dir: Path) -> dict:
    path = tok_dir / SETTINGS
    if not path.is_file():
        raise ConvertError(f"{tok_dir}: no {SETTINGS}; the tokenizer directory of a converted checkpoint holds "
                           "it (pass --tokenizer DIR)")
    settings = _read_json(path)
    for key in ("bos", "pad", "reward_sep", "reward_token"):
        if not isinstance(settings.get(key), str) or not settings[key]:
            got = "missing" if key not in settings else f"got {settings[key]!r:.60}"
            raise ConvertError(f"{path}: {key!r} must name a token string ({got})")
    return settings


def load(tok_dir: Path) -> HFTokenizer:
    s = read_settings(tok_dir)
    file = tok_dir / "tokenizer.json"
    if not file.is_file():
        raise ConvertError(f"{tok_dir}: no tokenizer.json beside {SETTINGS}")
    lib = read_library(file)
    # checked here so the message names the setting at fault; HFTokenizer would only name the token
    for key in ("bos", "pad"):
        if lib.token_to_id(s[key]) is None:
            raise ConvertError(f"{tok_dir / SETTINGS}: {key}={s[key]!r} is not in {file}'s vocabulary; the two "
                               "files do not belong together")
    try:
        return HFTokenizer(tok_dir, bos=s["bos"], pad=s["pad"], reward_sep=s["reward_sep"],
                           reward_token=s["reward_token"])
    except ValueError as e:  # e.g. reward tokens that share an id with BOS or PAD
        raise ConvertError(f"{e} (tokens named by {tok_dir / SETTINGS})") from e


def copy_tokenizer(tok_dir: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", SETTINGS):
        if (tok_dir / name).is_file():
            # a new file (0666 less the umask), not the source's mode: the export is read by servers
            # and teammates, whoever owned the source
            shutil.copyfile(tok_dir / name, dst / name)
