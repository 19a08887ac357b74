"""Typed run configuration: the engine's settings as nested dataclasses, each field with its default
and the check its value must pass, and `validate`, which runs those checks.

The engine never parses a command line of its own: entry scripts build one top-level dataclass
from a YAML file plus overrides with engine.config_load.load_config, and hand each component the
section it needs. Unknown keys, wrong types and impossible layouts stop the run at start-up with a
message that names the setting (and the file and line, or the command line, that gave a value),
long before a cluster allocation is wasted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.setting_checks import (ConfigError, at_least, boolean, dataset_path_or_empty, directory_to_create,
                                   file_path_or_empty, in_range, joined_named_paths, named_dataset_paths_or_empty,
                                   one_of, optional, positive, run_directory, setting)
from engine import wandb_log

# every field of every section declares a check (engine/setting_checks.py; a new field without one fails the tests)


@dataclass
class ModelConfig:
    """Llama-style decoder backbone with a scalar value head."""

    num_layers: int = setting(4, at_least(1))
    hidden_size: int = setting(128, at_least(1))
    num_attention_heads: int = setting(4, at_least(1))
    num_query_groups: int = setting(2, at_least(1))  # grouped-query attention: KV heads
    ffn_hidden_size: int = setting(384, at_least(1))  # SwiGLU inner size
    vocab_size: int = setting(0, at_least(0))  # 0: taken from the tokenizer by the entry script
    rotary_base: float = setting(10000.0, positive)
    norm_epsilon: float = setting(1e-5, positive)
    init_method_std: float = setting(0.02, positive)
    max_position_embeddings: int = setting(16384, at_least(1))
    # q/k/v projections with a bias (Qwen2); the output projection and the MLP never have one
    add_qkv_bias: bool = setting(False, boolean)
    # RoPE position scaling: none | linear (positions / factor) | dynamic (NTK, as HF Llama and
    # InternLM2 define it: the identity while positions stay below max_position_embeddings, which
    # is all this engine runs: longer packed sequences are refused) | llama3 (Llama 3.1+: per-
    # frequency scaling by wavelength, engine/model/rope.py, with the three settings after the factor)
    # | yarn (YaRN as transformers computes it, engine/model/rope.py: the original context and the
    # settings after it)
    rope_scaling: str = setting("none", one_of("none", "linear", "dynamic", "llama3", "yarn"))
    rope_scaling_factor: float = setting(1.0, positive)
    rope_low_freq_factor: float = setting(1.0, positive)  # llama3 only
    rope_high_freq_factor: float = setting(4.0, positive)  # llama3 only; more than the low factor
    rope_original_max_position_embeddings: int = setting(8192, at_least(1))  # llama3 and yarn
    rope_beta_fast: float = setting(32.0, positive)  # yarn only; at least beta_slow
    rope_beta_slow: float = setting(1.0, positive)  # yarn only
    # yarn only: what cos and sin are multiplied by; null: 0.1 ln(factor) + 1, or from the two mscales
    rope_attention_factor: Optional[float] = setting(None, optional(positive))
    # yarn only, both or neither, and only without rope_attention_factor (transformers ignores them otherwise)
    rope_mscale: Optional[float] = setting(None, optional(positive))
    rope_mscale_all_dim: Optional[float] = setting(None, optional(positive))
    rope_truncate: bool = setting(True, boolean)  # yarn only: round the blend's ends outwards to whole indices
    # the embedding table is padded to a multiple of lcm(this, parallel.tp) rows (megatron splits
    # it evenly over TP); padded rows stay zero and no token id reaches them
    make_vocab_size_divisible_by: int = setting(1, at_least(1))
    # the backbone's linear layers and norms: local (megatron's own modules; runs everywhere) |
    # transformer_engine (TE modules; a CUDA GPU with transformer_engine installed). Never chosen
    # silently: TE is used only when asked for here
    transformer_impl: str = setting("local", one_of("local", "transformer_engine"))


@dataclass
class ParallelConfig:
    """Process layout. Data parallelism takes whatever the world size leaves."""

    tp: int = setting(1, at_least(1))
    pp: int = setting(1, at_least(1))
    # model chunks per pipeline rank (interleaved 1F1B); None = off
    vpp: Optional[int] = setting(None, optional(at_least(2)))
    # megatron sequence parallelism: activations outside attention and MLP are split along the
    # sequence over the TP ranks (needs tp > 1 and data.seq_length divisible by tp)
    sequence_parallel: bool = setting(False, boolean)
    distributed_optimizer: bool = setting(True, boolean)
    # megatron DDP: reduce(-scatter) gradient buckets while the backward still runs, and all-gather
    # updated parameter shards (distributed optimizer) while the next forward runs; same results
    overlap_grad_reduce: bool = setting(False, boolean)
    overlap_param_gather: bool = setting(False, boolean)
    # how long a collective may wait for the slowest rank before the job fails: checkpoint saves and
    # loads, and data preparation before the first step, take minutes at scale (torch's default is 10)
    timeout_minutes: int = setting(30, at_least(1))


def _rank_list(where, v):
    if v == "all":
        return
    if not isinstance(v, list) or not v or any(type(r) is not int or r < 0 for r in v) or len(set(v)) < len(v):
        raise ConfigError(f"{where}={v!r}: expected a list of distinct global ranks (>= 0), e.g. [0] or [0, 8], "
                          "or all")


_rank_list.rule = "a list of distinct global ranks, or all"


# the shared-prefix attention implementations (train.attention_backend and `polar serve` also take "auto")
ATTENTION_BACKENDS = ("blocks", "torch", "triton")


@dataclass
class TrainConfig:
    steps: int = setting(200, at_least(0))  # 0: evaluate only
    # packed sequences per optimizer step, over all data-parallel ranks
    global_batch: int = setting(8, at_least(1))
    micro_batch: int = setting(1, at_least(1))  # packed sequences per forward pass
    lr: float = setting(1e-3, at_least(0.0))
    min_lr_ratio: float = setting(0.1, in_range(0.0, 1.0))  # cosine decays to min_lr_ratio * lr
    warmup_steps: int = setting(10, at_least(0))
    weight_decay: float = setting(0.0, at_least(0.0))
    adam_beta1: float = setting(0.9, in_range(0.0, 1.0, hi_open=True))
    adam_beta2: float = setting(0.95, in_range(0.0, 1.0, hi_open=True))
    adam_eps: float = setting(1e-8, positive)
    grad_clip: float = setting(1.0, at_least(0.0))  # 0 = no clipping
    loss: str = setting("pairwise", one_of("pairwise", "infonce"))  # pairwise: Bradley-Terry, POLAR Eq. 7
    # weight of an auxiliary next-token loss on the packed tokens (0 = off). It needs an LM head
    # (vocab-parallel) on the last stage; it helps a backbone trained from scratch learn to read text
    aux_lm_weight: float = setting(0.0, at_least(0.0))
    # auto: bf16 on GPU, fp32 on CPU
    precision: str = setting("auto", one_of("auto", "fp32", "bf16"))
    seed: int = setting(1234, at_least(0))
    # shared-prefix attention: auto (triton on a CUDA GPU where its head dims fit, else blocks) |
    # torch (reference: the whole pack with a dense mask, runs everywhere) | blocks (torch, one group
    # at a time: the fast CPU path) | triton (a CUDA GPU, or TRITON_INTERPRET=1 on CPU for testing).
    # An explicit choice that cannot run here stops the run at start-up
    attention_backend: str = setting("auto", one_of("auto", *ATTENTION_BACKENDS))
    # reward readout + contrastive loss: torch (reference) | triton (fused kernels; a CUDA GPU, or
    # TRITON_INTERPRET=1 on CPU for testing) | cuda (fused kernels of engine._C_cuda; a CUDA GPU)
    kernels: str = setting("torch", one_of("torch", "triton", "cuda"))
    # 0 = none; otherwise stop (and checkpoint) after this long
    time_limit_s: float = setting(0.0, at_least(0.0))
    # 0 = none; otherwise save and exit after this step (fits a job slot)
    exit_at_step: int = setting(0, at_least(0))
    # empty = none; otherwise a path rank 0 looks for after every step: once it exists the run saves a
    # checkpoint, removes the file and exits (0), so a scheduler's warning (SLURM --signal) or a user's
    # `touch` stops it with nothing lost. On a file system rank 0's node sees
    stop_file: str = setting("", file_path_or_empty)
    # evaluate on the run's evaluation data every this many steps (0 = only at the end)
    eval_interval: int = setting(0, at_least(0))
    # a step whose loss or gradients are not finite is skipped (no update) and reported; this many
    # in a row stop the run with where they happened
    max_nonfinite_steps: int = setting(5, at_least(1))
    # FP8 matrix products in the backbone's linear layers (attention stays in the training dtype):
    # off | tensorwise | rowwise (current scaling per tensor / per row; local or TE, rowwise local
    # only) | delayed (TE DelayedScaling) | mxfp8 (TE MXFP8 block scaling, Blackwell). See engine/fp8.py
    fp8: str = setting("off", one_of("off", "tensorwise", "rowwise", "delayed", "mxfp8"), false_means="off")
    # activation recomputation: none | selective (core attention) | full (whole layers, in units of
    # train.recompute_num_layers)
    recompute: str = setting("none", one_of("none", "selective", "full"))
    recompute_num_layers: int = setting(1, at_least(1))  # layers per recomputed unit (recompute=full)
    # profiling the steps [profile_start, profile_end) on the ranks profile_ranks (engine/profiling.py):
    # off | torch (torch.profiler, after one warm-up step: a Chrome trace per rank in
    # <run_dir>/profile/rank<R>/) | cuda (cudaProfilerStart/Stop and NVTX ranges around the window,
    # for `nsys profile --capture-range=cudaProfilerApi`; a CUDA GPU)
    profile: str = setting("off", one_of("off", "torch", "cuda"), false_means="off")
    profile_start: int = setting(10, at_least(1))  # the window's first step (steps count from 1)
    profile_end: int = setting(12, at_least(2))  # the first step after the window
    # global ranks: a list ([0], [0, 8]) or all; the other ranks run as without profiling
    profile_ranks: Any = setting(dataclasses.MISSING, _rank_list, default_factory=lambda: [0])
    # the CUDA caching allocator's history over the window, dumped to <run_dir>/profile/
    # memory_rank<R>.pickle at its end (pytorch.org/memory_viz); on a profiled rank, a step that runs
    # out of device memory dumps one too, wherever the window lies. A CUDA GPU
    memory_snapshot: bool = setting(False, boolean)

    def settings_together(self, where: str) -> Optional[tuple[tuple[str, ...], str]]:
        """(the settings concerned, why) for settings each fine alone that cannot go together; None if none."""
        if self.profile_end <= self.profile_start:
            return ("profile_end", "profile_start"), (
                f"{where}.profile_end={self.profile_end} must be more than {where}.profile_start={self.profile_start}: "
                "the window is the steps from profile_start up to, not including, profile_end")
        return None


@dataclass
class DataConfig:
    seq_length: int = setting(1024, at_least(2))  # packed sequence length; a group never spans two sequences
    # best_fit | ordered (data built in memory; a built dataset is packed already)
    packing: str = setting("best_fit", one_of("best_fit", "ordered"))
    # a built dataset directory (`polar data build`); empty = the entry script's own data
    path: str = setting("", dataset_path_or_empty)
    # built datasets to evaluate on: PATH (the set "eval") or NAME=PATH,NAME=PATH (in YAML also a mapping
    # {NAME: PATH, ...}); empty = none (or the script's own)
    eval_path: str = setting("", named_dataset_paths_or_empty, from_mapping=joined_named_paths)


def _checkpoint_or_empty(where, v):
    if v:
        from engine.checkpoint import CheckpointNotFound, resolve

        try:
            resolve(v)
        except CheckpointNotFound as e:
            raise ConfigError(f"{where}={v}: {e}") from None


_checkpoint_or_empty.rule = "empty, or a checkpoint directory (its latest step) or one step directory"


@dataclass
class CheckpointConfig:
    dir: str = setting("", directory_to_create)  # empty: <run_dir>/checkpoints
    save_interval: int = setting(0, at_least(0))  # steps; 0 = only at the end
    # continue from the newest complete checkpoint in dir, with the optimizer, schedule, loss, data-order
    # and model settings it was saved with; false: a new run, refused if dir already holds a checkpoint
    resume: bool = setting(True, boolean)
    # load model weights (any TP/PP layout) before training: a checkpoint directory (its newest
    # complete step) or one step directory
    init_from: str = setting("", _checkpoint_or_empty)
    keep: int = setting(2, at_least(0))  # complete checkpoints kept (0 = all)
    # the checkpoint after the last step (false: none, e.g. a throughput benchmark; an early stop by
    # train.time_limit_s or train.exit_at_step still saves, as does save_interval)
    save_at_end: bool = setting(True, boolean)
    # how the distributed optimizer's state is written. fully_reshardable: per parameter, so a run
    # resumes at any TP/PP/VPP/DP, but each save all-gathers a model shard's whole optimizer state on
    # every DP replica and each rank reads it whole at load (memory and I/O that grow with the model
    # shard, not the rank's share). dp_reshardable: every rank writes and reads its own share only,
    # no exchange; a run resumes at the same TP/PP/VPP (any DP) with the distributed optimizer,
    # refused otherwise before the load
    optimizer_format: str = setting("fully_reshardable", one_of("fully_reshardable", "dp_reshardable"))
    # a save copies the state to host memory and training goes on while a forked process per rank
    # writes the files; the step becomes `latest` once every rank's write has finished (checked at
    # log steps and at the next save; the end of the run and an early stop wait for it). Costs host
    # memory for one copy of the rank's shard of the weights and optimizer state
    async_save: bool = setting(False, boolean)
    # seconds a run waits for its checkpoint directory's lock (`.lock`, held by another run's rank 0)
    # before it is refused: a run on a node that was lost keeps its NFS lock for the server's lease time
    # after its death (NFSv4: 90 s by default), and its restart (torchrun --max-restarts, a SLURM requeue)
    # waits for the lock to lapse. --check-config waits too (a requeue's start-up check is one); 0 =
    # refused at once. The run says once that it waits, naming the holder. A live holder is refused
    # sooner: at once on this host, within two of its heartbeats (the lock file's mtime, refreshed
    # every 5 s) on another
    lock_wait_s: float = setting(180.0, at_least(0.0))


@dataclass
class LogConfig:
    interval: int = setting(10, at_least(1))
    tensorboard: bool = setting(True, boolean)
    # RUN_DIR/metrics.jsonl (engine/metrics_file.py): the progress and evaluation figures for any tracker
    metrics_file: bool = setting(True, boolean)
    # Weights & Biases (engine/wandb_log.py): a project's name turns it on; the run's name is the run
    # directory's where empty, the entity wandb's default
    wandb_project: str = setting("", wandb_log.wandb_project)
    wandb_name: str = setting("", wandb_log.wandb_name)
    wandb_entity: str = setting("", wandb_log.wandb_entity)

    def settings_together(self, where: str) -> Optional[tuple[tuple[str, ...], str]]:
        for name in ("wandb_name", "wandb_entity"):
            if getattr(self, name) and not self.wandb_project:
                return (name, "wandb_project"), (
                    f"{where}.{name}={getattr(self, name)!r} has no effect without {where}.wandb_project (empty: "
                    f"no wandb logging): name the project too, or leave {where}.{name} out")
        return None


@dataclass
class EngineConfig:
    """Everything the engine needs; entry scripts extend it with their own data sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run_dir: str = setting("runs/default", run_directory)


