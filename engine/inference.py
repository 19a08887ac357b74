"""An engine checkpoint -> fp32 rewards of packed batches, for serving (polar/serve) and in-process
scoring (polar.reward): one model replica, no gradient buffers.

`RewardScorer.load(path)` builds the reward model of the checkpoint (its shape recorded with it:
the step's model.json, a model.yaml beside it, or the run's config.yaml) with the engine's builders, loads
the weights with engine.checkpoint (dist_checkpointing: any saved TP/PP layout reloads at this
process's layout) and scores `engine.packing.PackedBatch`es forward-only: bf16 on a GPU, fp32 on the
CPU, rewards always returned as fp32.

Model parallelism across the local devices (`torchrun --nproc_per_node N -m polar.serve ... --tp T
--pp P`, N = T x P): every rank holds a TP shard of a pipeline stage's layers and all must run each
forward together. Rank 0 serves HTTP and, for each packed batch, broadcasts a header (command, b,
L, n) and the batch's tensors over the model-parallel group; the other ranks loop in `follow()` on
receive -> forward until rank 0 broadcasts stop. Rank 0 checks a batch's shape against the model
before broadcasting it, so the others never receive one the model refuses. With P > 1 the forward
is megatron's pipeline schedule (engine.scoring.score: the last stage's rewards reach every stage);
with P = 1 the chunk is called directly. One replica per process group: more replicas are more
servers.

In a process whose torch.distributed group another program started (a trainer's workers, N ranks),
the load is collective over that whole group: megatron's groups are made over all of it, and
engine.checkpoint_load.load agrees on read errors across it. Every rank loads (at tp=pp=1 each holds its own
replica and scores alone, data parallel); a load that not every rank joins within join_timeout_s is
refused on those that came (ProcessGroupRefusal), as is a layout other than the megatron state the
process already runs. The caller's random states are left as they were (the engine seeds its own).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.packing import PackedBatch

_STOP, _BATCH = 0, 1
JOIN_TIMEOUT_S = 120.0  # a trainer's ranks reach their set-up's load within this of each other


class ProcessGroupRefusal(ValueError):
    """This process's running process group or megatron state cannot take this scorer (module docstring)."""


@dataclass
class CheckpointInfo:
    step_dir: Path  # the dist_checkpointing directory
    model: object  # engine.config.ModelConfig: the model the weights belong to


def resolve_checkpoint(path: str) -> CheckpointInfo:
    """A run directory (its newest checkpoint), a checkpoints directory or one step directory, and
    the model recorded with it (engine.checkpoint_model.model_config)."""
    from engine import checkpoint, checkpoint_model

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    try:
        step = Path(checkpoint.resolve(path))
    except checkpoint.CheckpointNotFound as e:
        raise FileNotFoundError(f"--checkpoint {path}: {e}") from None
    return CheckpointInfo(step, checkpoint_model.model_config(str(step)))


def _runtime(par, seed: int, join_timeout_s: float):
    """engine.runtime.init_runtime, or the runtime already running in this process (a trainer
    with the scorer beside it, a test session), once every rank of a running group came."""
    from engine.config import ConfigError
    from engine.runtime import current_or_new_runtime

    try:
        return current_or_new_runtime(par, seed, join_timeout_s, what="loading a reward model")
    except ConfigError as e:
        raise ProcessGroupRefusal(str(e)) from e


