"""The reward model: megatron GPTModel backbone (no LM head) plus final norm and value head.

The backbone is built with `post_process=False` on every stage, so it owns neither the final norm
nor a vocabulary projection; the last pipeline stage adds the final RMSNorm and a zero-initialised
`Linear(hidden, 1, bias=False)` value head, and reads them out only at the reward positions.

With sequence parallelism (`config.sequence_parallel`) the backbone returns this TP rank's slice of
the sequence, [s/tp, b, h]: each rank reads out the rewards whose rows it holds, and one TP
all-reduce of the n rewards completes them (no gather of the hidden states). The final norm and
the value head then see only local rows on each rank, so their parameters are marked
`sequence_parallel` and megatron's finalize_model_grads sums their gradients over the TP group.

The local spec's layer norms are LayerRMSNorm, built in the training dtype: megatron's own
(WrappedTorchNorm) are fp32 whatever the dtype, which sends every norm of a bf16 model down
torch.rms_norm's unfused path (see LayerRMSNorm).
"""
from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from engine.model.readout import torch_reward_readout


class LayerRMSNorm(torch.nn.RMSNorm):
    """The RMSNorms of the local spec and the final norm. Built in config.params_dtype: torch.rms_norm
    takes its fused CUDA kernel only where the weight's dtype is the input's, and otherwise decomposes
    into fp32 element-wise ops that keep two fp32 copies of the [tokens, h] input for the backward
    (megatron's WrappedTorchNorm builds fp32 norms and relies on Float16Module, unused here, to cast
    them). Under sequence parallelism each rank normalises only its own sequence slice, so the weight
    gradient is partial: marked for megatron's TP gradient sum (WrappedTorchNorm refuses SP)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def _engine_norms(spec):
    """The layer spec with megatron's torch norms swapped for LayerRMSNorm (the TE spec's norms are
    fused into its linear layers, built in the training dtype and SP-aware, and are left alone)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = copy.deepcopy(spec)
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(spec.submodules, name, None) is WrappedTorchNorm:
            setattr(spec.submodules, name, LayerRMSNorm)
    return spec


class RewardModel(MegatronModule):
    def __init__(self, config, spec, vocab_size: int, max_sequence_length: int,
                 pre_process: bool, post_process: bool, vp_stage=None, lm_head: bool = False,
                 kernels: str = "torch", pg_collection=None, real_vocab_size: int | None = None):
        super().__init__(config=config)
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        self.pre_process = pre_process
        self.post_process = post_process
        # read by megatron's finalize_model_grads / DDP helpers
        self.share_embeddings_and_output_weights = False
        self.model_type = None
        spec = _engine_norms(spec)
        self.backbone = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=False,
            share_embeddings_and_output_weights=False,
            position_embedding_type="none",
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        self.model_type = self.backbone.model_type
        # vocab_size may be padded for TP (engine.parallelize.padded_vocab_size): the LM head's
        # columns from real_vocab_size on are no token and are masked out of the softmax
        self.real_vocab_size = vocab_size if real_vocab_size is None else real_vocab_size
        if kernels == "triton":
            from engine.kernels.reward_readout import reward_readout

            self.readout = reward_readout
        elif kernels == "cuda":
            from engine.kernels.cuda_ops import reward_readout

            self.readout = reward_readout
        else:
            self.readout = torch_reward_readout
        if post_process:
            h = config.hidden_size
            self.final_norm = LayerRMSNorm(config, h, eps=config.layernorm_epsilon)
            self.value_head = torch.nn.Linear(h, 1, bias=False, dtype=config.params_dtype)
            # POLAR: a new value head starts at zero, so every reward starts at 0 and the first
            # gradients flow only into the head
            torch.nn.init.zeros_(self.value_head.weight)
            # under SP each TP rank computes the head's gradient, as the final norm's (LayerRMSNorm), from
            # its own rows only (reward rows and LM rows in its sequence slice); finalize_model_grads sums
            # them over TP for parameters marked so (only when config.sequence_parallel)
            self.value_head.weight.sequence_parallel = config.sequence_parallel
            self.lm_head = None
            if lm_head:
                from megatron.core import tensor_parallel

                self.lm_head = tensor_parallel.ColumnParallelLinear(
                    h, vocab_size, config=config, init_method=config.init_method, bias=False,
                    gather_output=False, tp_group=self.tp_group,
                )

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    def forward(self, tokens, layout, reward_index=None):
        """Last stage: rewards [n_candidates] (with an LM head: followed by one element, the summed
        next-token loss). Other stages: hidden states for the next stage."""
        hidden = self.backbone(input_ids=tokens, position_ids=None, attention_mask=layout)
        if not self.post_process:
            return hidden
        if self.config.sequence_parallel:
            rewards = self._sequence_parallel_readout(hidden, reward_index)
        else:
            rewards = self.readout(
                hidden, reward_index, self.final_norm.weight, self.value_head.weight, self.final_norm.eps
            )
        if self.lm_head is None:
            return rewards
        return torch.cat([rewards, self._next_token_loss_sum(hidden, tokens, layout).view(1)])

    def _sequence_parallel_readout(self, hidden, reward_index):
        """hidden [s/tp, b, h] (this rank's sequence slice), reward_index [n] flat bi*s + t over the
        full sequence -> rewards [n], complete on every TP rank.

        Each rank evaluates all n rows with its indices mapped into its slice; rows held by another
        rank are clamped to a valid local row and then zeroed by torch.where, which also zeroes
        their gradient. Device-side only: no mask indexing, so no host sync and a fixed shape."""
        from megatron.core import tensor_parallel

        s_local = hidden.shape[0]
        start = self.tp_group.rank() * s_local
        s = s_local * self.tp_group.size()
        t = reward_index % s - start
        local = (t >= 0) & (t < s_local)
        local_index = (reward_index // s) * s_local + t.clamp(0, s_local - 1)
        rewards = self.readout(
            hidden, local_index, self.final_norm.weight, self.value_head.weight, self.final_norm.eps
        )
        rewards = torch.where(local, rewards, torch.zeros_like(rewards))
        # forward: sum of the disjoint per-rank parts; backward: identity, so each rank's local
        # rows get the loss gradient that every rank computes identically from the full rewards
        return tensor_parallel.reduce_from_tensor_model_parallel_region(rewards, group=self.tp_group)

    def _next_token_loss_sum(self, hidden, tokens, layout):
        """Sum of next-token cross-entropy over the targets of engine.packing.next_token_mask."""
        from megatron.core import tensor_parallel

        from engine.packing import next_token_mask

        valid = next_token_mask(layout)
        targets = torch.where(valid, tokens[:, 1:], torch.zeros_like(tokens[:, 1:]))  # [b, s-1]
        # The norm runs on every row the rank holds (all of them, or its slice under SP) and the last
        # position is dropped after the head: under SP, ColumnParallelLinear all-gathers its input
        # along the sequence, so the logits cover the full sequence and line up with `targets`.
        normed = self.final_norm(hidden)  # [s, b, h], or [s/tp, b, h] under SP
        logits, _ = self.lm_head(normed)  # [s, b, vocab/tp]
        logits = logits[:-1]
        if self.real_vocab_size < self.lm_head.output_size:
            local = logits.shape[-1]
            first = self.tp_group.rank() * local
            padded = torch.arange(first, first + local, device=logits.device) >= self.real_vocab_size
            logits = logits.masked_fill(padded, float("-inf"))
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets.t().contiguous(),
                                                              tp_group=self.tp_group)
        return (losses * valid.t().to(losses.dtype)).sum()
