"""The reward model: megatron GPTModel backbone (no LM head) plus final norm and value head.

The backbone is built with `post_process=False` on every stage, so it owns neither the final norm
nor a vocabulary projection; the last pipeline stage adds the final RMSNorm and a zero-initialised
`Linear(hidden, 1, bias=False)` value head, and reads them out only at the reward positions.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from engine.model.readout import torch_reward_readout


class RewardModel(MegatronModule):
    def __init__(self, config, spec, vocab_size: int, max_sequence_length: int,
                 pre_process: bool, post_process: bool, vp_stage=None, lm_head: bool = False,
                 kernels: str = "torch"):
        super().__init__(config=config)
        self.pre_process = pre_process
        self.post_process = post_process
        # read by megatron's finalize_model_grads / DDP helpers
        self.share_embeddings_and_output_weights = False
        self.model_type = None
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
        )
        self.model_type = self.backbone.model_type
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
            self.final_norm = torch.nn.RMSNorm(h, eps=config.layernorm_epsilon, dtype=config.params_dtype)
            self.value_head = torch.nn.Linear(h, 1, bias=False, dtype=config.params_dtype)
            # POLAR: a new value head starts at zero, so every reward starts at 0 and the first
            # gradients flow only into the head
            torch.nn.init.zeros_(self.value_head.weight)
            self.lm_head = None
            if lm_head:
                from megatron.core import tensor_parallel

                self.lm_head = tensor_parallel.ColumnParallelLinear(
                    h, vocab_size, config=config, init_method=config.init_method, bias=False,
                    gather_output=False,
                )

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    def forward(self, tokens, layout, reward_index=None):
        """Last stage: rewards [n_candidates] (with an LM head: followed by one element, the summed
        next-token loss). Other stages: hidden states for the next stage."""
        hidden = self.backbone(input_ids=tokens, position_ids=None, attention_mask=layout)
        if not self.post_process:
            return hidden
        rewards = self.readout(
            hidden, reward_index, self.final_norm.weight, self.value_head.weight, self.final_norm.eps
        )
        if self.lm_head is None:
            return rewards
        return torch.cat([rewards, self._next_token_loss_sum(hidden, tokens, layout).view(1)])

    def _next_token_loss_sum(self, hidden, tokens, layout):
        """Sum of next-token cross-entropy over the targets of engine.packing.next_token_mask."""
        from megatron.core import tensor_parallel

        from engine.packing import next_token_mask

        valid = next_token_mask(layout)
        targets = torch.where(valid, tokens[:, 1:], torch.zeros_like(tokens[:, 1:]))  # [b, s-1]
        normed = self.final_norm(hidden[:-1])  # [s-1, b, h]
        logits, _ = self.lm_head(normed)
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets.t().contiguous())
        return (losses * valid.t().to(losses.dtype)).sum()
