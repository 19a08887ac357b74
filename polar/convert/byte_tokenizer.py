"""The byte tokenizer (polar.tokenizer.ByteTokenizer) written as a tokenizer directory, so that a
model trained on bytes (the embedded default) exports to transformers, vLLM and SGLang like any
other: `tokenizer(text)["input_ids"]` there equals ByteTokenizer's served reading, BOS first.

A byte-level BPE with no merges: each UTF-8 byte is one token whose id is the byte's value, under
the printable stand-in characters of the byte-level alphabet (GPT-2's, which the `tokenizers`
ByteLevel pre-tokenizer and decoder use). The four specials keep ByteTokenizer's ids 256-259.
BOS and PAD have no literal in ByteTokenizer's training reading; a tokenizer.json needs one, and
matches every added token in text, so ByteTokenizer's served reading (polar serve, score, format)
reads the same two strings as BOS and PAD too.
"""
from __future__ import annotations

import json
from pathlib import Path

from polar.tokenizer import BYTE_BOS_TEXT as BOS_TEXT
from polar.tokenizer import BYTE_PAD_TEXT as PAD_TEXT
from polar.tokenizer import REWARD_SEP_TEXT, REWARD_TOKEN_TEXT, ByteTokenizer


def byte_stand_ins() -> dict[int, str]:
    """Byte value -> its character in the byte-level alphabet: printable Latin-1 bytes stand for
    themselves, the others (controls, space, NBSP, soft hyphen) for 256, 257, ... in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in set(kept)]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + k) for k, b in enumerate(moved)}}


def write_byte_tokenizer(dst: Path) -> Path:
    """tokenizer.json, tokenizer_config.json and polar_tokenizer.json of ByteTokenizer in `dst`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    b = ByteTokenizer
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in byte_stand_ins().items()}, merges=[]))
    # use_regex=False: no split into words, so no merge rule could ever apply across them either.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = {BOS_TEXT: b.bos_id, PAD_TEXT: b.pad_id, REWARD_SEP_TEXT: b.reward_sep_id,
                REWARD_TOKEN_TEXT: b.reward_token_id}
    for text, want in sorted(specials.items(), key=lambda kv: kv[1]):  # appended in id order: 256, 257, ...
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        assert tok.token_to_id(text) == want, (text, tok.token_to_id(text), want)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TEXT} $A", special_tokens=[(BOS_TEXT, b.bos_id)])
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TEXT, "eos_token": PAD_TEXT,
        "pad_token": PAD_TEXT, "additional_special_tokens": [REWARD_SEP_TEXT, REWARD_TOKEN_TEXT],
        "clean_up_tokenization_spaces": False}, indent=1))
    (dst / "polar_tokenizer.json").write_text(json.dumps({
        "bos": BOS_TEXT, "pad": PAD_TEXT, "reward_sep": REWARD_SEP_TEXT, "reward_token": REWARD_TOKEN_TEXT}, indent=1))
    return dst
