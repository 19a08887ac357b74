"""Tiny random checkpoints in transformers' layout, built in the tests (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(56)]
SPECIALS = ["<unk>", "<s>", "</s>", "<|reward|>", "[UNUSED_TOKEN_130]"]


def write_tokenizer(path: Path, with_reward_tokens: bool = True) -> int:
    """A word-level tokenizer.json (+ tokenizer_config.json); returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = SPECIALS if with_reward_tokens else SPECIALS[:3]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "pad_token": "</s>"}))
    return len(vocab)


def llama_config(family: str = "llama", vocab: int = 61, **extra):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[family]
    kw = dict(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, num_labels=1,
              pad_token_id=2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(extra)
    return cls(**kw)


def random_seq_cls(config, seed: int = 0):
    """A ...ForSequenceClassification with every weight random (norms and the score too)."""
    import transformers

    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForSequenceClassification, "qwen2": transformers.Qwen2ForSequenceClassification,
           "mistral": transformers.MistralForSequenceClassification}[config.model_type]
    model = cls(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def save(model, path: Path, with_reward_tokens: bool = True, max_shard_size=None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    write_tokenizer(path, with_reward_tokens)
    return path


def len_vocab() -> int:
    return len(SPECIALS) + len(WORDS)
