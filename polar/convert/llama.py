"""Llama, Mistral and Qwen2 checkpoints (causal LM or one-label sequence classification).

Qwen2 is Llama with biases on the q, k and v projections (never on o_proj); a Llama config's
`attention_bias` puts biases on all four, which the engine holds where o_proj's are zero (a model
this converter exported: it writes q/k/v biases that way). A sequence
classification checkpoint's `score` ([1, hidden], no bias) is the value head; a causal LM gets a
zero value head (POLAR: a new value head starts at zero). A causal LM's head (`lm_head`, or the
embedding when `tie_word_embeddings`) is kept: it starts the auxiliary next-token loss
(train.aux_lm_weight) from the trained head instead of a random one.
"""
from __future__ import annotations

import torch

from polar.convert.common import Reader, check_head_dim, decoder_settings, key_value_heads, rope_to_hf
from polar.convert.hf_checkpoint import ConvertError, HFCheckpoint

ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "LlamaForSequenceClassification": "llama",
    "MistralForCausalLM": "mistral", "MistralForSequenceClassification": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen2ForSequenceClassification": "qwen2",
}
# transformers 5's defaults for keys a config.json may leave out
DEFAULT_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
MISTRAL_WINDOW = 4096
# num_key_value_heads of a config.json without it: a fixed count, not num_attention_heads (Llama's)
KV_HEADS_ABSENT = {"llama": None, "mistral": ("Mistral", 8), "qwen2": ("Qwen2", 32)}


def model_config(cfg: dict, src) -> dict:
    arch = cfg["architectures"][0]
    family = ARCHITECTURES[arch]
    if family == "mistral" and "num_key_value_heads" in cfg and cfg["num_key_value_heads"] is None:
        # MistralConfig types the key int: transformers refuses null rather than default it
        raise ConvertError(f"{src}/config.json: num_key_value_heads must be a positive integer, got None")
    check_head_dim(cfg, src, KV_HEADS_ABSENT[family])
    # Mistral's code builds no biases whatever attention_bias says, Qwen2's q/k/v ones always
    if cfg.get("attention_bias") and family != "llama":
        raise ConvertError(f"{src}/config.json: attention_bias=true (biases on q/k/v AND o_proj) is not supported; "
                           "the engine supports q/k/v biases only (Qwen2)")
    if cfg.get("mlp_bias"):
        raise ConvertError(f"{src}/config.json: mlp_bias=true is not supported (the MLP has no biases)")
    if family == "mistral" and cfg.get("sliding_window", MISTRAL_WINDOW) is not None:
        absent = "" if "sliding_window" in cfg else f" (absent: Mistral's default is {MISTRAL_WINDOW})"
        raise ConvertError(f"{src}/config.json: sliding-window attention (sliding_window="
                           f"{cfg.get('sliding_window', MISTRAL_WINDOW)!r:.60}{absent}) is not supported; the engine "
                           "attends over the whole input (sliding_window null)")
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise ConvertError(f"{src}/config.json: use_sliding_window=true is not supported; the engine attends "
                           "over the whole input")
    qkv_bias = family == "qwen2" or bool(cfg.get("attention_bias"))
    return decoder_settings(cfg, src, add_qkv_bias=qkv_bias, default_positions=DEFAULT_POSITIONS[family],
                            kv_absent=KV_HEADS_ABSENT[family])


def _check_defaulted_kv_heads(ckpt: HFCheckpoint, shapes: dict) -> None:
    """Where config.json does not give num_key_value_heads, weights of another count would fail as a
    bare shape mismatch: name the key, its default and the count the weights hold instead."""
    cfg, name = ckpt.config, "model.layers.0.self_attn.k_proj.weight"
    groups, source = key_value_heads(cfg, ckpt.src, KV_HEADS_ABSENT[ARCHITECTURES[cfg["architectures"][0]]])
    if not source or "layers.0.k" not in shapes or name not in ckpt.names():
        return
    rows, head_dim = ckpt.get(name).shape[0], shapes["layers.0.k"][0] // groups
    if rows != groups * head_dim:
        held = (f"{rows // head_dim} key-value heads of size {head_dim}" if rows % head_dim == 0 else
                f"{rows} rows, no whole number of heads of size {head_dim}")
        raise ConvertError(f"{ckpt.src}/config.json: num_key_value_heads={groups}{source}, but {name} holds "
                           f"{held}; give num_key_value_heads in config.json")


