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
                 pre_process: bool, post_process: bool, vp_stage=None):
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
        if post_process:
            h = config.hidden_size
            self.final_norm = torch.nn.RMSNorm(h, eps=config.layernorm_epsilon, dtype=config.params_dtype)
            self.value_head = torch.nn.Linear(h, 1, bias=False, dtype=config.params_dtype)
            # POLAR: a new value head starts at zero, so every reward starts at 0 and the first
            # gradients flow only into the head
            torch.nn.init.zeros_(self.value_head.weight)

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    def forward(self, tokens, layout, reward_index=None):
        hidden = self.backbone(input_ids=tokens, position_ids=None, attention_mask=layout)
        if not self.post_process:
            return hidden
        return torch_reward_readout(
            hidden, reward_index, self.final_norm.weight, self.value_head.weight, self.final_norm.eps
        )
