"""The Triton shared-prefix attention on the odd but legal packs of tests/engine/model/prefix_cases.py
(a group with one candidate, 16 one-token candidates, candidates of 1 and 37 tokens, a row ending
exactly at seq_length, one-token and empty prefixes, several groups a row; GQA ratios 1, 2, 4, 8 at
head dims 16 to 128; lengths not multiples of the tiles), in the interpreter: the kernel against the
float64 dense-mask reference, the reward model on it against the duplicated layout, head dims and
dtypes it lacks refused by name; and the contrastive kernels on non-finite rewards, against torch's.

TRITON_INTERPRET must be set before the kernel modules are imported (tests/engine/kernels/conftest.py
runs this module in a child process of its own)."""
import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.kernels import contrastive_loss as cl  # noqa: E402
from engine.kernels import shared_prefix_attention as spa  # noqa: E402
from engine.loss import infonce_sums, pairwise_sums  # noqa: E402
from tests.engine.kernels.attention_cases import NAMES, reference, rel_err, run  # noqa: E402
from tests.engine.kernels import test_shared_prefix_attention as kernel_tests  # noqa: E402
from tests.engine.model.prefix_cases import (  # noqa: E402
    build_model, check_against_duplicated, collate_case, pack_cases,
)

CASES = pack_cases()
_inputs = kernel_tests._inputs
# autouse here as there: every buffer the kernels are meant to write in full starts as NaN
poisoned_buffers = kernel_tests.poisoned_buffers
# tiles (fwd_m, fwd_n, bwd_m, bwd_n) other than the interpreter's 16 x 16, where a case asks
TILES = {"ragged": (32, 16, 16, 32), "several_groups": (16, 32, 32, 16)}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64_reference(monkeypatch, name):
    rows, pad, (hq, hkv, d) = CASES[name]
    if name in TILES:
        fm, fn, bm, bn = TILES[name]
        monkeypatch.setattr(spa, "_blocks", lambda d, device, dtype: spa._Blocks((fm, fn, 4, bm, bn, 4, 1)))
    layout = collate_case(rows, pad).layout
    q, k, v, grad = _inputs(list(CASES).index(name), layout, hq, hkv, d)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    for deterministic in (False, True):
        got = run(spa.shared_prefix_attention, q, k, v, grad, layout, torch.float32, deterministic=deterministic)
        for what, g, r in zip(NAMES, got, ref):
            assert rel_err(g, r) < 2e-5, (what, deterministic, rel_err(g, r))


@pytest.mark.parametrize("name", ["sixteen_one_token", "exact_fill"])
def test_reward_model_on_the_kernel_equals_duplicated(runtime, name):
    rows, pad, (hq, hkv, d) = CASES[name]
    check_against_duplicated(build_model(runtime, hq, hkv, d, "triton"), rows, collate_case(rows, pad), rtol=1e-4)


@pytest.mark.parametrize("d,dtype,match", [
    (8, torch.float32, "head dim 8 is not supported"), (48, torch.float32, "head dim 48 is not supported"),
    (96, torch.float32, "head dim 96 is not supported"), (512, torch.float32, "head dim 512 is not supported"),
    (16, torch.float64, "must share fp16/bf16/fp32, got torch.float64"),
])
def test_what_the_kernel_lacks_is_refused_by_name(d, dtype, match):
    layout = collate_case(*CASES["prefix_one"][:2]).layout
    s = layout.shape[-1]
    q, k = torch.zeros(s, 1, 4, d, dtype=dtype), torch.zeros(s, 1, 2, d, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        spa.shared_prefix_attention(q, k, k, layout, 0.25)


def test_query_heads_that_are_no_multiple_of_the_kv_heads_are_refused():
    layout = collate_case(*CASES["prefix_one"][:2]).layout
    s = layout.shape[-1]
    q, k = torch.zeros(s, 1, 3, 16), torch.zeros(s, 1, 2, 16)
    with pytest.raises(ValueError, match="hq must be a multiple of hkv"):
        spa.shared_prefix_attention(q, k, k, layout, 0.25)


# one group: positive 0, negatives 1..3; the candidate whose reward is made non-finite, and what the
# pairwise loss then is (finite: the candidate only drops out of its pairs)
NON_FINITE = [("negative at -inf", 1, -math.inf, math.isfinite), ("positive at +inf", 0, math.inf, math.isfinite),
              ("positive at -inf", 0, -math.inf, lambda x: x == math.inf),
              ("negative at +inf", 2, math.inf, lambda x: x == math.inf), ("negative is NaN", 3, math.nan, math.isnan)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, in the interpreter
@pytest.mark.parametrize("what,at,value,pair_loss_is", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_contrastive_kernels_on_non_finite_rewards_agree_with_torch(what, at, value, pair_loss_is):
    """A candidate beaten or beating by an infinite margin: the pair's loss is 0 or +inf and its
    gradient 0 or -1/+1, as torch's softplus gives; InfoNCE's loss is finite where the infinity only
    removes a term and NaN where it makes a margin infinite (inf - inf), as torch's. A NaN reward
    reaches both losses. The kernels match torch in every value, count and gradient; what is not
    finite the training loop's non-finite check stops on."""
    rewards = torch.tensor([0.5, -0.25, 1.5, 0.0])
    rewards[at] = value
    pos, neg = torch.zeros(3, dtype=torch.int64), torch.arange(1, 4)
    for kernel, ref in ((cl.pairwise_loss, pairwise_sums), (cl.infonce_loss, infonce_sums)):
        got_r, want_r = rewards.clone().requires_grad_(), rewards.clone().requires_grad_()
        got, want = kernel(got_r, pos, neg), ref(want_r, pos, neg)
        got[0].backward()
        want[0].backward()
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{kernel.__name__}: {m}")
        torch.testing.assert_close(got_r.grad, want_r.grad, equal_nan=True, msg=lambda m: f"{kernel.__name__}: {m}")
    assert pair_loss_is(pairwise_sums(rewards, pos, neg)[0].item())
