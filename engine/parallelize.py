"""Builds the reward model for this process's place in the TP x PP x DP grid, in one place.

Order: megatron TransformerConfig from the typed configs -> layer spec (TE or local) -> one
RewardModel chunk per virtual pipeline stage (tensor parallelism lives inside megatron's layers)
-> device and dtype -> megatron DDP (gradient buffers, distributed-optimizer sharding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.config import ATTENTION_BACKENDS, ModelConfig, ParallelConfig, TrainConfig
from engine.runtime import Runtime


def resolve_dtype(train: TrainConfig, rt: Runtime) -> torch.dtype:
    if train.precision == "auto":
        return torch.bfloat16 if rt.is_cuda else torch.float32
    if train.precision == "fp32":
        return torch.float32
    if train.precision == "bf16":
        return torch.bfloat16
    from engine.config import ConfigError

    raise ConfigError(f"train.precision={train.precision!r}: expected auto, fp32 or bf16")


def transformer_config(model: ModelConfig, par: ParallelConfig, train: TrainConfig, rt: Runtime,
                       initialize: bool = True):
    from megatron.core.transformer import TransformerConfig

    from engine.fp8 import te_fp8_settings
    from engine.recompute import recompute_settings

    dtype = resolve_dtype(train, rt)
    use_te = model.transformer_impl == "transformer_engine"
    return TransformerConfig(
        **te_fp8_settings(train, use_te),
        **recompute_settings(train),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        perform_initialization=initialize,  # False: weights are loaded next (conversion, scoring)
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        sequence_parallel=par.sequence_parallel,
        use_cpu_initialization=not rt.is_cuda,
        # megatron's SwiGLU autograd Function (bias None here) keeps only the fc1 output for the backward
        # and recomputes silu there; the unfused glu keeps silu(a) and a copy of b as well, two more [tokens, ffn]
        # tensors per layer (~7 GiB a rank at 7B, TP 4, 16k tokens). torch.compile'd on a GPU, eager
        # on the CPU (engine.megatron_jit); same values as unfused to fp32 rounding (tests/engine/model)
        bias_activation_fusion=True,
        # the other fusions need Apex/TE kernels; bias fusions are moot without biases
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        # batched isend/irecv over gloo silently corrupts interleaved-PP gradients (measured with
        # megatron-core 0.16-0.19: grad norm 1361 instead of 1.09, no error; the parity tests catch it)
        batch_p2p_comm=rt.is_cuda,
        # loss functions return (sum over pairs, number of pairs): megatron then divides by the
        # global pair count, making the loss the same for any DP size, micro-batching or packing
        calculate_per_token_loss=True,
    )


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Rows of the embedding table: model.vocab_size rounded up to a multiple of
    lcm(model.make_vocab_size_divisible_by, tp), since megatron splits the table evenly over TP.
    With a multiple of 128 the padded size is the same for TP 1, 2, 4, 8 (and so are checkpoint
    shapes); other TP sizes may pad further, which loading absorbs (padded rows load as zeros)."""
    multiple = math.lcm(max(model.make_vocab_size_divisible_by, 1), tp)
    return -(-model.vocab_size // multiple) * multiple


def _zero_padded_vocab_rows(chunk, vocab_size: int) -> None:
    """Padded rows hold no token: zero them so a checkpoint never carries random values there."""
    emb = getattr(getattr(chunk.backbone, "embedding", None), "word_embeddings", None)
    if emb is None:
        return
    start = emb.vocab_start_index
    with torch.no_grad():
        emb.weight[max(vocab_size - start, 0):].zero_()


TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def resolve_attention_backend(name: str, on_cuda: bool, head_dim: int | None = None) -> str:
    """`auto`: the Triton shared-prefix kernel on a CUDA GPU when it takes this head dim, else the
    per-group torch path (one SDPA call per group and layer, and a host read of the layout per
    micro-batch: fine on CPU, slow on a GPU). Any other name is returned as asked. A GPU before
    compute capability 8.0 (V100, T4) gets `blocks` too: the Triton kernel refuses it, and `auto`
    must not turn a card the engine runs on into a start-up error."""
    if name != "auto":
        return name
    if not on_cuda or (head_dim is not None and head_dim not in TRITON_HEAD_DIMS):
        return "blocks"
    import torch

    return "triton" if torch.cuda.get_device_capability()[0] >= 8 else "blocks"


def check_kernels(train: TrainConfig, on_cuda: bool, head_dim: int | None = None) -> str:
    """An explicit kernel request never silently falls back: a missing backend stops the run here.
    Returns the attention backend to build (`auto` resolved).

    Covers `train.kernels` (readout + loss) and `train.attention_backend`. Triton needs a CUDA GPU or
    TRITON_INTERPRET=1 (CPU testing); the CUDA kernels need a CUDA GPU and the built engine._C_cuda.
    The CUDA library is loaded here (cheap); Triton kernels are imported when the model is built.
    """
    import os

    from engine.config import ConfigError

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if train.kernels not in ("torch", "triton", "cuda"):
        raise ConfigError(f"train.kernels={train.kernels!r}: expected torch, triton or cuda")
    if train.kernels == "triton" and not on_cuda and not interpret:
        raise ConfigError("train.kernels=triton needs a CUDA GPU (or TRITON_INTERPRET=1 to interpret on CPU)")
    if train.kernels == "cuda":
        if not on_cuda:
            raise ConfigError("train.kernels=cuda needs a CUDA GPU; use train.kernels=torch on CPU")
        try:  # loads engine._C_cuda now, so a missing or mismatched build stops the run here
            import engine.kernels.cuda_ops  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"train.kernels=cuda: {exc}") from exc
    backend = resolve_attention_backend(train.attention_backend, on_cuda, head_dim)
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"train.attention_backend={train.attention_backend!r}: expected auto or one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    if backend == "triton":
        if not on_cuda and not interpret:
            raise ConfigError("train.attention_backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1 to interpret "
                              "on CPU)")
        if head_dim is not None and head_dim not in TRITON_HEAD_DIMS:
            raise ConfigError(f"train.attention_backend=triton supports head dims 16, 32, 64, 128 and 256; "
                              f"model.hidden_size / model.num_attention_heads = {head_dim}")
        from engine.model.shared_prefix_attention import get_backend

        try:  # imports the kernel module and asks it whether this device can run it
            get_backend("triton")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return backend


