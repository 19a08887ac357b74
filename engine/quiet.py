"""Known-benign warnings of megatron-core and torch, silenced so that the progress lines are what a
user sees. Each entry names where it comes from and why it is harmless here; anything else still
prints. POLAR_SHOW_ALL_WARNINGS=1 turns the silencing off."""
from __future__ import annotations

import logging
import os
import warnings

# (logger, message prefix, why it is benign for this engine)
_LOG_RECORDS = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED",
     "megatron-core 0.19 freezes GPTModel in favour of HybridModel; it still receives bug fixes "
     "and is the backbone here (README, 'Notes')"),
    ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel: full_param_layout not provided",
     "DDP computes the distributed-optimizer layout itself, as it always did"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated",
     "every save goes through megatron's own async machinery (engine.checkpoint: the synchronous one runs the "
     "request at once, checkpoint.async_save forks its writer); the NVRx one it points to needs "
     "nvidia-resiliency-ext, which this engine does not install"),
)
# (category, message regex, why)
_WARNINGS = (
    (UserWarning, r"(Transformer Engine and Apex are|Apex is) not installed",
     "the local (torch) implementations are the ones this engine uses without TE/Apex"),
    (UserWarning, r"full scope is deprecated", "megatron's own default for CUDA graphs, which are off"),
    (UserWarning, r"MimoModelConfig is experimental", "an unused megatron module, imported by megatron itself"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     "megatron's optimizer probes `.grad` on its parameter shards (views) while collecting gradients"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     "megatron's distributed optimizer calls these torch collectives; they still work"),
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load",
     "megatron reads a checkpoint's common state and metadata on each rank by itself (no process group), by design"),
    (UserWarning, r"The argument order of load has been changed",
     "megatron calls torch.distributed.checkpoint's load with keyword arguments; nothing is misread"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "torch's checkpoint planner on megatron's checkpoint format, which is what dist_checkpointing writes"),
)

# (category, message regex, why): benign only on a CPU, so silenced by the runtime once it runs there
_CPU_WARNINGS = (
    (UserWarning, r"When using (async grad allreduce|sequence parallelism) it is recommended to set the "
                  r"environment variable CUDA_DEVICE_MAX_CONNECTIONS",
     "megatron's tensor-parallel linear layers ask for it to order CUDA streams; a CPU run has none, and "
     "every TP > 1 run on CPU printed it once per rank"),
)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def silence_known_warnings() -> None:
    if os.environ.get("POLAR_SHOW_ALL_WARNINGS") == "1":
        return
    by_logger: dict[str, list[str]] = {}
    for name, prefix, _ in _LOG_RECORDS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
    for category, message, _ in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def silence_cpu_warnings() -> None:
    """_CPU_WARNINGS, for a process that runs on the CPU (engine.runtime calls it there)."""
    if os.environ.get("POLAR_SHOW_ALL_WARNINGS") == "1":
        return
    for category, message, _ in _CPU_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
