"""InternLM2 checkpoints: InternLM2ForCausalLM and InternLM2ForRewardModel (the released POLAR
models' class; remote code on the HF hub, so only its weight layout and config are used here).

InternLM2 fuses q, k and v into `attention.wqkv`, whose rows are grouped per key-value group:
[q_0 .. q_{r-1}, k, v] for each group (r = heads / kv heads), which is megatron's own layout
(engine.weights.fuse_qkv / split_qkv). The MLP is w1 (gate), w3 (up), w2 (down). The reward
model's `v_head` ([1, hidden], no bias) is the value head; `reward_token_id` in config.json names
the token its reward is read at.
"""
from __future__ import annotations

import torch

from engine.weights import fuse_qkv, split_qkv
from polar.convert.common import Reader, check_head_dim, decoder_settings, rope_to_hf
from polar.convert.hf_checkpoint import ConvertError, HFCheckpoint

ARCHITECTURES = {"InternLM2ForCausalLM": "internlm2", "InternLM2ForRewardModel": "internlm2"}

_LAYER = {"attn_norm": "attention_norm.weight", "o": "attention.wo.weight", "mlp_norm": "ffn_norm.weight",
          "gate": "feed_forward.w1.weight", "up": "feed_forward.w3.weight", "down": "feed_forward.w2.weight"}


def model_config(cfg: dict, src) -> dict:
    check_head_dim(cfg, src)
    # InternLM2Config's defaults: bias true, 2048 positions
    if cfg.get("bias", True):
        absent = "" if "bias" in cfg else " (absent: InternLM2's default is true)"
        raise ConvertError(f"{src}/config.json: bias={cfg.get('bias', True)!r:.60}{absent}: biases on every InternLM2 "
                           "linear layer are not supported (bias false only)")
    fields = decoder_settings(cfg, src, add_qkv_bias=False, default_positions=2048)
    if fields["rope_scaling"] in ("llama3", "yarn"):  # InternLM2's modeling code knows linear and dynamic only
        raise ConvertError(f"{src}/config.json: {fields['rope_scaling']} RoPE scaling is not part of InternLM2 "
                           "(its code runs linear and dynamic only)")
    return fields


def to_canonical(ckpt: HFCheckpoint, shapes: dict, heads: int, groups: int) -> dict[str, torch.Tensor]:
    r = Reader(ckpt, ignore=("rotary_emb.inv_freq",))
    out = {"embedding": r.take("model.tok_embeddings.weight", shapes["embedding"])}
    layers = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("layers.")})
    for i in layers:
        p, src = f"layers.{i}.", f"model.layers.{i}."
        q, k = shapes[p + "q"], shapes[p + "k"]
        wqkv = r.take(src + "attention.wqkv.weight", (q[0] + 2 * k[0], q[1]))
        out[p + "q"], out[p + "k"], out[p + "v"] = split_qkv(wqkv, heads, groups)
        for part, name in _LAYER.items():
            out[p + part] = r.take(src + name, shapes[p + part])
    out["final_norm"] = r.take("model.norm.weight", shapes["final_norm"])
    out["value_head"] = r.take("v_head.weight", shapes["value_head"]) if r.has("v_head.weight") else None
    if r.has("output.weight"):  # the causal LM's head, kept for the auxiliary next-token loss
        out["lm_head"] = r.take("output.weight", shapes["embedding"])
    r.finish("InternLM2")
    return out


def from_canonical(tensors: dict, groups: int) -> dict[str, torch.Tensor]:
    """canonical -> the tensors of InternLM2ForRewardModel."""
    out = {"model.tok_embeddings.weight": tensors["embedding"], "model.norm.weight": tensors["final_norm"],
           "v_head.weight": tensors["value_head"]}
    layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("layers.")})
    for i in layers:
        p, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "attention.wqkv.weight"] = fuse_qkv(tensors[p + "q"], tensors[p + "k"], tensors[p + "v"], groups)
        for part, name in _LAYER.items():
            out[dst + name] = tensors[p + part]
    return out


def hf_config(model, pad_token_id: int, bos_token_id: int, eos_token_id: int, reward_token_id: int,
              dtype: str) -> dict:
    if model.add_qkv_bias:
        raise ConvertError("--format internlm2-reward: the model has q/k/v biases (model.add_qkv_bias=true), "
                           "which InternLM2 cannot hold; use --format hf (LlamaForSequenceClassification)")
    if model.rope_scaling in ("llama3", "yarn"):  # InternLM2's modeling code knows linear and dynamic only
        raise ConvertError(f"--format internlm2-reward: the model uses {model.rope_scaling} RoPE scaling, which "
                           "InternLM2's code does not implement; use --format hf (LlamaForSequenceClassification)")
    return {
        "architectures": ["InternLM2ForRewardModel"],
        "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForRewardModel"},
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rotary_base,
        "rope_scaling": rope_to_hf(model),
        "max_position_embeddings": model.max_position_embeddings,
        "vocab_size": model.vocab_size,
        "bias": False,
        "tie_word_embeddings": False,
        "reward_token_id": reward_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
        "initializer_range": model.init_method_std,
        "attn_implementation": "eager",
    }
