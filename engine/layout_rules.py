"""The rules a parallel layout must meet for a model, a batch and a packed sequence length, on any
machine: engine.runtime.validate_layout applies them (and then checks the backbone and FP8 settings
against the GPU it runs on), and `polar plan` asks them of every layout it considers, so the planner
never recommends a layout the engine refuses nor hides one it runs. It imports neither torch nor megatron
(polar/ never reaches into megatron).
"""
from __future__ import annotations

from engine.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig


def check_yarn(model: ModelConfig) -> None:
    """yarn settings that can only be a mistake: a blend run backwards (transformers computes it with
    a warning), or mscales that transformers, and so this engine, would ignore without a word."""
    if model.rope_beta_fast < model.rope_beta_slow:
        raise ConfigError(f"model.rope_beta_fast={model.rope_beta_fast} must be at least model.rope_beta_slow="
                          f"{model.rope_beta_slow} (yarn RoPE scaling blends the frequencies between them)")
    if (model.rope_mscale is None) != (model.rope_mscale_all_dim is None):
        given = "model.rope_mscale" if model.rope_mscale is not None else "model.rope_mscale_all_dim"
        raise ConfigError(f"{given} is set without the other of model.rope_mscale and model.rope_mscale_all_dim; "
                          "yarn's attention factor is read from both together, or neither: set both or neither")
    if model.rope_attention_factor is not None and model.rope_mscale is not None:
        raise ConfigError(f"model.rope_attention_factor={model.rope_attention_factor} is set, and so are "
                          "model.rope_mscale and model.rope_mscale_all_dim, which only derive it: set one or the "
                          "other")


def global_batch_unit(par: ParallelConfig, micro_batch: int, dp: int) -> int:
    """The train.global_batch values check_layout accepts are the multiples of this: whole micro-batches
    on every data-parallel rank and, with interleaved pipelining, a multiple of parallel.pp of them
    (megatron's interleaved schedule runs the micro-batches in groups of pp)."""
    return dp * micro_batch * (par.pp if par.vpp is not None else 1)


def check_layout(model: ModelConfig, par: ParallelConfig, train: TrainConfig, world_size: int,
                 seq_length: int) -> int:
    """Check the parallel layout against the model, batch and packed length (data.seq_length);
    returns the data-parallel size. Nothing here looks at the machine it runs on."""
    if model.rope_scaling == "dynamic" and seq_length > model.max_position_embeddings:
        raise ConfigError(
            f"model.rope_scaling=dynamic is exact only within model.max_position_embeddings="
            f"{model.max_position_embeddings} positions; data.seq_length={seq_length} could exceed it")
    if model.rope_scaling == "llama3" and model.rope_high_freq_factor <= model.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor={model.rope_high_freq_factor} must be more than "
                          f"model.rope_low_freq_factor={model.rope_low_freq_factor} (llama3 RoPE scaling blends "
                          "between them)")
    if model.rope_scaling == "yarn":
        check_yarn(model)
    if par.tp < 1 or par.pp < 1:
        raise ConfigError(f"parallel.tp={par.tp} and parallel.pp={par.pp} must be >= 1")
    if par.sequence_parallel:
        if par.tp < 2:
            raise ConfigError(
                f"parallel.sequence_parallel=true needs parallel.tp > 1 (got parallel.tp={par.tp}): "
                "it splits the sequence over the tensor-parallel ranks"
            )
        if seq_length % par.tp:
            raise ConfigError(
                f"parallel.sequence_parallel=true needs data.seq_length={seq_length} divisible by "
                f"parallel.tp={par.tp}"
            )
    if world_size % (par.tp * par.pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {par.tp} x {par.pp}"
        )
    if model.num_attention_heads % par.tp:
        raise ConfigError(
            f"parallel.tp={par.tp} does not divide model.num_attention_heads={model.num_attention_heads}"
        )
    if model.num_query_groups % par.tp:
        raise ConfigError(
            f"parallel.tp={par.tp} does not divide model.num_query_groups={model.num_query_groups}"
        )
    if model.num_attention_heads % model.num_query_groups:
        raise ConfigError(
            f"model.num_query_groups={model.num_query_groups} does not divide "
            f"model.num_attention_heads={model.num_attention_heads}"
        )
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads={model.num_attention_heads} does not divide "
            f"model.hidden_size={model.hidden_size}"
        )
    if (model.hidden_size // model.num_attention_heads) % 2:
        raise ConfigError(
            f"model.hidden_size={model.hidden_size} / model.num_attention_heads={model.num_attention_heads} "
            f"= {model.hidden_size // model.num_attention_heads} channels per head: rotary embeddings rotate "
            "channel pairs, so it must be even")
    if model.ffn_hidden_size % par.tp:
        raise ConfigError(f"parallel.tp={par.tp} does not divide model.ffn_hidden_size={model.ffn_hidden_size}")
    stages = par.pp * (par.vpp or 1)
    if par.vpp is not None and (par.vpp < 2 or par.pp < 2):
        raise ConfigError(f"parallel.vpp={par.vpp} needs parallel.pp >= 2 and vpp >= 2 (or vpp: null)")
    if model.num_layers % stages:
        raise ConfigError(
            f"model.num_layers={model.num_layers} is not divisible by parallel.pp x parallel.vpp = {stages}"
        )
    dp = world_size // (par.tp * par.pp)
    if train.global_batch % (dp * train.micro_batch):
        raise ConfigError(
            f"train.global_batch={train.global_batch} is not divisible by data-parallel size {dp} "
            f"x train.micro_batch={train.micro_batch}"
        )
    if train.global_batch % global_batch_unit(par, train.micro_batch, dp):
        raise ConfigError(
            "interleaved pipelining needs the number of micro-batches per step "
            f"(train.global_batch / (dp x train.micro_batch) = {train.global_batch // (dp * train.micro_batch)}) "
            f"to be a multiple of parallel.pp={par.pp}"
        )
    if par.overlap_param_gather and not par.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true: it "
                          "overlaps the all-gather of the distributed optimizer's parameter shards")
    return dp