class RewardScorer:
    """One model replica (a TP x PP group of processes); `score` runs on rank 0, `follow` on the others."""

    def __init__(self, chunks: list, rt, info: CheckpointInfo, dtype: torch.dtype):
        self.chunks = chunks
        self.chunk = chunks[0]
        self.rt = rt
        self.info = info
        self.dtype = dtype
        self.device = rt.device

    @classmethod
    def load(cls, path: str, tp: int = 1, attention_backend: str = "auto", seed: int = 1234,
             pp: int = 1, join_timeout_s: float = JOIN_TIMEOUT_S) -> "RewardScorer":
        """The reward model of an engine checkpoint (module docstring)."""
        from engine import checkpoint_load

        info = resolve_checkpoint(path)
        scorer = cls._build(info, tp, attention_backend, seed, pp=pp, join_timeout_s=join_timeout_s)
        checkpoint_load.load(str(info.step_dir), scorer.chunks)
        return scorer

    @classmethod
    def random(cls, model: dict, tp: int = 1, attention_backend: str = "auto", seed: int = 1234,
               head_std: float = 0.2) -> "RewardScorer":
        """A model of the given shape (engine.config.ModelConfig fields) with the engine's random
        initialisation and a random value head (zero when new): for benchmarks of speed."""
        from engine.checkpoint_model import model_config_from

        info = CheckpointInfo(Path("."), model_config_from(dict(model), "model"))
        scorer = cls._build(info, tp, attention_backend, seed, initialize=True)
        head = scorer.chunk.value_head.weight
        g = torch.Generator().manual_seed(seed)
        head.copy_((torch.randn(head.shape, generator=g) * head_std).to(head.dtype))
        return scorer

    @classmethod
    def _build(cls, info: CheckpointInfo, tp: int, attention_backend: str, seed: int,
               initialize: bool = False, pp: int = 1, join_timeout_s: float = JOIN_TIMEOUT_S) -> "RewardScorer":
        # init_runtime seeds torch (megatron's model-parallel seeding): in a trainer's process that reset
        # every rank's generators to one seed, so each rank drew the same samples after the load
        # (on the GPUs it seeds, the caller's and init_runtime's LOCAL_RANK: touching every visible one would
        # start a CUDA context on each)
        devices = ([d for d in sorted({torch.cuda.current_device(), int(os.environ.get("LOCAL_RANK", "0"))})
                    if d < torch.cuda.device_count()] if torch.cuda.is_available() else [])
        with torch.random.fork_rng(devices):
            return cls._build_here(info, tp, attention_backend, seed, initialize, pp, join_timeout_s)

    @classmethod
    def _build_here(cls, info: CheckpointInfo, tp: int, attention_backend: str, seed: int, initialize: bool,
                    pp: int, join_timeout_s: float) -> "RewardScorer":
        from engine.config import ParallelConfig, TrainConfig
        from engine.parallelize import build_chunks, check_kernels, resolve_attention_backend, resolve_dtype
        from engine.quiet import silence_known_warnings
        from engine.runtime import seed_model_parallel, validate_layout, world_size_from_env

        silence_known_warnings()
        model = info.model
        world = world_size_from_env()
        if world != tp * pp and not dist.is_initialized():
            raise ValueError(f"--tp {tp} --pp {pp} needs {tp * pp} processes (torchrun --nproc_per_node {tp * pp}); "
                             f"this run has {world}")
        attention_backend = resolve_attention_backend(attention_backend, torch.cuda.is_available(),
                                                      model.hidden_size // model.num_attention_heads)
        par = ParallelConfig(tp=tp, pp=pp, distributed_optimizer=False)
        train = TrainConfig(global_batch=1, micro_batch=1, precision="auto",
                            attention_backend=attention_backend, kernels="torch", aux_lm_weight=0.0)
        validate_layout(model, par, train, tp * pp, seq_length=tp)
        rt = _runtime(par, seed, join_timeout_s)
        if initialize:  # the runtime may be an earlier one's, seeded then
            seed_model_parallel(rt.device, seed, rt.groups.tp.rank())
        check_kernels(train, rt.is_cuda, model.hidden_size // model.num_attention_heads)
        # The bare chunk, not build_model's DDP wrapper: serving needs no gradient buffers.
        chunks, _ = build_chunks(model, par, train, rt, initialize=initialize)
        for chunk in chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        scorer = cls(chunks, rt, info, resolve_dtype(train, rt))
        scorer.attention_backend = attention_backend
        return scorer

    @property
    def model_config(self):
        return self.info.model

    @property
    def max_positions(self) -> int:
        return self.model_config.max_position_embeddings

    @torch.no_grad()
    def _forward(self, tokens, layout, reward_index) -> torch.Tensor:
        if self.rt.pp == 1:
            return self.chunk(tokens, layout, reward_index).float()
        from engine.scoring import score

        empty = torch.zeros(0, dtype=torch.int64, device=tokens.device)  # the schedule reads no labels or pairs
        batch = PackedBatch(tokens=tokens, layout=layout, reward_index=reward_index, cand_group=empty, labels=empty,
                            pair_pos=empty, pair_neg=empty, num_groups=0, num_real_tokens=0)
        return score(self.chunks, [batch], self.rt)

    def score(self, batch: PackedBatch) -> np.ndarray:
        """Rewards (fp32, one per candidate in the batch's numbering). The TP leader only; any thread
        (the current CUDA device is per thread, so it is set here)."""
        if self.rt.is_cuda:
            with torch.cuda.device(self.device):
                return self._score(batch)
        return self._score(batch)

    def _score(self, batch: PackedBatch) -> np.ndarray:
        from engine.model.rope import check_rope_window

        # Here rather than only inside the model: a refusal after the broadcast would reach every rank.
        check_rope_window(self.model_config.rope_scaling, batch.tokens.shape[-1], self.max_positions)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        layout = batch.layout.to(self.device, non_blocking=True)
        reward_index = batch.reward_index.to(self.device, non_blocking=True)
        if self.rt.tp * self.rt.pp > 1:
            header = torch.tensor([_BATCH, *tokens.shape, reward_index.numel()], dtype=torch.int64,
                                  device=self.device)
            for t in (header, tokens, layout, reward_index):
                self._broadcast(t)
        return self._forward(tokens, layout, reward_index).cpu().numpy()

    def follow(self) -> None:
        """Ranks > 0: run every forward rank 0 broadcasts, until it broadcasts stop."""
        while True:
            header = torch.empty(4, dtype=torch.int64, device=self.device)
            self._broadcast(header)
            cmd, b, L, n = header.tolist()
            if cmd == _STOP:
                return
            tokens = torch.empty((b, L), dtype=torch.int64, device=self.device)
            layout = torch.empty((b, 3, L), dtype=torch.int32, device=self.device)
            reward_index = torch.empty(n, dtype=torch.int64, device=self.device)
            for t in (tokens, layout, reward_index):
                self._broadcast(t)
            try:
                self._forward(tokens, layout, reward_index)
            except Exception as e:
                # A failure that depends on the batch alone (a shape check) happens on every rank
                # alike, and rank 0's requests get the error; leaving this loop would leave rank 0's
                # next broadcast unanswered.
                print(f"polar serve rank {dist.get_rank()}: a forward failed ({type(e).__name__}: {e}); "
                      "following on", file=sys.stderr, flush=True)

    def _broadcast(self, t: torch.Tensor) -> None:
        mp = self.rt.groups.mp  # tensor x pipeline: every rank of the replica
        dist.broadcast(t, src=dist.get_global_rank(mp, 0), group=mp)

    @property
    def is_leader(self) -> bool:
        """The model-parallel rank that serves and broadcasts (TP rank 0 of the first stage); the
        others `follow`."""
        return self.rt.groups.mp.rank() == 0

    def stop_followers(self) -> None:
        if self.rt.tp * self.rt.pp > 1:
            self._broadcast(torch.tensor([_STOP, 0, 0, 0], dtype=torch.int64, device=self.device))

    def close(self) -> None:
        from engine.runtime import shutdown_runtime

        shutdown_runtime()
