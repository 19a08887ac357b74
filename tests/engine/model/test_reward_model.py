"""Shared-prefix packing is exact: a packed sequence of several groups of K candidates gives the
same rewards, and the same parameter gradients, as scoring every `prefix + candidate` alone, with
either torch attention backend (the dense-mask reference and the per-group blocks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, ParallelConfig, TrainConfig
from engine.packing import Group, collate


BACKENDS = ("torch", "blocks")


@pytest.fixture(autouse=True)
def blocks_on_short_packs(monkeypatch):
    """These packs are short: without this the blocks backend would hand them to the dense path."""
    from engine.model import shared_prefix_attention

    monkeypatch.setattr(shared_prefix_attention, "DENSE_BELOW", 0)


def build_model(runtime, seed=0, backend="torch"):
    from engine.model.reward_model import RewardModel
    from engine.model.spec import layer_spec
    from engine.parallelize import transformer_config

    torch.manual_seed(seed)
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=96, vocab_size=50)
    cfg = transformer_config(m, ParallelConfig(), TrainConfig(precision="fp32"), runtime)
    model = RewardModel(cfg, layer_spec(False, 10000.0, backend), m.vocab_size, 512, True, True)
    # a zero value head would make every backbone gradient zero and the gradient check vacuous
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    return model


def random_groups(rng, n_groups, k_range=(2, 5)):
    groups = []
    for _ in range(n_groups):
        k = int(rng.integers(*k_range))
        prefix = rng.integers(1, 50, size=int(rng.integers(1, 25)), dtype=np.int32)
        cands = [rng.integers(1, 50, size=int(rng.integers(1, 15)), dtype=np.int32) for _ in range(k)]
        labels = np.zeros(k, dtype=np.int8)
        labels[0] = 1
        groups.append(Group(prefix=prefix, candidates=cands, labels=labels))
    return groups


def unpacked_reward(model, ids: np.ndarray) -> torch.Tensor:
    """One plain causal sequence: every token in segment 0 with candidate id 0."""
    n = len(ids)
    layout = torch.zeros(1, 3, n, dtype=torch.int32)
    layout[0, 0] = torch.arange(n)
    return model(torch.from_numpy(ids.astype(np.int64))[None], layout, torch.tensor([n - 1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_rewards_and_grads_equal_unpacked(runtime, seed, backend):
    rng = np.random.default_rng(seed)
    model = build_model(runtime, seed, backend)
    groups = random_groups(rng, 6)
    # two packed sequences with several groups each, and padding at the end
    total = [len(g) for g in groups]
    seqs = [groups[:3], groups[3:]]
    seq_len = max(sum(total[:3]), sum(total[3:])) + 5
    batch = collate(seqs, seq_len, pad_id=0)
    weights = torch.randn(batch.reward_index.numel(), dtype=torch.float64)

    model.zero_grad()
    packed = model(batch.tokens, batch.layout, batch.reward_index)
    (packed.double() * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    singles = []
    for g in groups:
        for c in g.candidates:
            singles.append(unpacked_reward(model, np.concatenate([g.prefix, c])))
    single = torch.cat(singles)
    (single.double() * weights).sum().backward()

    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)
    assert single.abs().max() > 1e-3  # a non-trivial comparison
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")
        assert p.grad.abs().max() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_candidate_ignores_siblings_and_other_groups(runtime, backend):
    """Changing a sibling candidate or another group's tokens leaves a candidate's reward alone."""
    rng = np.random.default_rng(5)
    model = build_model(runtime, 5, backend)
    groups = random_groups(rng, 3, k_range=(3, 4))
    batch = collate([groups], sum(len(g) for g in groups), pad_id=0)
    base = model(batch.tokens, batch.layout, batch.reward_index)
    changed = [Group(g.prefix.copy(), [c.copy() for c in g.candidates], g.labels) for g in groups]
    changed[1].candidates[2][:] = (changed[1].candidates[2] + 7) % 49 + 1  # a sibling of 1/0, 1/1
    changed[2].prefix[:] = (changed[2].prefix + 3) % 49 + 1  # another group entirely
    other = collate([changed], sum(len(g) for g in changed), pad_id=0)
    out = model(other.tokens, other.layout, other.reward_index)
    k0, k1 = len(groups[0].candidates), len(groups[1].candidates)
    torch.testing.assert_close(out[: k0 + 2], base[: k0 + 2], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[k0 + 2], base[k0 + 2])  # the changed candidate itself moved
    assert not torch.allclose(out[k0 + k1:], base[k0 + k1:])  # the changed group moved


@pytest.mark.parametrize("vocab_rows", [50, 64])
def test_aux_next_token_loss_equals_unpacked(runtime, vocab_rows):
    """The packed LM term sums, per group, the prefix's next-token losses once and each candidate's
    own next-token losses, exactly as the unpacked `prefix + candidate` sequences give them. With
    vocab_rows=64 the embedding and LM head are padded past the 50 real tokens (as for TP's
    divisibility): the softmax runs over the real tokens only, the padded columns are no token."""
    import torch.nn.functional as F

    from engine.model.reward_model import RewardModel
    from engine.model.spec import layer_spec
    from engine.parallelize import transformer_config

    torch.manual_seed(3)
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=96, vocab_size=50)
    cfg = transformer_config(m, ParallelConfig(), TrainConfig(precision="fp32"), runtime)
    model = RewardModel(cfg, layer_spec(False, 10000.0, "torch"), vocab_rows, 512, True, True, lm_head=True,
                        real_vocab_size=50, pg_collection=runtime.groups)
    groups = random_groups(np.random.default_rng(3), 4)
    batch = collate([groups[:2], groups[2:]], 200, pad_id=0)
    out = model(batch.tokens, batch.layout, batch.reward_index)
    packed_lm = out[-1]

    def token_losses(ids):
        n = len(ids)
        layout = torch.zeros(1, 3, n, dtype=torch.int32)
        layout[0, 0] = torch.arange(n)
        hidden = model.backbone(input_ids=torch.from_numpy(ids.astype(np.int64))[None], position_ids=None,
                                attention_mask=layout)
        logits, _ = model.lm_head(model.final_norm(hidden[:-1]))
        return F.cross_entropy(logits[:, 0, :50].double(), torch.from_numpy(ids[1:].astype(np.int64)),
                               reduction="none")

    expected = torch.zeros((), dtype=torch.float64)
    for g in groups:
        p = len(g.prefix)
        for i, c in enumerate(g.candidates):
            losses = token_losses(np.concatenate([g.prefix, c]))
            if i == 0:
                expected += losses[: p - 1].sum()  # the prefix is counted once per group
            expected += losses[p:].sum()  # the candidate's own next tokens
    torch.testing.assert_close(packed_lm.double(), expected, rtol=1e-5, atol=1e-5)


def test_bf16_norms_see_inputs_of_their_own_dtype(runtime):
    """torch.rms_norm runs its fused CUDA kernel only where the weight's dtype is the input's; otherwise
    it warns once and decomposes into fp32 element-wise ops that keep two fp32 copies of the [tokens, h]
    input per norm for the backward. megatron's WrappedTorchNorm builds the local spec's layer norms in
    fp32 whatever the training dtype (megatron casts whole models in Float16Module, which this engine does
    not use), so every layer norm of a bf16 model took that path. Each norm is checked on the input it gets."""
    from engine.model.reward_model import RewardModel
    from engine.model.spec import layer_spec
    from engine.parallelize import transformer_config

    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=96, vocab_size=50)
    cfg = transformer_config(m, ParallelConfig(), TrainConfig(precision="bf16"), runtime)
    model = RewardModel(cfg, layer_spec(False, 10000.0, "torch"), m.vocab_size, 512, True, True, lm_head=True,
                        pg_collection=runtime.groups)
    seen = []

    def record(module, args):
        seen.append((type(module).__name__, args[0].dtype, module.weight.dtype))

    norms = [mod for mod in model.modules() if isinstance(mod, torch.nn.RMSNorm)]
    assert len(norms) == 2 * m.num_layers + 1  # two per layer and the final norm
    for norm in norms:
        norm.register_forward_pre_hook(record)
    batch = collate([random_groups(np.random.default_rng(0), 2)], 64, pad_id=0)
    model(batch.tokens, batch.layout, batch.reward_index).sum().backward()
    # the final norm runs twice here: the readout's (its own fp32 arithmetic, not torch.rms_norm) and the LM head's
    assert len(seen) == 2 * m.num_layers + 1
    assert all(x == w == torch.bfloat16 for _, x, w in seen), seen