def to_canonical(ckpt: HFCheckpoint, shapes: dict) -> dict[str, torch.Tensor]:
    """HF tensors -> canonical tensors (engine.weights); value_head is None for a causal LM, and
    lm_head is present only for one."""
    _check_defaulted_kv_heads(ckpt, shapes)
    r = Reader(ckpt, ignore=("rotary_emb.inv_freq",))
    out = {"embedding": r.take("model.embed_tokens.weight", shapes["embedding"])}
    names = {"attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
             "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias",
             "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
             "mlp_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
             "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}
    for key, shape in shapes.items():
        if key.startswith("layers."):
            _, i, part = key.split(".", 2)
            out[key] = r.take(f"model.layers.{i}.{names[part]}", shape)
    if ckpt.config.get("attention_bias"):  # a Llama with biases on o_proj too: held only where they are zero
        for key in (key for key in shapes if key.endswith(".o")):
            name = f"model.{key[:-1]}self_attn.o_proj.bias"
            if torch.count_nonzero(r.take(name, shapes["final_norm"])):
                raise ConvertError(f"{ckpt.where(name)}: tensor {name!r} is not zero: biases on o_proj "
                                   "(attention_bias=true) are not supported; the engine holds q/k/v biases only")
    out["final_norm"] = r.take("model.norm.weight", shapes["final_norm"])
    out["value_head"] = r.take("score.weight", shapes["value_head"]) if r.has("score.weight") else None
    if r.has("lm_head.weight"):
        out["lm_head"] = r.take("lm_head.weight", shapes["embedding"])
    elif ckpt.config.get("tie_word_embeddings") and out["value_head"] is None:
        out["lm_head"] = out["embedding"]
    r.finish("Llama-family")
    return out


def from_canonical(tensors: dict) -> dict[str, torch.Tensor]:
    """canonical -> the tensors of LlamaForSequenceClassification; q/k/v biases come with zero o_proj
    biases (hf_config's attention_bias)."""
    back = {"attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
            "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias",
            "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
            "mlp_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
            "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}
    out = {"model.embed_tokens.weight": tensors["embedding"], "model.norm.weight": tensors["final_norm"],
           "score.weight": tensors["value_head"]}
    for key, t in tensors.items():
        if key.startswith("layers."):
            _, i, part = key.split(".", 2)
            out[f"model.layers.{i}.{back[part]}"] = t
            if part == "q_bias":
                out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros_like(tensors["final_norm"])
    return out


def hf_config(model, pad_token_id: int, bos_token_id: int, eos_token_id: int, dtype: str) -> dict:
    """Llama's, q/k/v biases included (attention_bias, with zero o_proj biases): transformers 5 builds
    a model_type qwen2 directory its own Qwen2Tokenizer, which keeps only the vocabulary, merges and
    post-processor of tokenizer.json and puts Qwen2's NFC normalizer and pre-tokenizer in place of the
    file's, so a tokenizer other than Qwen2's (the byte tokenizer, a Llama one) would read served texts
    otherwise than the engine; model_type llama reads tokenizer.json as written."""
    return {
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.hidden_size // model.num_attention_heads,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rotary_base,
        "rope_scaling": rope_to_hf(model),
        "max_position_embeddings": model.max_position_embeddings,
        "vocab_size": model.vocab_size,
        "tie_word_embeddings": False,
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "initializer_range": model.init_method_std,
        "use_cache": False,
        "attention_bias": model.add_qkv_bias,
        "mlp_bias": False,
    }
