"""Fused kernels (opt-in fast paths): Triton, and CUDA via engine._C_cuda.

Each Triton module holds the math, the @triton.jit kernels, the launcher and a `torch.library.custom_op`
(namespace `polar`) with fake and autograd registrations:

- `engine.kernels.reward_readout`: `reward_readout(hidden, reward_index, norm_weight, head_weight, eps)`
  (`polar::reward_readout`), same semantics as `engine.model.readout.torch_reward_readout`.
- `engine.kernels.contrastive_loss`: `pairwise_loss(rewards, pair_pos, pair_neg)` (`polar::pairwise_loss`)
  and `infonce_loss(...)` (`polar::infonce_loss`), same semantics as `engine.loss.pairwise_sums` and
  `engine.loss.infonce_sums`.

- `engine.kernels.cuda_ops`: the same three functions with the same signatures and returns, backed by
  the CUDA kernels of engine._C_cuda (csrc/cuda/; ops `polar::reward_readout_cuda_fwd`/`_bwd`,
  `polar::pairwise_loss_cuda`, `polar::infonce_loss_cuda`). Importing it loads the library and raises
  ImportError with the build command when it is missing.

`train.kernels` (torch | triton | cuda) picks one; engine/parallelize.py check_kernels refuses a
choice this machine cannot run. Nothing is imported here: importing a submodule imports triton or
loads engine._C_cuda, which callers opt into.
"""