def build_chunks(model: ModelConfig, par: ParallelConfig, train: TrainConfig, rt: Runtime, initialize: bool = True):
    """(bare RewardModel chunks of this rank, one per virtual pipeline stage, TransformerConfig): the
    model as training, scoring and serving all build it. initialize=False skips the random
    initialisation of megatron's layers, for a caller that loads every weight next."""
    from engine.fp8 import check_backbone, check_fp8, device_capability
    from engine.model.reward_model import RewardModel
    from engine.model.rope import Yarn
    from engine.model.spec import layer_spec

    head_dim = model.hidden_size // model.num_attention_heads
    backend = check_kernels(train, rt.is_cuda, head_dim)
    use_te = check_backbone(model, rt.is_cuda)  # TE only when model.transformer_impl asks for it
    check_fp8(model, par, train, use_te, device_capability(rt.device))
    config = transformer_config(model, par, train, rt, initialize)
    spec = layer_spec(use_te, model.rotary_base, backend, model.rope_scaling,
                      model.rope_scaling_factor, model.max_position_embeddings, fp8=train.fp8,
                      rope_llama3=(model.rope_low_freq_factor, model.rope_high_freq_factor,
                                   model.rope_original_max_position_embeddings),
                      rope_yarn=Yarn(model.rope_beta_fast, model.rope_beta_slow,
                                     model.rope_original_max_position_embeddings, model.rope_attention_factor,
                                     model.rope_mscale, model.rope_mscale_all_dim, model.rope_truncate))
    chunks = []
    for vp_stage in range(par.vpp or 1):
        vp = vp_stage if par.vpp else None
        chunk = RewardModel(
            config,
            spec,
            vocab_size=padded_vocab_size(model, par.tp),
            real_vocab_size=model.vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=rt.is_first_stage(vp),
            post_process=rt.is_last_stage(vp),
            vp_stage=vp,
            lm_head=train.aux_lm_weight > 0,
            kernels=train.kernels,
            pg_collection=rt.groups,
        )
        _zero_padded_vocab_rows(chunk, model.vocab_size)
        chunk.to(rt.device)
        chunks.append(chunk)
    return chunks, config


def build_model(model: ModelConfig, par: ParallelConfig, train: TrainConfig, rt: Runtime, initialize: bool = True):
    """Returns (list of DDP-wrapped model chunks, TransformerConfig) for training."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    chunks, config = build_chunks(model, par, train, rt, initialize)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            pg_collection=rt.groups,
            # bucketing only pays off when reductions overlap backward; keeps chunks > 0 identical
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    return wrapped, config


def count_parameters(chunks, tp_rank: int | None = None) -> int:
    """Parameters held by this process (a TP/PP shard). With `tp_rank`, this process's part of the
    model's count instead: a parameter megatron does not split over TP (the layer norms, the value
    head: no tensor_model_parallel attribute) is whole on every TP rank, and is counted on TP rank 0
    only (megatron's own rule for TP duplicates), so that the parts summed over one replica's ranks
    are the model's count at any layout."""
    return sum(p.numel() for c in chunks for p in c.parameters()
               if tp_rank is None or tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
