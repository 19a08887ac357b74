"""The cost model behind `polar plan` (polar/plan.py): per-rank parameters, memory and step time.

The model behind the estimates (every constant is printed with the plan):

Parameters per rank are counted exactly as the engine builds them (megatron's parallel linears, no
biases but the q/k/v ones of model.add_qkv_bias, SwiGLU, grouped-query attention; the embedding on the
first pipeline stage, the final norm and value head (and the auxiliary LM head, if on) on the last;
embedding and LM head with the vocabulary padded as the engine pads it, Shape.padded_vocab);
tests/polar/test_plan.py checks the counts against the engine's model at TP1, TP2, PP2, PP2 x VPP2 and
TP2 x PP2 (with the LM head, with q/k/v biases).

Memory per GPU, for the pipeline rank that needs most:
- weights: 2 bytes per parameter in bf16 (4 in fp32);
- gradients: 4 bytes per parameter (the engine reduces gradients in an fp32 buffer);
- optimizer: Adam's two moments, plus fp32 master weights when the weights are bf16 (12 or 8 bytes per
  parameter), divided over the data-parallel ranks with the distributed optimizer;
- FP8 (when asked): the e4m3 copies of every linear weight held over a step (fp8_copy_bytes: 1 byte per
  linear parameter for the local layers' per-tensor recipe, 2 for their per-row one and for Transformer
  Engine's);
- activations kept for the backward pass, per layer and micro-batch of b sequences of s tokens (bf16;
  TP = t, sequence parallelism divides the norm inputs and outputs by t):
  norms 3 x 2 tensors of [s, b, h] (input, normalised input, output) + the QKV output, K and Q after
  RoPE and the attention output [s, b, (h + 2 kv) + (kv + 2 h)] / t + the fc1 output and the SwiGLU
  product [s, b, 3 ffn] / t (megatron's fused SwiGLU recomputes silu in the backward;
  layer_activation_bytes lists them). The local layers' per-tensor FP8 recipe (fp8_keeps_inputs) keeps
  each linear's input as its e4m3 copy, 1 byte an element, in place of the bf16 one: the norm outputs
  (linear_qkv's and linear_fc1's inputs, / t under SP: each rank keeps its token shard) and the SwiGLU
  product (linear_fc2's) are then kept by nothing else, while the attention output, linear_proj's input,
  stays kept by the attention beside its copy ([s, b, h] / t more) unless selective recomputation runs the
  attention again in the backward (then the copy alone is kept); the per-row recipe keeps the bf16
  inputs as megatron's linears do, and is priced as bf16. With the
  torch attention backend the dense [b, s, s] bool mask is kept once and SDPA's additive copy of it per
  layer (b s^2 in the compute dtype: 0.5 GB per layer at 16k in bf16). Full recomputation keeps only each layer's
  input [s, b, h] (/t under SP) and one layer's activations while it is recomputed; selective
  recomputation (megatron's core-attention recompute, RoPE inside it) keeps the QKV output (the checkpoint's
  q, k, v are views of it) and the attention output (linear_proj's input) and drops, but for the layer being
  recomputed, Q and K after RoPE, the log-sum-exp and the torch backend's SDPA mask copy: the triton kernel
  keeps the same Q, K and log-sum-exp as SDPA does. A pipeline rank holds the activations of the micro-batches in
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

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from engine.gpu_peaks import DATASHEET

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
    # CUDA compute capability: the engine's FP8 rules (engine.fp8.MIN_CAPABILITY) are asked with it
    capability: tuple[int, int]


def _card(name: str, memory_gb: float, nvlink_gbs: float, network_gbs: float, hbm_tbs: float,
          capability: tuple[int, int], part: str, links: str) -> GPU:
    """A card of 8-GPU HGX/DGX boards. Its dense bf16 and fp8 peaks are engine/gpu_peaks.py's datasheet
    figures, the denominator of the MFU a GPU run and the benchmarks report beside the plan's."""
    bf16, fp8, sheet = DATASHEET[name]
    return GPU(name, memory_gb, bf16, fp8, nvlink_gbs, network_gbs, hbm_tbs, 8,
               f"{part}: {bf16:g} TFLOP/s dense bf16, {f'{fp8:g} fp8' if fp8 else 'no fp8'}, {links} "
               f"(peaks: {sheet}, halved for dense)", capability)


