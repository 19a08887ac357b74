"""`polar plan`: which TP / PP / VPP / DP / micro-batch layout to launch, what it needs per GPU, how long a
step takes, before a cluster allocation is spent.

    polar plan --config polar_7b --gpu H100 --gpus 64
    polar plan --config polar_1_8b --gpu H200 --gpus 16 data.seq_length=8192 train.global_batch=512
    polar plan --config polar_7b --gpu H100 --gpus 64 --measured gpu_runs.json   # predictions beside runs

It enumerates every layout the engine accepts for the model, the GPU count and the batch
(engine.runtime.validate_layout's rules, tensor parallelism inside one node, sequence parallelism with
tensor parallelism), estimates for each the memory of the fullest GPU and the time of one optimizer step,
ranks them (layouts that fit first, then by step time) and recommends the first, saying why.

The model behind the estimates (every constant is printed with the plan):

Parameters per rank are counted exactly as the engine builds them (megatron's parallel linears, no
biases, SwiGLU, grouped-query attention; the embedding on the first pipeline stage, the final norm and
value head (and the auxiliary LM head, if on) on the last); tests/polar/test_plan.py checks the counts
against the engine's model at TP1, TP2, PP2 and TP2 x PP2.

Memory per GPU, for the pipeline rank that needs most:
- weights: 2 bytes per parameter in bf16 (4 in fp32);
- gradients: 4 bytes per parameter (the engine reduces gradients in an fp32 buffer);
- optimizer: Adam's two moments, plus fp32 master weights when the weights are bf16 (12 or 8 bytes per
  parameter), divided over the data-parallel ranks with the distributed optimizer;
- FP8 (when asked): an e4m3 copy of every linear weight and its transpose (2 bytes per linear parameter);
- activations kept for the backward pass, per layer and micro-batch of b sequences of s tokens (bf16;
  TP = t, sequence parallelism divides the norm inputs and outputs by t):
  norms 3 x 2 tensors of [s, b, h] (input, normalised input, output) + the QKV output, K and Q after
  RoPE and the attention output [s, b, (h + 2 kv) + (kv + 2 h)] / t + the fc1 output, silu, the linear
  half plus offset and their product [s, b, 5 ffn] / t (layer_activation_bytes lists them). With the
  torch attention backend the dense [b, s, s] bool mask is kept once and SDPA's additive copy of it per
  layer (b s^2 in the compute dtype: 0.5 GB per layer at 16k in bf16). Full recomputation keeps only each layer's
  input [s, b, h] (/t under SP) and one layer's activations while it is recomputed; selective
  recomputation (megatron's core-attention recompute) drops the attention's internal state, which a
  flash-style kernel does not keep anyway. A pipeline rank holds the activations of the micro-batches in
  flight under 1F1B: pp - rank of them (interleaved: 2 (pp - rank - 1) + (vpp - 1) pp + 1 model chunks);
- transient: the larger of the backward pass's extra (the largest single gradient as autograd produces
  it, before it is added into the buffer, and the gradients of one layer's fc1 output) and the optimizer
  step's temporaries beyond the activations then freed (torch's AdamW without TE / Apex: one fp32 copy of
  the optimizer shard on GPU; on CPU two fp32 temporaries of the largest parameter);
- a fixed allowance per GPU for the CUDA context, NCCL buffers and allocator fragmentation.

Step time: compute = model FLOPs (engine.progress's counter: dense matmuls per token plus attention per
visible (query, key) pair) at the stated fraction of the card's dense bf16 peak, plus recomputed
FLOPs; pipeline bubble (pp - 1) / (vpp x micro-batches) of it; tensor-parallel all-reduces (or all-gathers
and reduce-scatters under SP, the same volume) per layer, forward and backward, not overlapped; pipeline
sends per micro-batch and chunk; the distributed optimizer's gradient reduce-scatter (fp32) and parameter
all-gather (bf16), exposed unless --overlap; the Adam update at HBM bandwidth. Ring collectives move
2 (n-1)/n (all-reduce) or (n-1)/n (all-gather, reduce-scatter) of the data per GPU; a group within one
node moves at NVLink bandwidth, a group spanning nodes at the per-GPU network bandwidth (one NIC per GPU).
Megatron orders ranks tp, dp, pp (tp fastest), which decides which groups leave a node.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GB = 1e9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # bytes / 1e9 that CUDA reports as total
    bf16_tflops: float  # dense (no sparsity) peak
    fp8_tflops: Optional[float]  # dense peak; None: no FP8 tensor cores
    nvlink_gbs: float  # NVLink bandwidth per GPU per direction, GB/s
    network_gbs: float  # scale-out bandwidth per GPU per direction, GB/s (one NIC per GPU)
    hbm_tbs: float  # memory bandwidth, TB/s
    gpus_per_node: int
    source: str


# Spec-sheet values of the SXM parts in their 8-GPU HGX/DGX boards.
GPUS = {
    "H100": GPU("H100", 79.6, 989.0, 1979.0, 450.0, 50.0, 3.35, 8,
                "H100 SXM5 80 GB (81559 MiB reported): 989 TFLOP/s dense bf16, 1979 fp8, NVLink 4 900 GB/s "
                "bidirectional, ConnectX-7 400 Gb/s per GPU, HBM3 3.35 TB/s"),
    "H200": GPU("H200", 141.0, 989.0, 1979.0, 450.0, 50.0, 4.8, 8,
                "H200 SXM 141 GB: 989 TFLOP/s dense bf16, 1979 fp8, NVLink 4 900 GB/s bidirectional, "
                "400 Gb/s per GPU, HBM3e 4.8 TB/s"),
    "A100": GPU("A100", 79.2, 312.0, None, 300.0, 25.0, 2.04, 8,
                "A100 SXM4 80 GB: 312 TFLOP/s dense bf16, no fp8, NVLink 3 600 GB/s bidirectional, "
                "HDR 200 Gb/s per GPU, HBM2e 2.04 TB/s"),
    "B200": GPU("B200", 180.0, 2250.0, 4500.0, 900.0, 50.0, 8.0, 8,
                "B200 (DGX B200, 180 GB per GPU): 2.25 PFLOP/s dense bf16, 4.5 fp8, NVLink 5 1.8 TB/s "
                "bidirectional, 400 Gb/s per GPU, HBM3e 8 TB/s"),
}


@dataclass(frozen=True)
class Assumptions:
    """Every constant the estimates use, printed with each plan."""

    compute_efficiency: float = 0.5  # fraction of the dense peak the kernels reach while computing
    collective_efficiency: float = 0.8  # fraction of a link's bandwidth a NCCL ring reaches
    fp8_speedup: float = 1.5  # dense matmuls under FP8 against bf16 (quantisation included); attention stays bf16
    overhead_gb: float = 3.0  # CUDA context, NCCL buffers, allocator fragmentation per GPU
    # a layout fits when its estimate stays under this fraction of memory: the estimate is an estimate, and a
    # run at the edge of memory fails on the first longer-than-usual batch or allocator hiccup
    usable_fraction: float = 0.9
    overlap_dp: bool = False  # gradient reduce-scatter / parameter all-gather overlapped with compute
    group_length: Optional[int] = None  # tokens one query may see at most (a group); None: the whole pack

    def lines(self) -> list[str]:
        return [
            f"compute at {self.compute_efficiency:.0%} of the dense bf16 peak"
            + (f"; FP8 matmuls {self.fp8_speedup:g}x faster than bf16" if self.fp8_speedup else ""),
            f"collectives at {self.collective_efficiency:.0%} of the link bandwidth; tensor-parallel and pipeline "
            "communication not overlapped; data-parallel "
            + ("overlapped with the last micro-batch's backward / first forward" if self.overlap_dp else
               "communication not overlapped (the engine's default)"),
            "attention: every token sees "
            + (f"up to {self.group_length} tokens (one group)" if self.group_length else
               "all earlier tokens of its pack (an upper bound for shared-prefix packing)"),
            f"{self.overhead_gb:g} GB per GPU for the CUDA context, NCCL and fragmentation; a layout fits under "
            f"{self.usable_fraction:.0%} of the card's memory",
            "MFU: model FLOPs (no recomputation) per second over the dense bf16 peak, also with FP8",
        ]


@dataclass(frozen=True)
class Shape:
    """The model settings that decide parameters, FLOPs and activations (engine.config.ModelConfig)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    lm_head: bool = False  # train.aux_lm_weight > 0 adds a vocabulary-parallel LM head on the last stage

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.head_dim


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vpp: Optional[int] = None
    micro_batch: int = 1
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    distributed_optimizer: bool = True

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    def name(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"] + ([f"VPP{self.vpp}"] if self.vpp else []) + [f"DP{self.dp}"]
        recompute = "" if self.recompute == "none" else f" rc-{self.recompute}"
        return "x".join(parts) + f" mb{self.micro_batch}" + recompute


# ---- parameters ------------------------------------------------------------------------------------------

def layer_params(shape: Shape, tp: int) -> int:
    """One transformer layer on one TP rank: two RMSNorm weights (replicated), column-parallel QKV and
    SwiGLU fc1, row-parallel output projection and fc2, no biases."""
    h, d = shape.hidden_size, shape.head_dim
    q = shape.num_attention_heads * d
    qkv = h * (q + 2 * shape.kv_size) // tp
    proj = q // tp * h
    fc1 = h * 2 * shape.ffn_hidden_size // tp
    fc2 = shape.ffn_hidden_size // tp * h
    return 2 * h + qkv + proj + fc1 + fc2


def linear_params(shape: Shape, tp: int) -> int:
    """The parameters of one layer that FP8 matmuls quantise (everything but the norms)."""
    return layer_params(shape, tp) - 2 * shape.hidden_size


def params_per_rank(shape: Shape, tp: int, pp: int, pp_rank: int) -> int:
    """Parameters one process holds at pipeline position pp_rank (any TP rank: shards are equal)."""
    n = shape.num_layers // pp * layer_params(shape, tp)
    if pp_rank == 0:
        n += shape.vocab_size // tp * shape.hidden_size  # vocabulary-parallel embedding
    if pp_rank == pp - 1:
        n += 2 * shape.hidden_size  # final RMSNorm + value head Linear(h, 1)
        if shape.lm_head:
            n += shape.hidden_size * shape.vocab_size // tp
    return n


def total_params(shape: Shape) -> int:
    return params_per_rank(shape, 1, 1, 0)


# ---- memory ----------------------------------------------------------------------------------------------

def layer_activation_bytes(shape: Shape, tokens: int, tp: int, sp: bool, act_bytes: int = 2,
                           seq_length: int = 0, attention_backend: str = "triton") -> float:
    """Bytes one layer keeps for its backward pass for `tokens` = s x b tokens of one micro-batch.

    The tensors autograd saves in megatron's local layer with the engine's attention (counted on CPU with
    saved-tensor hooks): per RMSNorm its input, normalised input and output; the QKV output (V is a view
    of it, so all of it stays), K and Q after RoPE, the attention output and its log-sum-exp (fp32); the
    fc1 output (2 ffn), silu of its first half, the second half plus megatron's glu offset (a new tensor)
    and their product. The torch backend also keeps the additive mask SDPA makes of the bool mask."""
    h, f, kv = shape.hidden_size, shape.ffn_hidden_size, shape.kv_size
    c = 1.0 / tp if sp else 1.0
    norms = 2 * 3 * h * c
    attention = (h + 2 * kv) / tp + (kv + 2 * h) / tp
    mlp = 5 * f / tp
    out = act_bytes * tokens * (norms + attention + mlp) + 4 * tokens * shape.num_attention_heads / tp
    if attention_backend == "torch":
        out += act_bytes * tokens * seq_length  # [b, 1, s, s]: broadcast over the heads
    return out


def layers_in_flight(shape: Shape, layout: Layout, pp_rank: int, microbatches: int) -> float:
    """Layer activations (in units of one layer x one micro-batch) a pipeline rank holds at its peak."""
    per_chunk = shape.num_layers // (layout.pp * layout.chunks)
    if layout.pp == 1:
        return shape.num_layers  # micro-batches run forward and backward one after another
    if layout.vpp:
        warmup = 2 * (layout.pp - pp_rank - 1) + (layout.vpp - 1) * layout.pp
        return min(warmup + 1, microbatches * layout.vpp) * per_chunk
    return min(layout.pp - pp_rank, microbatches) * per_chunk


def memory_per_rank(shape: Shape, layout: Layout, seq_length: int, global_batch: int, pp_rank: int,
                    precision: str = "bf16", fp8: bool = False, attention_backend: str = "triton",
                    overhead_gb: float = 0.0, device: str = "gpu") -> dict:
    """Bytes by component for one process at pipeline position pp_rank (see the module docstring).

    The peak comes either in the backward pass (activations plus the largest gradient autograd produces
    before it is added into the buffer) or in the optimizer step (Adam's temporaries); `transient` is what
    the larger of the two adds beyond the activations, so the components sum to the total."""
    n = params_per_rank(shape, layout.tp, layout.pp, pp_rank)
    w_bytes = 4 if precision == "fp32" else 2
    opt_per_param = 8 if precision == "fp32" else 12
    shard = layout.dp if layout.distributed_optimizer else 1
    m = global_batch // (layout.dp * layout.micro_batch)
    tokens = seq_length * layout.micro_batch
    per_layer = layer_activation_bytes(shape, tokens, layout.tp, layout.sequence_parallel, w_bytes, seq_length,
                                       attention_backend)
    in_flight = layers_in_flight(shape, layout, pp_rank, m)
    c = 1.0 / layout.tp if layout.sequence_parallel else 1.0
    if layout.recompute == "full":
        activations = in_flight * w_bytes * tokens * shape.hidden_size * c + per_layer
    else:
        activations = in_flight * per_layer
    if attention_backend == "torch":
        activations += layout.micro_batch * seq_length * seq_length  # the dense bool mask, one layout cached
    # while a layer runs backward, autograd holds gradients of its activations: the fc1 output's and another
    backward_working = 2 * w_bytes * tokens * 2 * shape.ffn_hidden_size / layout.tp
    if pp_rank == layout.pp - 1 and shape.lm_head:
        # logits [s, b, V/t] in the compute dtype, their fp32 copy and the softmax kept by the cross-entropy
        activations += tokens * shape.vocab_size / layout.tp * (w_bytes + 8)
    largest = max(shape.hidden_size * (shape.num_attention_heads * shape.head_dim + 2 * shape.kv_size),
                  2 * shape.ffn_hidden_size * shape.hidden_size) // layout.tp
    if pp_rank == 0 or (pp_rank == layout.pp - 1 and shape.lm_head):
        largest = max(largest, shape.vocab_size // layout.tp * shape.hidden_size)
    backward_extra = largest * w_bytes + backward_working
    if device == "cpu":
        # torch's single-tensor AdamW (CPU): sqrt(v) and its quotient, two fp32 temporaries of one parameter
        step_extra = 2 * 4 * min(largest, math.ceil(n / shard))
    else:
        # torch's multi-tensor AdamW (no TE / Apex): one fp32 temporary of the whole optimizer shard
        step_extra = 4 * n / shard
    out = {
        "weights": n * w_bytes,
        "gradients": n * 4,
        "optimizer": n * opt_per_param / shard,
        "fp8": 2 * linear_params(shape, layout.tp) * (shape.num_layers // layout.pp) if fp8 else 0,
        "activations": activations,
        "transient": max(backward_extra, step_extra - activations),
        "overhead": overhead_gb * GB,
    }
    out["total"] = sum(out.values())
    return out


def activation_bytes_by_recompute(shape: Shape, layout: Layout, seq_length: int, global_batch: int,
                                  pp_rank: int, **kw) -> dict:
    return {rc: memory_per_rank(shape, dataclasses.replace(layout, recompute=rc), seq_length, global_batch,
                                pp_rank, **kw)["activations"] for rc in ("none", "selective", "full")}


# ---- time ------------------------------------------------------------------------------------------------

def _ring(kind: str, n: int, nbytes: float, gbs: float, eff: float) -> float:
    """Seconds for a ring collective over n ranks on links of gbs GB/s (per direction) at efficiency eff."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    factor = 2.0 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return factor * nbytes / (gbs * eff * GB)


def model_flops(shape: Shape, seq_length: int, global_batch: int, group_length: Optional[int]) -> dict:
    """Forward + backward FLOPs of one global batch: dense matmuls and attention (engine.progress)."""
    from engine.progress import attention_flops_per_pair, dense_flops_per_token

    tokens = float(seq_length) * global_batch
    dense = tokens * dense_flops_per_token(shape.num_layers, shape.hidden_size, shape.ffn_hidden_size,
                                           shape.num_attention_heads, shape.num_query_groups)
    g = min(group_length or seq_length, seq_length)
    pairs = tokens * (g + 1) / 2.0  # causal within groups of g tokens that fill the pack
    attention = pairs * attention_flops_per_pair(shape.num_layers, shape.hidden_size)
    head = tokens * 6.0 * shape.hidden_size * shape.vocab_size if shape.lm_head else 0.0
    return {"dense": dense + head, "attention": attention, "total": dense + head + attention}


def step_time(shape: Shape, layout: Layout, seq_length: int, global_batch: int, gpu: GPU, a: Assumptions,
              fp8: bool = False) -> dict:
    """Seconds by component of one optimizer step, and the MFU it gives."""
    world = layout.tp * layout.pp * layout.dp
    m = global_batch // (layout.dp * layout.micro_batch)
    fl = model_flops(shape, seq_length, global_batch, a.group_length)
    peak = gpu.bf16_tflops * 1e12 * a.compute_efficiency
    dense_s = fl["dense"] / world / peak
    if fp8:
        dense_s /= a.fp8_speedup
    attn_s = fl["attention"] / world / peak
    compute = dense_s + attn_s
    if layout.recompute == "full":
        recompute = compute / 3.0  # one more forward
    elif layout.recompute == "selective":
        recompute = attn_s / 3.0  # the attention's forward again
    else:
        recompute = 0.0
    bubble = (layout.pp - 1) / (layout.chunks * m) * (compute + recompute)

    node = gpu.gpus_per_node
    eff = a.collective_efficiency
    tp_bw = gpu.nvlink_gbs if layout.tp <= node else gpu.network_gbs
    act = 2.0 * seq_length * layout.micro_batch * shape.hidden_size  # one [s, b, h] bf16 tensor
    ar_per_layer = 4 + (2 if layout.recompute == "full" else 0)  # 2 forward, 2 backward (+2 recomputed)
    layers = shape.num_layers // layout.pp
    tp_comm = m * layers * ar_per_layer * _ring("all_reduce", layout.tp, act, tp_bw, eff)

    pp_comm = 0.0
    if layout.pp > 1:
        pp_bw = gpu.nvlink_gbs if layout.tp * layout.dp * layout.pp <= node else gpu.network_gbs
        msg = act / (layout.tp if layout.sequence_parallel else 1)
        pp_comm = 2 * (m * layout.chunks + layout.pp - 1) * msg / (pp_bw * eff * GB)

    n_max = max(params_per_rank(shape, layout.tp, layout.pp, r) for r in range(layout.pp))
    dp_bw = gpu.nvlink_gbs if layout.tp * layout.dp <= node else gpu.network_gbs
    if layout.distributed_optimizer:
        rs = _ring("reduce_scatter", layout.dp, 4.0 * n_max, dp_bw, eff)
        ag = _ring("all_gather", layout.dp, 2.0 * n_max, dp_bw, eff)
    else:
        rs, ag = _ring("all_reduce", layout.dp, 4.0 * n_max, dp_bw, eff), 0.0
    if a.overlap_dp:
        per_mb = (compute + recompute) / m
        dp_comm = max(0.0, rs - per_mb * 2 / 3) + max(0.0, ag - per_mb / 3)
    else:
        dp_comm = rs + ag
    # Adam: read grad, master, m, v; write master, m, v and the bf16 weight: ~30 bytes per shard parameter
    optimizer = 30.0 * n_max / (layout.dp if layout.distributed_optimizer else 1) / (gpu.hbm_tbs * 1e12)
    total = compute + recompute + bubble + tp_comm + pp_comm + dp_comm + optimizer
    return {"compute": compute, "recompute": recompute, "bubble": bubble, "tp_comm": tp_comm, "pp_comm": pp_comm,
            "dp_comm": dp_comm, "optimizer": optimizer, "total": total,
            "mfu": fl["total"] / (total * world * gpu.bf16_tflops * 1e12),
            "tokens_per_s": seq_length * global_batch / total}


# ---- candidates ------------------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(shape: Shape, gpus: int, global_batch: int, seq_length: int, gpus_per_node: int,
                      micro_batches=(1, 2, 4), recomputes=("none", "selective", "full")) -> list[Layout]:
    """Every layout engine.runtime.validate_layout accepts, TP within a node, SP on with TP."""
    out = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node or any(x % tp for x in (shape.num_attention_heads, shape.num_query_groups,
                                                      shape.ffn_hidden_size, shape.vocab_size)):
            continue
        if tp > 1 and seq_length % tp:
            continue
        for pp in _divisors(gpus // tp):
            if shape.num_layers % pp:
                continue
            dp = gpus // (tp * pp)
            for mb in micro_batches:
                if global_batch % (dp * mb):
                    continue
                m = global_batch // (dp * mb)
                vpps = [None] + [v for v in _divisors(shape.num_layers // pp)
                                 if v >= 2 and pp >= 2 and m % pp == 0]
                for vpp in vpps:
                    for rc in recomputes:
                        out.append(Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, micro_batch=mb, recompute=rc,
                                          sequence_parallel=tp > 1))
    return out


@dataclass
class Estimate:
    layout: Layout
    memory: dict  # the fullest pipeline rank's components
    memory_rank: int
    time: dict
    fits: bool


def estimate(shape: Shape, layout: Layout, seq_length: int, global_batch: int, gpu: GPU, a: Assumptions,
             fp8: bool = False, attention_backend: str = "triton") -> Estimate:
    per_rank = [memory_per_rank(shape, layout, seq_length, global_batch, r, "bf16", fp8, attention_backend,
                                a.overhead_gb) for r in range(layout.pp)]
    worst = max(range(layout.pp), key=lambda r: per_rank[r]["total"])
    mem = per_rank[worst]
    return Estimate(layout, mem, worst, step_time(shape, layout, seq_length, global_batch, gpu, a, fp8),
                    mem["total"] <= a.usable_fraction * gpu.memory_gb * GB)


def prune_dominated(estimates: list[Estimate]) -> list[Estimate]:
    """Drops a recomputation or micro-batch choice that another choice of the same TP/PP/VPP beats on both
    step time and memory (selective recomputation with a flash-style kernel, say: slower, no smaller)."""
    groups: dict = {}
    for e in estimates:
        groups.setdefault((e.layout.tp, e.layout.pp, e.layout.vpp), []).append(e)
    kept = []
    for group in groups.values():
        for e in group:
            if not any(o is not e and o.time["total"] <= e.time["total"] and o.memory["total"] <= e.memory["total"]
                       and (o.time["total"] < e.time["total"] or o.memory["total"] < e.memory["total"])
                       for o in group):
                kept.append(e)
    return kept


def nearest_batches(shape: Shape, gpus: int, global_batch: int, seq_length: int, gpus_per_node: int) -> list[int]:
    """The global batches nearest to global_batch (one below, one above) that some layout accepts."""
    found = []
    for step in (-1, 1):
        b = global_batch + step
        while 0 < b <= 4 * global_batch and not candidate_layouts(shape, gpus, b, seq_length, gpus_per_node,
                                                                  recomputes=("none",)):
            b += step
        if 0 < b <= 4 * global_batch:
            found.append(b)
    return found


def rank_layouts(estimates: list[Estimate]) -> list[Estimate]:
    """Layouts that fit first, then by step time, then by memory."""
    return sorted(estimates, key=lambda e: (not e.fits, e.time["total"], e.memory["total"]))


def recommend(ranked: list[Estimate], within: float = 0.002) -> Optional[Estimate]:
    """The fastest layout that fits; of layouts tied with it (within `within` of its step time) the one that
    needs least memory."""
    fitting = [e for e in ranked if e.fits]
    if not fitting:
        return None
    limit = fitting[0].time["total"] * (1 + within)
    return min((e for e in fitting if e.time["total"] <= limit), key=lambda e: e.memory["total"])


_COMPONENT_WORDS = {"compute": "compute", "recompute": "recomputation", "bubble": "pipeline bubble",
                    "tp_comm": "tensor-parallel communication", "pp_comm": "pipeline communication",
                    "dp_comm": "data-parallel communication", "optimizer": "optimizer update"}


def explain(best: Estimate, ranked: list[Estimate], gpu: GPU, a: Assumptions) -> list[str]:
    """Why the recommended layout: its costs, and what makes the nearest alternatives slower."""
    t, lay = best.time, best.layout
    lines = [f"recommended: {lay.name()}" + (" with sequence parallelism" if lay.sequence_parallel else "")
             + f": {t['total']:.2f} s per step, MFU {t['mfu']:.1%}, {best.memory['total'] / GB:.1f} GB of "
             f"{gpu.memory_gb:g} GB on the fullest GPU (pipeline rank {best.memory_rank})."]
    why = []
    why.append("tensor parallelism stays inside a node's NVLink" if 1 < lay.tp <= gpu.gpus_per_node
               else "no tensor-parallel traffic" if lay.tp == 1 else "")
    why.append("no pipeline bubble" if lay.pp == 1 else
               f"pipeline bubble {t['bubble'] / t['total']:.1%} of the step")
    why.append("no recomputation needed" if lay.recompute == "none" else
               f"{lay.recompute} recomputation is needed to fit ({t['recompute']:.2f} s)")
    fastest = next(e for e in ranked if e.fits)
    lead = ("It is the fastest layout that fits" if fastest is best else
            f"It ties with the fastest layout that fits ({fastest.layout.name()}, "
            f"{fastest.time['total']:.2f} s) and needs less memory")
    lines.append(lead + ": " + "; ".join(w for w in why if w) + ".")
    others = [e for e in ranked if e is not best and e.fits][:3]
    for e in others:
        diff = {k: e.time[k] - t[k] for k in _COMPONENT_WORDS}
        worst = max(diff, key=diff.get)
        lines.append(f"  next: {e.layout.name()}: {e.time['total'] / t['total'] - 1:+.1%}, mostly "
                     f"{_COMPONENT_WORDS[worst]} ({diff[worst]:+.2f} s)")
    return lines


# ---- command line ----------------------------------------------------------------------------------------

def shape_from_config(cfg) -> Shape:
    m = cfg.model
    return Shape(m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
                 m.vocab_size, lm_head=cfg.train.aux_lm_weight > 0)


def load_plan_config(config: Optional[str], overrides: list[str]):
    """The run settings a plan is for: a preset or YAML plus section.key=value (engine.config rules)."""
    from engine.config import EngineConfig, load_config
    from polar.presets import resolve_config

    cfg = load_config(EngineConfig, resolve_config(config), overrides)
    if cfg.model.vocab_size == 0:
        from engine.config import ConfigError

        raise ConfigError("model.vocab_size=0: a plan needs the vocabulary size (set model.vocab_size)")
    return cfg


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def format_table(ranked: list[Estimate], top: int, best: Optional[Estimate] = None) -> list[str]:
    head = (f"{'#':>3} {'layout (* recommended)':<30} {'SP':>2} {'fits':>4} {'GB/GPU':>7} {'act GB':>6} {'step s':>7} "
            f"{'compute':>7} {'recomp':>6} {'bubble':>6} {'TP comm':>7} {'PP comm':>7} {'DP comm':>7} "
            f"{'MFU':>6} {'tok/s/GPU':>9}")
    rows = [head, "-" * len(head)]
    for i, e in enumerate(ranked[:top], 1):
        t, lay = e.time, e.layout
        world = lay.tp * lay.pp * lay.dp
        rows.append(
            f"{i:>3}{'*' if e is best else ' '}{lay.name():<30} {'y' if lay.sequence_parallel else '-':>2} "
            f"{'yes' if e.fits else 'no':>4} "
            f"{_gb(e.memory['total']):>7} {_gb(e.memory['activations']):>6} {t['total']:>7.2f} "
            f"{t['compute']:>7.2f} {t['recompute']:>6.2f} {t['bubble']:>6.2f} {t['tp_comm']:>7.2f} "
            f"{t['pp_comm']:>7.2f} {t['dp_comm']:>7.2f} {t['mfu']:>6.1%} {t['tokens_per_s'] / world:>9,.0f}")
    return rows


def memory_lines(shape: Shape, e: Estimate, seq_length: int, global_batch: int, fp8: bool,
                 attention_backend: str, a: Assumptions) -> list[str]:
    m = e.memory
    acts = activation_bytes_by_recompute(shape, e.layout, seq_length, global_batch, e.memory_rank,
                                         precision="bf16", fp8=fp8, attention_backend=attention_backend,
                                         overhead_gb=a.overhead_gb)
    n = params_per_rank(shape, e.layout.tp, e.layout.pp, e.memory_rank)
    return [
        f"memory of pipeline rank {e.memory_rank} ({n:,} parameters): weights {_gb(m['weights'])} GB, gradients "
        f"{_gb(m['gradients'])} GB, optimizer {_gb(m['optimizer'])} GB (sharded over DP{e.layout.dp}), FP8 "
        f"{_gb(m['fp8'])} GB, activations {_gb(m['activations'])} GB, transient {_gb(m['transient'])} GB, "
        f"overhead {_gb(m['overhead'])} GB = {_gb(m['total'])} GB",
        "activations of that rank by recomputation: " + ", ".join(f"{k} {_gb(v)} GB" for k, v in acts.items()),
    ]


def _layout_from_dict(d: dict, gpus: int) -> Layout:
    tp, pp = int(d.get("tp", 1)), int(d.get("pp", 1))
    dp = int(d.get("dp", gpus // (tp * pp)))
    if tp * pp * dp != gpus:
        raise ValueError(f"layout {d}: tp x pp x dp = {tp * pp * dp}, but gpus = {gpus}")
    return Layout(tp=tp, pp=pp, dp=dp, vpp=d.get("vpp"), micro_batch=int(d.get("micro_batch", 1)),
                  recompute=d.get("recompute", "none"),
                  sequence_parallel=bool(d.get("sequence_parallel", tp > 1)),
                  distributed_optimizer=bool(d.get("distributed_optimizer", True)))


def compare_measurements(path: str, a: Assumptions) -> list[str]:
    """Prediction beside measurement for every GPU run in a JSON file: a list of objects with
    config (a preset or YAML), overrides (list of section.key=value), gpu, gpus, layout {tp, pp, vpp, dp,
    micro_batch, recompute, sequence_parallel}, fp8 (bool), and the measured peak_memory_gb (torch's
    max_memory_reserved / 1e9 on the fullest GPU), step_time_s, mfu; a measurement may be left out."""
    try:
        runs = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--measured {path}: {exc}") from None
    if not isinstance(runs, list):
        raise ValueError(f"--measured {path}: expected a JSON list of runs")
    head = (f"{'run':<28} {'gpu':<9} {'layout':<30} {'memory GB pred/meas':>20} {'step s pred/meas':>17} "
            f"{'MFU pred/meas':>14}")
    rows = [head, "-" * len(head)]
    for i, run in enumerate(runs):
        where = f"--measured {path}: run {i}"
        try:
            cfg = load_plan_config(run.get("config"), list(run.get("overrides", [])))
            gpu = GPUS[run["gpu"]]
            gpus = int(run["gpus"])
            layout = _layout_from_dict(run.get("layout", {}), gpus)
        except KeyError as exc:
            raise ValueError(f"{where}: missing or unknown {exc}") from None
        except Exception as exc:
            raise ValueError(f"{where}: {exc}") from None
        shape = shape_from_config(cfg)
        e = estimate(shape, layout, cfg.data.seq_length, cfg.train.global_batch, gpu, a, bool(run.get("fp8")),
                     cfg.train.attention_backend)

        def pair(pred, meas, fmt):
            if meas is None:
                return f"{fmt.format(pred)} / -"
            return f"{fmt.format(pred)} / {fmt.format(meas)} ({pred / meas - 1:+.0%})"

        rows.append(f"{str(run.get('name', i)):<28} {gpu.name + 'x' + str(gpus):<9} {layout.name():<30} "
                    f"{pair(e.memory['total'] / GB, run.get('peak_memory_gb'), '{:.1f}'):>20} "
                    f"{pair(e.time['total'], run.get('step_time_s'), '{:.2f}'):>17} "
                    f"{pair(e.time['mfu'] * 100, None if run.get('mfu') is None else run['mfu'] * 100, '{:.1f}'):>14}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="polar plan",
        description="Estimate per-GPU memory and step time of every TP/PP/VPP/DP/micro-batch layout for a "
                    "model, batch and cluster; rank them and recommend one.",
        epilog="Overrides: section.key=value over the config, e.g. model.num_layers=48 data.seq_length=8192 "
               "train.global_batch=1024. See polar/plan.py for the cost model.")
    ap.add_argument("--config", default="polar_7b", help="a preset (tiny_cpu, polar_1_8b, polar_7b) or YAML file")
    ap.add_argument("--gpu", default="H100", choices=sorted(GPUS), help="GPU type (default H100)")
    ap.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    ap.add_argument("--fp8", action="store_true", help="FP8 matmuls (train.fp8): weight copies, faster GEMMs")
    ap.add_argument("--mfu", type=float, default=Assumptions.compute_efficiency,
                    help="fraction of the dense bf16 peak the kernels reach while computing (default %(default)s)")
    ap.add_argument("--overlap", action="store_true",
                    help="assume data-parallel communication overlaps compute")
    ap.add_argument("--group-length", type=int, default=None,
                    help="tokens per group (prefix + candidates) in a pack; default: the whole pack")
    ap.add_argument("--top", type=int, default=12, help="rows of the table (default 12)")
    ap.add_argument("--measured", default=None,
                    help="JSON list of GPU runs: print the prediction beside each measurement")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from engine.config import ConfigError

    a = Assumptions(compute_efficiency=args.mfu, overlap_dp=args.overlap, group_length=args.group_length)
    gpu = GPUS[args.gpu]
    try:
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu {args.mfu}: must lie in (0, 1]")
        if args.gpus < 1:
            raise ConfigError(f"--gpus {args.gpus}: must be >= 1")
        if args.fp8 and gpu.fp8_tflops is None:
            raise ConfigError(f"--fp8: the {gpu.name} has no FP8 tensor cores")
        cfg = load_plan_config(args.config, args.overrides)
        if args.measured:
            for line in compare_measurements(args.measured, a):
                print(line)
            return 0
    except (ConfigError, ValueError) as exc:
        print(f"polar plan: {exc}", file=sys.stderr)
        return 2
    shape = shape_from_config(cfg)
    seq, gb = cfg.data.seq_length, cfg.train.global_batch
    layouts = candidate_layouts(shape, args.gpus, gb, seq, gpu.gpus_per_node)
    if not layouts:
        near = nearest_batches(shape, args.gpus, gb, seq, gpu.gpus_per_node)
        print(f"polar plan: no layout of {args.gpus} GPUs divides the model and train.global_batch={gb} "
              f"(heads {shape.num_attention_heads}, KV groups {shape.num_query_groups}, layers {shape.num_layers}; "
              "the data-parallel size must divide the global batch)"
              + (f"; nearest global batches with layouts: {' and '.join(map(str, near))}" if near else ""),
              file=sys.stderr)
        return 2
    ranked = rank_layouts(prune_dominated([estimate(shape, lay, seq, gb, gpu, a, args.fp8,
                                                    cfg.train.attention_backend) for lay in layouts]))
    print(f"polar plan: {args.config} ({total_params(shape) / 1e9:.2f} B parameters: {shape.num_layers} layers, "
          f"hidden {shape.hidden_size}, {shape.num_attention_heads} heads, {shape.num_query_groups} KV groups, FFN "
          f"{shape.ffn_hidden_size}, vocab {shape.vocab_size}) on {args.gpus} x {gpu.name}, "
          f"{gb} packed sequences x {seq} tokens per step, {'FP8' if args.fp8 else 'bf16'}")
    print(f"GPU: {gpu.source}")
    for line in a.lines():
        print(f"assumed: {line}")
    print()
    best = recommend(ranked)
    shown = ranked[:args.top]
    if best is not None and best not in shown:
        shown.append(best)
    for line in format_table(shown, len(shown), best):
        print(line)
    fitting = [e for e in ranked if e.fits]
    print(f"\n{len(layouts)} layouts, {len(ranked)} after dropping recomputation / micro-batch choices that are "
          f"slower and no smaller; {len(fitting)} of them fit in {a.usable_fraction:.0%} of {gpu.memory_gb:g} GB")
    if not fitting:
        least = min(ranked, key=lambda e: e.memory["total"])
        print(f"none fits: the smallest, {least.layout.name()}, needs {_gb(least.memory['total'])} GB; "
              "more GPUs, FP8 off, a shorter data.seq_length or a smaller model")
        return 1
    print()
    for line in explain(best, ranked, gpu, a):
        print(line)
    for line in memory_lines(shape, best, seq, gb, args.fp8, cfg.train.attention_backend, a):
        print(line)
    lay = best.layout
    print(f"launch with: parallel.tp={lay.tp} parallel.pp={lay.pp} parallel.vpp={lay.vpp or 'null'} "
          f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()} train.micro_batch={lay.micro_batch}"
          + (" train.fp8=<recipe>" if args.fp8 else "")
          + ("" if lay.recompute == "none" else f"  (and {lay.recompute} activation recomputation)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
