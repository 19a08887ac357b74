"""Model weights in a canonical, layout-free form, for checkpoint converters.

Converters (polar/convert) translate an outside checkpoint into this form and back; this module
alone knows where each tensor lives in the megatron model chunks of one process, including its
tensor-parallel shard and, under pipelining, which layers this process holds. Full (unsharded)
shapes, with heads = model.num_attention_heads, groups = model.num_query_groups, d = head size,
h = hidden size, f = FFN size, V = model.vocab_size (real rows, no TP padding):

    embedding               [V, h]
    layers.{i}.attn_norm    [h]           layers.{i}.mlp_norm  [h]
    layers.{i}.q            [heads*d, h]  layers.{i}.q_bias    [heads*d]   (model.add_qkv_bias)
    layers.{i}.k, .v        [groups*d, h] layers.{i}.k_bias, .v_bias [groups*d]
    layers.{i}.o            [h, heads*d]
    layers.{i}.gate, .up    [f, h]        layers.{i}.down      [h, f]
    final_norm              [h]
    value_head              [1, h]
    lm_head                 [V, h]        optional: a causal LM's output layer, kept for the
                                          auxiliary next-token loss (train.aux_lm_weight > 0)

Megatron fuses q, k and v into one `linear_qkv` whose output rows are grouped per key-value group:
for each group g, the rows of its heads/groups query heads, then its key head, then its value head
([q_g0 .. q_g(r-1), k_g, v_g]). Tensor parallelism splits those rows by whole groups, so each rank
holds groups/tp complete groups. `linear_fc1` is [gate; up] per rank (SwiGLU).
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig


def canonical_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f = model.hidden_size, model.ffn_hidden_size
    d = h // model.num_attention_heads
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"embedding": (model.vocab_size, h), "final_norm": (h,), "value_head": (1, h)}
    for i in range(model.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (h,), p + "q": (q, h), p + "k": (kv, h), p + "v": (kv, h), p + "o": (h, q),
                       p + "mlp_norm": (h,), p + "gate": (f, h), p + "up": (f, h), p + "down": (h, f)})
        if model.add_qkv_bias:
            shapes.update({p + "q_bias": (q,), p + "k_bias": (kv,), p + "v_bias": (kv,)})
    return shapes


OPTIONAL = ("lm_head",)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q [heads*d, ...], k/v [groups*d, ...] -> megatron's per-group [q_g.., k_g, v_g] rows."""
    rest = q.shape[1:]
    qg = q.reshape(groups, -1, *rest)
    kg, vg = k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int):
    """Inverse of fuse_qkv -> (q, k, v)."""
    rest = qkv.shape[1:]
    d = qkv.shape[0] // (heads + 2 * groups)
    per = qkv.reshape(groups, (heads // groups + 2) * d, *rest)
    r = heads // groups * d
    q, k, v = per[:, :r], per[:, r:r + d], per[:, r + d:]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _input_norm(layer):
    # TE spec: the norm is fused into linear_qkv; local spec: a module of its own
    qkv = layer.self_attention.linear_qkv
    return qkv.layer_norm_weight if hasattr(qkv, "layer_norm_weight") else layer.input_layernorm.weight


def _mlp_norm(layer):
    fc1 = layer.mlp.linear_fc1
    return fc1.layer_norm_weight if hasattr(fc1, "layer_norm_weight") else layer.pre_mlp_layernorm.weight


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def check_canonical(tensors: dict, model: ModelConfig, source: str = "weights") -> None:
    """Every expected tensor present with its shape, nothing else: a message naming the first problem."""
    shapes = canonical_shapes(model)
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} (and {len(missing) - 1} more) for the model "
                         f"configuration (num_layers={model.num_layers}, add_qkv_bias={model.add_qkv_bias})")
    extra = sorted(set(tensors) - set(shapes) - set(OPTIONAL))
    if extra:
        raise ValueError(f"{source}: unexpected tensor {extra[0]!r} for the model configuration")
    if "lm_head" in tensors:
        shapes = {**shapes, "lm_head": shapes["embedding"]}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the model "
                             f"configuration needs {shape}")


