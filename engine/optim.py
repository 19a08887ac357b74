"""AdamW (megatron's distributed optimizer where enabled) and the warm-up + cosine schedule.

The trainer steps the schedule before each optimizer step: step s (1-based) runs at the schedule's
value at s, so step 1 already trains (max_lr / warmup_steps, not 0) and the last step runs at min_lr.

Without Transformer Engine or Apex (this project's install) megatron-core falls back to torch's
AdamW with its per-op foreach update and to Python loops for the gradient norm and clipping; the
update runs on torch's fused kernel instead (engine.optimizer_state.use_fused_adam) and the norm and
clipping on foreach kernels: the same arithmetic in fewer, larger operations.
"""
from __future__ import annotations

import torch

from engine import optimizer_state
from engine.config import ParallelConfig, TrainConfig


def _device_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's local multi_tensor_l2norm (its fallback without Transformer Engine or Apex)
    without the host round trip: megatron's copies every per-tensor norm to the host
    (`torch.tensor(list of device scalars)`, a device sync per gradient tensor), takes the norm
    there and copies it back. The same norms of the same values in the same dtype, all in one
    foreach kernel (torch runs it tensor by tensor with torch.norm's reduction on the CPU), stacked on
    the device: bit for bit megatron's result on the CPU; on a GPU the per-tensor norms are reduced
    by the foreach kernel and their norm there (last-bit differences at most). The step's one sync
    stays the caller's `total_norm.item()`."""
    tensors = [t for ts in tensor_lists for t in ts]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    total = torch.norm(torch.stack(torch._foreach_norm(tensors)))
    return total.reshape(1).to(torch.float), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's local multi_tensor_scale (`dst.copy_(src * scale)` tensor by tensor, a temporary
    each) as one foreach multiply, in place where source and destination are the same tensors (the
    gradient clipping). The same product per element: bit for bit megatron's result."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_device_grad_norm() -> None:
    """Swaps megatron's local l2-norm and scale fallbacks (gradient norm and clipping) for
    `_device_l2_norm` and `_foreach_scale`; a no-op where megatron uses Transformer Engine's or
    Apex's fused kernels (neither syncs)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _device_l2_norm
    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _foreach_scale


def build_optimizer(train: TrainConfig, par: ParallelConfig, chunks, params_dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: AdamW
        lr=train.lr,
        min_lr=train.lr * train.min_lr_ratio,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.grad_clip,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=par.distributed_optimizer,
    )
    # megatron-core 0.19 refuses a process-group collection together with the gloo groups its
    # distributed optimizer uses for checkpointing ("Gloo process groups are not supported when
    # pg_collection is provided"), so the optimizer alone reads megatron's groups itself: they are
    # the same groups the runtime's collection was taken from.
    optimizer = get_megatron_optimizer(cfg, chunks)
    optimizer_state.use_fused_adam(optimizer)
    use_device_grad_norm()
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.lr * train.min_lr_ratio,
        lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=max(train.steps, train.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(train.steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def step_with_norm(optimizer, grad_norm: float) -> bool:
    """megatron's optimizer.step() after prepare_grads(), with the global gradient norm the caller
    already has (each computation is an all-reduce and a host sync): every chained optimizer clips
    by that norm, as ChainedOptimizer.step does, then all step. megatron's separately clipped
    grad-norm groups (multi-token-prediction layers) do not occur in this model."""
    from megatron.core.optimizer import clip_grads

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grads.clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False))
    return bool(optimizer.step_with_ready_grads())
