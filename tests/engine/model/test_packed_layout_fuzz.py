"""Shared-prefix packing against the duplicated layout (every `prefix + candidate` alone, plain causal
attention) on odd but legal packs, on both torch backends: a group with one candidate, 16 candidates
of one token, candidates of 1 and 37 tokens, a row ending exactly at seq_length and padding tails of
0 to 3 tokens, prefixes of one token and none, several groups a row; GQA ratios 1, 2, 4 and 8 at
head dims 16 to 128 (tests/engine/model/prefix_cases.py). Rewards, every parameter's gradient and
the input-embedding gradient (a prefix token's: the sum over its candidates' copies) must agree.
Then dynamic NTK RoPE (InternLM2's, x2 at rope theta 5e7) at the edge of its window, against
transformers' dynamic rotary embedding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.model import shared_prefix_attention as spa
from engine.packing import SEGMENT, collate
from tests.engine.model.prefix_cases import build_model, check_against_duplicated, collate_case, group, pack_cases

CASES = pack_cases()


@pytest.fixture(autouse=True)
def blocks_on_short_packs(monkeypatch):
    """These packs are short: without this the blocks backend would hand them to the dense path."""
    monkeypatch.setattr(spa, "DENSE_BELOW", 0)


@pytest.mark.parametrize("backend", ["torch", "blocks"])
@pytest.mark.parametrize("name", list(CASES))
def test_packed_equals_duplicated(runtime, name, backend):
    rows, pad, (hq, hkv, d) = CASES[name]
    batch = collate_case(rows, pad)
    assert int((batch.layout[:, SEGMENT] < 0).sum(1).min()) == pad  # the longest row's padding tail
    check_against_duplicated(build_model(runtime, hq, hkv, d, backend), rows, batch)


MAX_POS, THETA, HEAD_DIM = 24, 5e7, 16


def test_dynamic_rope_is_transformers_up_to_the_window_edge():
    """transformers' dynamic rope (HF Llama's; InternLM2's code computes the same) scales the base only
    once a sequence holds more than max_position_embeddings positions. The engine implements the
    inside of that window: its angles are transformers' for a sequence of exactly max positions, and
    one position more changes transformers' (every angle of the sequence, not only the new one's):
    that is why a longer packed sequence is refused rather than computed."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from engine.model.rope import rope_cos_sin

    cfg = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=MAX_POS, rope_theta=THETA,
                      rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    hf = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, MAX_POS + 1, HEAD_DIM)  # only its dtype and device are read
    positions = torch.arange(MAX_POS)[None]
    cos, sin = hf(x, positions)  # [1, s, d]
    ours = rope_cos_sin(positions, HEAD_DIM, THETA, scaling="dynamic", factor=2.0)  # [s, 1, 1, d] each
    for got, want in zip(ours, (cos, sin)):
        torch.testing.assert_close(got[:, 0, 0], want[0], rtol=0, atol=2e-6)
    longer, _ = hf(x, torch.arange(MAX_POS + 1)[None])
    assert (longer[0, :MAX_POS] - cos[0]).abs().max() > 1e-3


def test_dynamic_rope_pack_filling_the_window_equals_duplicated_and_one_more_is_refused(runtime):
    """A candidate whose `prefix + candidate` holds exactly max_position_embeddings tokens, in a pack of
    that length, gives the duplicated reward; a pack one token longer is refused by name."""
    model = build_model(runtime, 4, 2, HEAD_DIM, "torch", rotary_base=THETA, rope_scaling="dynamic",
                        rope_scaling_factor=2.0, max_position_embeddings=MAX_POS)
    rng = np.random.default_rng(3)
    rows = [[group(rng, 20, [4], labelled=False)], [group(rng, 8, [6, 9])]]
    batch = collate(rows, MAX_POS, pad_id=0)
    assert int(batch.layout[0, 0].max()) == MAX_POS - 1  # the last position the window holds
    check_against_duplicated(model, rows, batch)
    longer = collate(rows, MAX_POS + 1, pad_id=0)
    with pytest.raises(ValueError, match=f"rope_scaling=dynamic: a packed sequence of {MAX_POS + 1} tokens.*"
                                         f"max_position_embeddings={MAX_POS}"):
        model(longer.tokens, longer.layout, longer.reward_index)