@torch.no_grad()
def load_canonical(chunks, tensors: dict, model: ModelConfig) -> None:
    """Copies the canonical full tensors into this process's shards (any TP/PP/VPP layout)."""
    check_canonical(tensors, model)
    rank, tp = _tp()
    groups = model.num_query_groups

    def shard(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t.chunk(tp, dim=dim)[rank]

    def vocab_rows(weight: torch.Tensor, full: torch.Tensor, start: int) -> None:
        # this rank's rows of a vocabulary-parallel weight; rows past the real vocabulary (TP
        # padding) are no token and stay zero
        weight.zero_()
        real = full[start:start + weight.shape[0]]
        weight[: real.shape[0]].copy_(real)

    for chunk in map(_unwrap, chunks):
        if chunk.pre_process:
            emb = chunk.backbone.embedding.word_embeddings
            vocab_rows(emb.weight, tensors["embedding"], emb.vocab_start_index)
        for layer in chunk.backbone.decoder.layers:
            p = f"layers.{layer.layer_number - 1}."
            att = layer.self_attention
            _input_norm(layer).copy_(tensors[p + "attn_norm"])
            att.linear_qkv.weight.copy_(shard(fuse_qkv(tensors[p + "q"], tensors[p + "k"], tensors[p + "v"], groups)))
            if model.add_qkv_bias:
                att.linear_qkv.bias.copy_(
                    shard(fuse_qkv(tensors[p + "q_bias"], tensors[p + "k_bias"], tensors[p + "v_bias"], groups)))
            att.linear_proj.weight.copy_(shard(tensors[p + "o"], 1))
            _mlp_norm(layer).copy_(tensors[p + "mlp_norm"])
            layer.mlp.linear_fc1.weight.copy_(torch.cat([shard(tensors[p + "gate"]), shard(tensors[p + "up"])]))
            layer.mlp.linear_fc2.weight.copy_(shard(tensors[p + "down"], 1))
        if chunk.post_process:
            chunk.final_norm.weight.copy_(tensors["final_norm"])
            chunk.value_head.weight.copy_(tensors["value_head"])
            if chunk.lm_head is not None and "lm_head" in tensors:
                vocab_rows(chunk.lm_head.weight, tensors["lm_head"], rank * chunk.lm_head.weight.shape[0])


@torch.no_grad()
def export_canonical(chunks, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The canonical full tensors of a model built at TP1/PP1 (load any checkpoint at that layout
    first: dist_checkpointing reshards it)."""
    _, tp = _tp()
    if tp != 1 or len(chunks) != 1 or not (_unwrap(chunks[0]).pre_process and _unwrap(chunks[0]).post_process):
        raise ValueError("export_canonical needs the model built at parallel.tp=1, parallel.pp=1")
    chunk = _unwrap(chunks[0])
    out = {"embedding": chunk.backbone.embedding.word_embeddings.weight[: model.vocab_size].clone()}
    for layer in chunk.backbone.decoder.layers:
        p = f"layers.{layer.layer_number - 1}."
        att = layer.self_attention
        out[p + "attn_norm"] = _input_norm(layer).clone()
        out[p + "q"], out[p + "k"], out[p + "v"] = (t.clone() for t in split_qkv(
            att.linear_qkv.weight, model.num_attention_heads, model.num_query_groups))
        if model.add_qkv_bias:
            out[p + "q_bias"], out[p + "k_bias"], out[p + "v_bias"] = (t.clone() for t in split_qkv(
                att.linear_qkv.bias, model.num_attention_heads, model.num_query_groups))
        out[p + "o"] = att.linear_proj.weight.clone()
        out[p + "mlp_norm"] = _mlp_norm(layer).clone()
        gate, up = layer.mlp.linear_fc1.weight.chunk(2)
        out[p + "gate"], out[p + "up"] = gate.clone(), up.clone()
        out[p + "down"] = layer.mlp.linear_fc2.weight.clone()
    out["final_norm"] = chunk.final_norm.weight.clone()
    out["value_head"] = chunk.value_head.weight.clone()
    if chunk.lm_head is not None:
        out["lm_head"] = chunk.lm_head.weight[: model.vocab_size].clone()
    return out