# Spec-sheet values of the SXM parts in their 8-GPU HGX/DGX boards.
GPUS = {
    "H100": _card("H100", 79.6, 450.0, 50.0, 3.35, (9, 0), "H100 SXM5 80 GB (81559 MiB reported)",
                  "NVLink 4 900 GB/s bidirectional, ConnectX-7 400 Gb/s per GPU, HBM3 3.35 TB/s"),
    "H200": _card("H200", 141.0, 450.0, 50.0, 4.8, (9, 0), "H200 SXM 141 GB",
                  "NVLink 4 900 GB/s bidirectional, 400 Gb/s per GPU, HBM3e 4.8 TB/s"),
    "A100": _card("A100", 79.2, 300.0, 25.0, 2.04, (8, 0), "A100 SXM4 80 GB",
                  "NVLink 3 600 GB/s bidirectional, HDR 200 Gb/s per GPU, HBM2e 2.04 TB/s"),
    "B200": _card("B200", 180.0, 900.0, 50.0, 8.0, (10, 0), "B200 (DGX B200, 180 GB per GPU)",
                  "NVLink 5 1.8 TB/s bidirectional, 400 Gb/s per GPU, HBM3e 8 TB/s"),
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
    vocab_multiple: int = 1  # model.make_vocab_size_divisible_by
    qkv_bias: bool = False  # model.add_qkv_bias: the q/k/v projections' biases (Qwen2)

    def padded_vocab(self, tp: int) -> int:
        """Rows of the embedding table (and LM head) at tensor parallelism tp: the vocabulary rounded up to
        a multiple of lcm(vocab_multiple, tp), as engine.parallelize.padded_vocab_size builds it (not
        imported: that module loads torch and megatron, which a plan does not need)."""
        multiple = math.lcm(max(self.vocab_multiple, 1), tp)
        return -(-self.vocab_size // multiple) * multiple

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

def _qkv_bias(shape: Shape, tp: int) -> int:
    """The column-parallel q/k/v biases of one layer on one TP rank (model.add_qkv_bias), split as the QKV
    output is."""
    return (shape.num_attention_heads * shape.head_dim + 2 * shape.kv_size) // tp if shape.qkv_bias else 0


def layer_params(shape: Shape, tp: int) -> int:
    """One transformer layer on one TP rank: two RMSNorm weights (replicated), column-parallel QKV (with
    its biases under model.add_qkv_bias) and SwiGLU fc1, row-parallel output projection and fc2, no other
    biases."""
    return 2 * shape.hidden_size + linear_params(shape, tp) + _qkv_bias(shape, tp)


def linear_params(shape: Shape, tp: int) -> int:
    """The weights of one layer's linear layers on one TP rank, the matrices FP8 matmuls quantise (not the
    norms, not the biases)."""
    h, d = shape.hidden_size, shape.head_dim
    q = shape.num_attention_heads * d
    qkv = h * (q + 2 * shape.kv_size) // tp
    proj = q // tp * h
    fc1 = h * 2 * shape.ffn_hidden_size // tp
    fc2 = shape.ffn_hidden_size // tp * h
    return qkv + proj + fc1 + fc2


def params_per_rank(shape: Shape, tp: int, pp: int, pp_rank: int) -> int:
    """Parameters one process holds at pipeline position pp_rank (any TP rank: shards are equal)."""
    n = shape.num_layers // pp * layer_params(shape, tp)
    if pp_rank == 0:
        n += shape.padded_vocab(tp) // tp * shape.hidden_size  # vocabulary-parallel embedding
    if pp_rank == pp - 1:
        n += 2 * shape.hidden_size  # final RMSNorm + value head Linear(h, 1)
        if shape.lm_head:
            n += shape.hidden_size * shape.padded_vocab(tp) // tp
    return n


def total_params(shape: Shape) -> int:
    return params_per_rank(shape, 1, 1, 0)


def checkpoint_bytes(shape: Shape, layout: Layout, gpus_per_node: int, weight_bytes: int = 2) -> dict:
    """What one checkpoint step holds, and what saving and resuming it costs in each of megatron's
    distributed-optimizer formats (engine: checkpoint.optimizer_format).

    A step holds the weights (`weight_bytes` each) and the optimizer state: fp32 main parameters and
    Adam's two moments, 12 bytes a parameter. fully_reshardable turns every TP/PP shard's state into
    per-parameter tensors by gathering it in host memory on every data-parallel replica at each save,
    and each rank reads its shard's whole state at a resume; dp_reshardable writes and reads each
    rank's own share (no gather, one read of the checkpoint in all)."""
    shards = [params_per_rank(shape, layout.tp, layout.pp, r) for r in range(layout.pp)]
    # the RMSNorm weights and the value head are replicated over the TP ranks, saved once
    replicated = 2 * shape.hidden_size * shape.num_layers + 2 * shape.hidden_size
    total = sum(shards) * layout.tp - (layout.tp - 1) * replicated
    optimizer = 12 * total
    world = layout.tp * layout.pp * layout.dp
    return {
        "parameters": total,
        "weights": weight_bytes * total,
        "optimizer": optimizer,
        "step": weight_bytes * total + optimizer,
        # fully_reshardable: the gathered shard, plus the rank's own copy of its share
        "save_host_per_gpu": 12 * max(shards) * (1 + 1 / layout.dp),
        "save_host_per_node": 12 * max(shards) * (1 + 1 / layout.dp) * min(gpus_per_node, world),
        "resume_read_fully_reshardable": optimizer * layout.dp,
        "resume_read_dp_reshardable": optimizer,
    }


# ---- memory ----------------------------------------------------------------------------------------------

def layer_activation_bytes(shape: Shape, tokens: int, tp: int, sp: bool, act_bytes: int = 2,
                           seq_length: int = 0, attention_backend: str = "triton", fp8_inputs: bool = False) -> float:
    """Bytes one layer keeps for its backward pass for `tokens` = s x b tokens of one micro-batch.

    The tensors autograd saves in megatron's local layer with the engine's attention (counted on CPU with
    saved-tensor hooks): per RMSNorm its input, normalised input and output; the QKV output (V is a view
    of it, so all of it stays), K and Q after RoPE, the attention output and its log-sum-exp (fp32); the
    fc1 output (2 ffn) and the SwiGLU product, fc2's input (megatron's fused SwiGLU Function keeps only
    its input and recomputes silu in the backward: engine.parallelize turns bias_activation_fusion on).
    The torch backend also keeps the additive mask SDPA makes of the bool mask. `fp8_inputs`
    (fp8_keeps_inputs): the linears keep e4m3 copies of their inputs (the module docstring says which
    bf16 tensors that frees; the difference from bf16 is measured on CPU at TP2 with and without SP,
    tests/polar/test_plan.py), and a 4-byte scale each."""
    h, f, kv = shape.hidden_size, shape.ffn_hidden_size, shape.kv_size
    c = 1.0 / tp if sp else 1.0
    norms = 2 * 3 * h * c
    attention = (h + 2 * kv) / tp + (kv + 2 * h) / tp
    mlp = 3 * f / tp
    out = act_bytes * tokens * (norms + attention + mlp) + 4 * tokens * shape.num_attention_heads / tp
    if attention_backend == "torch":
        out += act_bytes * tokens * seq_length  # [b, 1, s, s]: broadcast over the heads
    if fp8_inputs:
        out -= (act_bytes - 1) * tokens * (2 * h * c + f / tp)  # norm outputs and the SwiGLU product in e4m3
        out += tokens * h / tp + 4 * 4  # linear_proj's copy of the attention output, four scales
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


def fp8_copy_bytes(recipe: str, transformer_impl: str = "local") -> float:
    """Bytes per linear weight element that the FP8 copies of the weights hold over a step (0 with FP8 off).
    The local layers' weight cache (engine/model/fp8_linear.py) keeps one e4m3 copy per scaling used: the
    forward's per-tensor copy, which the backward reuses (1 byte), or the forward's and dgrad's per-row
    copies (2 bytes); Transformer Engine keeps an FP8 copy and its transpose (2 bytes). The plan priced 2
    bytes for every recipe, a GB too many per billion local tensorwise parameters."""
    if recipe == "off":
        return 0.0
    return 1.0 if transformer_impl == "local" and recipe == "tensorwise" else 2.0


def fp8_keeps_inputs(recipe: str, transformer_impl: str = "local") -> bool:
    """Whether the FP8 linears keep e4m3 copies of their inputs for the backward in place of the training
    dtype's: the local layers' per-tensor recipe (engine/model/fp8_linear.py). Their per-row recipe keeps
    the bf16 inputs (wgrad scales them along the tokens, not as the forward did), as megatron's linears
    do; Transformer Engine's recipes are priced as bf16 too (not measured here)."""
    return recipe == "tensorwise" and transformer_impl == "local"


def memory_per_rank(shape: Shape, layout: Layout, seq_length: int, global_batch: int, pp_rank: int,
                    precision: str = "bf16", fp8: bool = False, attention_backend: str = "triton",
                    overhead_gb: float = 0.0, device: str = "gpu", fp8_bytes: float = 2.0,
                    fp8_inputs: bool = False) -> dict:
    """Bytes by component for one process at pipeline position pp_rank (see the module docstring); with
    `fp8`, `fp8_bytes` per linear parameter of FP8 weight copies (fp8_copy_bytes), and with `fp8_inputs`
    the linears' inputs kept in e4m3 (fp8_keeps_inputs).

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
                                       attention_backend, fp8 and fp8_inputs)
    in_flight = layers_in_flight(shape, layout, pp_rank, m)
    c = 1.0 / layout.tp if layout.sequence_parallel else 1.0
    if layout.recompute == "full":
        activations = in_flight * w_bytes * tokens * shape.hidden_size * c + per_layer
    elif layout.recompute == "selective":
        # core-attention state, made again in the backward one layer at a time (engine/recompute.py: the
        # checkpoint keeps q, k and v as the QKV output's views, RoPE runs inside it): Q and K after RoPE, the
        # log-sum-exp, SDPA's additive mask, and with fp8_inputs the attention output (the checkpoint keeps no
        # output, linear_proj its e4m3 copy); measured per layer, tests/polar/test_plan_fp8_recompute.py
        # (the checkpoint's own keep: megatron's attn_mask_type as a 1-element int32 tensor, 4 bytes)
        redone = (w_bytes * tokens * (shape.hidden_size + shape.kv_size) / layout.tp
                  + 4 * tokens * shape.num_attention_heads / layout.tp - 4)
        if attention_backend == "torch":
            redone += w_bytes * tokens * seq_length
        if fp8 and fp8_inputs:
            redone += w_bytes * tokens * shape.hidden_size / layout.tp
        activations = in_flight * (per_layer - redone) + redone
    else:
        activations = in_flight * per_layer
    if attention_backend == "torch":
        activations += layout.micro_batch * seq_length * seq_length  # the dense bool mask, one layout cached
    # while a layer runs backward, autograd holds gradients of its activations: the fc1 output's and another
    backward_working = 2 * w_bytes * tokens * 2 * shape.ffn_hidden_size / layout.tp
    if pp_rank == layout.pp - 1 and shape.lm_head:
        # logits [s, b, V/t] in the compute dtype, their fp32 copy and the softmax kept by the cross-entropy
        activations += tokens * shape.padded_vocab(layout.tp) / layout.tp * (w_bytes + 8)
    largest = max(shape.hidden_size * (shape.num_attention_heads * shape.head_dim + 2 * shape.kv_size),
                  2 * shape.ffn_hidden_size * shape.hidden_size) // layout.tp
    if pp_rank == 0 or (pp_rank == layout.pp - 1 and shape.lm_head):
        largest = max(largest, shape.padded_vocab(layout.tp) // layout.tp * shape.hidden_size)
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
        "fp8": fp8_bytes * linear_params(shape, layout.tp) * (shape.num_layers // layout.pp) if fp8 else 0,
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


def inside_nodes(span: int, world: int, gpus_per_node: int) -> bool:
    """Whether every group of `span` consecutive ranks lies inside one node. Megatron numbers ranks
    tensor-parallel fastest, then data-parallel, then pipeline: a TP group is `tp` consecutive ranks
    and a DP group spans `tp * dp` of them. Groups tile the ranks from 0, so they stay inside nodes
    only when their span divides the node (DP3 of 24 ranks on 8-GPU nodes straddles two nodes in
    [6, 7, 8]), or when the whole job fits one node. The slowest group sets the collective's time."""
    return world <= gpus_per_node or gpus_per_node % span == 0


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
    tp_bw = gpu.nvlink_gbs if inside_nodes(layout.tp, world, node) else gpu.network_gbs
    act = 2.0 * seq_length * layout.micro_batch * shape.hidden_size  # one [s, b, h] bf16 tensor
    ar_per_layer = 4 + (2 if layout.recompute == "full" else 0)  # 2 forward, 2 backward (+2 recomputed)
    layers = shape.num_layers // layout.pp
    tp_comm = m * layers * ar_per_layer * _ring("all_reduce", layout.tp, act, tp_bw, eff)

    pp_comm = 0.0
    if layout.pp > 1:
        pp_bw = gpu.nvlink_gbs if world <= node else gpu.network_gbs
        msg = act / (layout.tp if layout.sequence_parallel else 1)
        pp_comm = 2 * (m * layout.chunks + layout.pp - 1) * msg / (pp_bw * eff * GB)

    n_max = max(params_per_rank(shape, layout.tp, layout.pp, r) for r in range(layout.pp))
    dp_bw = gpu.nvlink_gbs if inside_nodes(layout.tp * layout.dp, world, node) else gpu.network_gbs
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
