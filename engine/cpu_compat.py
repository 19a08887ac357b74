"""Lets megatron-core train on CPU over gloo. Applied once, and only when CUDA is absent.

megatron-core assumes a GPU in a handful of places that are incidental to the maths: scratch
tensors created with a literal `device="cuda"`, CUDA streams around gradient communication, CUDA
RNG states and `tensor.type() == 'torch.cuda.FloatTensor'` checks. Rather than touching torch
globally, each affected megatron module gets its own view of `torch` (a `_CpuTorch` proxy) in
which CUDA devices map to the CPU and CUDA streams are no-ops; everything else passes through.
Every patch names the megatron call that needs it. Nothing here changes results: the parity tests
compare these CPU runs against a single process.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_APPLIED = False


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


def _with_cpu_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _noop(*args, **kwargs):
    return None


class _CpuCuda(types.SimpleNamespace):
    """The subset of torch.cuda that megatron touches, answered for a CPU process."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_cpu_cuda = _CpuCuda(
    # DDP buffers and p2p shape tensors: device=torch.cuda.current_device()
    current_device=lambda: "cpu",
    # p2p_communication / DDP free/alloc helpers call torch.cuda.synchronize()
    synchronize=_noop,
    empty_cache=_noop,
    # DDP overlaps grad reduce-scatter on a communication stream
    Stream=_NullStream,
    Event=_NullStream,
    current_stream=lambda *a, **k: _NullStream(),
    stream=lambda *a, **k: contextlib.nullcontext(),
    is_available=lambda: False,
    device_count=lambda: 0,
    memory_allocated=lambda *a, **k: 0,
    max_memory_allocated=lambda *a, **k: 0,
    nvtx=types.SimpleNamespace(range_push=_noop, range_pop=_noop, range=lambda *a, **k: contextlib.nullcontext()),
)


class _CpuTorch(types.ModuleType):
    """`torch` as seen by one megatron module: CUDA tensors become CPU tensors."""

    def __init__(self):
        super().__init__("torch")
        for name in ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like", "randn", "rand"):
            setattr(self, name, _with_cpu_device(getattr(torch, name)))
        self.cuda = _cpu_cuda

    def __getattr__(self, name):
        return getattr(torch, name)


# Modules whose module-level `torch` is replaced, with the calls that need it.
_PROXIED_MODULES = (
    # forward_backward_* : total_num_tokens = torch.zeros([], device="cuda")
    "megatron.core.pipeline_parallel.schedules",
    # _communicate_shapes / _communicate: device=torch.cuda.current_device(), torch.cuda.synchronize()
    "megatron.core.pipeline_parallel.p2p_communication",
    # DistributedDataParallel: communication_stream = torch.cuda.Stream(...)
    "megatron.core.distributed.distributed_data_parallel",
    # _ParamAndGradBuffer / bucket groups: CUDA streams, device=torch.cuda.current_device()
    "megatron.core.distributed.param_and_grad_buffer",
    # finalize_model_grads: num_tokens all-reduce buffers
    "megatron.core.distributed.finalize_model_grads",
    # MegatronOptimizer: found_inf / _scale_one / flag tensors on device='cuda'
    "megatron.core.optimizer.optimizer",
    # DistributedOptimizer: shard buffers on torch.cuda.current_device()
    "megatron.core.optimizer.distrib_optimizer",
    # get_grad_norm_fp32 / clip_grad_by_total_norm_fp32: device='cuda' scratch tensors
    "megatron.core.optimizer.clip_grads",
    # tensor-parallel mappings allocate gather buffers with torch.cuda.current_device()
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    # rerun_state_machine validates results with device='cuda' tensors
    "megatron.core.rerun_state_machine",
    # megatron.core.utils: global memory buffer, is_float8tensor helpers
    "megatron.core.utils",
    # dist_checkpointing.save: preload_tensors / verify results call torch.cuda.synchronize()
    # and build flag tensors on device='cuda'
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
)


@contextlib.contextmanager
def _cuda_type_names():
    """Inside one megatron call, CPU tensors answer to CUDA type names and `.cuda()` is a no-op.

    DistributedOptimizer._build_model_and_main_param_groups, Float16OptimizerWithFloat16Params and
    clip_grads.get_grad_norm_fp32 dispatch on `param.type() == 'torch.cuda.FloatTensor'` and raise
    for anything else; DistributedOptimizer.get_parameter_state_dp_zero (checkpointing) moves its
    gather buffers with `.cuda()`. Scoped to those calls so nothing else sees the change.
    """
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def cuda_named_type(self, dtype=None, *args, **kwargs):
        if dtype is None and not args and not kwargs and self.device.type == "cpu":
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, *args, **kwargs)

    torch.Tensor.type = cuda_named_type
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda


def _scoped(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


class CpuRNGTracker:
    """Replaces megatron's CudaRNGStatesTracker on CPU (model_parallel_cuda_manual_seed needs CUDA).

    Keeps named CPU generator states so that `fork()` regions (dropout inside tensor-parallel
    regions) draw from their own stream, exactly as the CUDA tracker does with CUDA generators.
    """

    def __init__(self):
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return bool(self.states_)

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists in the CPU RNG tracker")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator().manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


_CPU_TRACKER = CpuRNGTracker()


def cpu_model_parallel_seed(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU twin of megatron's model_parallel_cuda_manual_seed (same seed offsets)."""
    _CPU_TRACKER.reset()
    torch.manual_seed(seed)
    _CPU_TRACKER.add("model-parallel-rng", seed + 2718 + tp_rank)
    _CPU_TRACKER.add("data-parallel-rng", seed)
    _CPU_TRACKER.add("expert-parallel-rng", seed + 1024 + 100 * ep_rank + etp_rank)


def apply() -> None:
    """Install the CPU patches. Idempotent; a no-op when CUDA is available."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    proxy = _CpuTorch()
    for name in _PROXIED_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy

    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    clip_grads.get_grad_norm_fp32 = _scoped(clip_grads.get_grad_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = _scoped(clip_grads.clip_grad_by_total_norm_fp32)
    # MegatronOptimizer.clip_grad_norm / get_grad_norm import these names into optimizer.py
    optimizer.get_grad_norm_fp32 = clip_grads.get_grad_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    dopt = distrib_optimizer.DistributedOptimizer
    dopt._build_model_and_main_param_groups = classmethod(
        _scoped(dopt._build_model_and_main_param_groups.__func__)
    )
    dopt.get_parameter_state_dp_zero = _scoped(dopt.get_parameter_state_dp_zero)
    f16 = optimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = _scoped(f16.__init__)

    # tensor_parallel.random: every get_cuda_rng_tracker() caller gets the CPU tracker
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.get_cuda_rng_tracker = lambda *a, **k: _CPU_TRACKER
    for modname in ("megatron.core.tensor_parallel", "megatron.core.tensor_parallel.layers"):
        mod = importlib.import_module(modname)
        if hasattr(mod, "get_cuda_rng_tracker"):
            mod.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker
    # activation recomputation (CheckpointFunction) saves and restores the CUDA RNG state around
    # the recomputed forward; on CPU there is none (the CPU state and the tracker's are restored)
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    tp_random._set_cuda_rng_state = _noop
    _APPLIED = True