def validate(cfg, where: str = "", sources: Optional[dict] = None) -> None:
    """Runs every field's check (depth first, in declaration order), then each section's
    settings_together (settings that cannot go together); the first failure raises ConfigError naming
    the setting, after the file and line (or the command line) that set it where `sources`
    (engine.config_load.load_config's) knows. A field that declares no check is a programming error."""
    for f in dataclasses.fields(cfg):
        name = f"{where}.{f.name}" if where else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, name, sources)
            continue
        check = f.metadata.get("check")
        if check is None:
            raise TypeError(f"config field {name} declares no check: define it with engine.setting_checks.setting()")
        try:
            check(name, value)
        except ConfigError as e:
            raise traced(e, name, sources) from None
    together = cfg.settings_together(where) if hasattr(cfg, "settings_together") else None
    if together:
        names = [f"{where}.{n}" if where else n for n in together[0]]
        # led by where one of them was given: the default of the other is no one's choice
        given = [n for n in names if sources and n in sources] or names
        raise traced(ConfigError(together[1]), given[0], sources)


def traced(e: ConfigError, name: str, sources: Optional[dict]) -> ConfigError:
    """`e` (about the setting `name`) led by where that setting was given: once a file, its bases and
    the command line are merged, a value no longer says which of them it came from. Here, not in
    engine.config_load, because `validate` leads its failures the same way."""
    source = sources.get(name) if sources else None
    return ConfigError(f"{source}: {e}") if source is not None else e
