"""Triton kernels (opt-in fast paths).

Each module holds the math, the @triton.jit kernels, the launcher and a `torch.library.custom_op`
(namespace `polar`) with fake and autograd registrations:

- `engine.kernels.reward_readout`: `reward_readout(hidden, reward_index, norm_weight, head_weight, eps)`
  (`polar::reward_readout`), same semantics as `engine.model.readout.torch_reward_readout`.
- `engine.kernels.contrastive_loss`: `pairwise_loss(rewards, pair_pos, pair_neg)` (`polar::pairwise_loss`)
  and `infonce_loss(...)` (`polar::infonce_loss`), same semantics as `engine.loss.pairwise_sums` and
  `engine.loss.infonce_sums`.

Nothing is imported here: importing a submodule imports triton, which callers opt into.
"""
