"""CUDA kernels of the fused reward readout and contrastive losses (engine._C_cuda).

Same semantics, signatures and returns as the Triton modules `engine.kernels.reward_readout` and
`engine.kernels.contrastive_loss` (their docstrings hold the math; csrc/cuda/*.cu the kernels). The
ops are defined in C++ (csrc/cuda/ops.cpp, `polar::*_cuda`); this module loads the library and
gives them fake (meta) implementations for torch.compile and autograd formulas:

- `reward_readout(hidden, reward_index, norm_weight, head_weight, eps)` -> rewards [n] fp32
- `pairwise_loss(rewards, pair_pos, pair_neg)` -> (loss sum, correct pairs, number of pairs)
- `infonce_loss(rewards, pair_pos, pair_neg)` -> (loss sum, number of positives)

Importing it raises ImportError, saying how to build, when engine._C_cuda is missing or unloadable.
"""
from __future__ import annotations

import importlib.util

import torch

BUILD_HINT = (
    "engine._C_cuda (the CUDA kernels) is not built. Build it on a machine with nvcc and a CUDA build "
    "of torch, from the repository root: `POLAR_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace` "
    "(or `pip install --no-build-isolation -e .`); POLAR_CUDA_ARCHS picks the GPUs (default 90a)."
)


def library_path() -> str | None:
    """Path of the built engine._C_cuda shared library, or None (found without loading it)."""
    spec = importlib.util.find_spec("engine._C_cuda")
    return spec.origin if spec is not None else None


def _ops_defined() -> bool:
    try:
        torch.ops.polar.reward_readout_cuda_fwd  # noqa: B018 (lookup raises when undefined)
        return True
    except (AttributeError, RuntimeError):
        return False


def _load() -> None:
    path = library_path()
    if path is None:
        raise ImportError(BUILD_HINT)
    try:
        torch.ops.load_library(path)
    except OSError as exc:  # e.g. built against another torch, or a CPU torch without libc10_cuda
        raise ImportError(f"engine._C_cuda at {path} does not load with torch {torch.__version__} ({exc}). "
                          f"Rebuild it: {BUILD_HINT}") from exc


if not _ops_defined():  # the library registers the ops once per process
    _load()

_ops = torch.ops.polar


# ---- reward readout -----------------------------------------------------------------------------

@torch.library.register_fake("polar::reward_readout_cuda_fwd")
def _(hidden, reward_index, norm_weight, head_weight, eps):
    return hidden.new_empty(reward_index.shape[0], dtype=torch.float32)


@torch.library.register_fake("polar::reward_readout_cuda_bwd")
def _(grad_rewards, hidden, reward_index, norm_weight, head_weight, eps):
    return (hidden.new_empty(hidden.shape), torch.empty_like(norm_weight), torch.empty_like(head_weight))


def _readout_setup_context(ctx, inputs, output):
    hidden, reward_index, norm_weight, head_weight, eps = inputs
    ctx.save_for_backward(hidden, reward_index, norm_weight, head_weight)
    ctx.eps = eps


def _readout_backward(ctx, grad_rewards):
    hidden, reward_index, norm_weight, head_weight = ctx.saved_tensors
    grad_hidden, grad_norm, grad_head = _ops.reward_readout_cuda_bwd(
        grad_rewards, hidden, reward_index, norm_weight, head_weight, ctx.eps)
    return grad_hidden, None, grad_norm, grad_head, None


torch.library.register_autograd("polar::reward_readout_cuda_fwd", _readout_backward,
                                setup_context=_readout_setup_context)


def reward_readout(hidden, reward_index, norm_weight, head_weight, eps: float) -> torch.Tensor:
    """hidden [s, b, h], reward_index [n] (bi*s + t) -> rewards [n] in fp32 (differentiable)."""
    return _ops.reward_readout_cuda_fwd(hidden, reward_index, norm_weight, head_weight, float(eps))


# ---- contrastive losses -------------------------------------------------------------------------
# Each op returns (loss_sum, count, grad) with grad = dloss_sum/drewards from the same pass; only
# loss_sum is differentiable and its backward is grad_loss * grad.

def _loss_fake(rewards, pair_pos, pair_neg):
    return (rewards.new_empty((), dtype=torch.float32), rewards.new_empty((), dtype=torch.float32),
            rewards.new_empty(rewards.shape, dtype=torch.float32))


def _loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.rewards_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(output[1], output[2])


def _loss_backward(ctx, grad_loss, grad_count, grad_grad):
    (grad,) = ctx.saved_tensors
    return (grad_loss * grad).to(ctx.rewards_dtype), None, None


for _name in ("polar::pairwise_loss_cuda", "polar::infonce_loss_cuda"):
    torch.library.register_fake(_name)(_loss_fake)
    torch.library.register_autograd(_name, _loss_backward, setup_context=_loss_setup_context)


def pairwise_loss(rewards, pair_pos, pair_neg):
    """-> (sum of pair losses, correctly ordered pairs (ties 1/2), number of pairs), like `pairwise_sums`.

    As there, the loss sum and the pair count have the rewards' dtype and the correct count is fp32."""
    loss_sum, correct, _ = _ops.pairwise_loss_cuda(rewards, pair_pos, pair_neg)
    return loss_sum.to(rewards.dtype), correct, rewards.new_full((), float(pair_pos.numel()))


def infonce_loss(rewards, pair_pos, pair_neg):
    """-> (sum over positives of -log softmax(positive, its negatives), number of positives), like `infonce_sums`."""
    loss_sum, count, _ = _ops.infonce_loss_cuda(rewards, pair_pos, pair_neg)
    return loss_sum.to(rewards.dtype), count.to(rewards.dtype)
