"""engine._C readout_forward / readout_backward against the torch reference (float64, autograd)."""
import numpy as np
import pytest
import torch

from engine import _C
from engine.model.readout import torch_reward_readout


def _inputs(rng, s, b, h, n, repeats=False, scale=1.0):
    hidden = (rng.standard_normal((s, b, h)) * scale).astype(np.float32)
    if repeats:
        index = rng.integers(0, s * b, size=n).astype(np.int64)
        index[: n // 2] = index[n // 2 : 2 * (n // 2)]  # make sure some entries repeat
    else:
        index = rng.permutation(s * b)[:n].astype(np.int64)
    norm_w = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    head_w = (rng.standard_normal(h) / np.sqrt(h)).astype(np.float32)
    grad_r = rng.standard_normal(n).astype(np.float32)
    return hidden, index, norm_w, head_w, grad_r


def _reference(hidden, index, norm_w, head_w, eps, grad_r):
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (hidden, norm_w, head_w)]
    r = _torch_readout_f64(t[0], torch.from_numpy(index), t[1], t[2], eps)
    assert r.dtype == torch.float64
    r.backward(torch.from_numpy(grad_r).double())
    return r.detach().numpy(), *(x.grad.numpy() for x in t)


def _torch_readout_f64(hidden, reward_index, norm_weight, head_weight, eps):
    # torch_reward_readout calls .float() on every input; Tensor.float is looked up on the class, so
    # run it on a float64 subclass whose .float() keeps float64.
    class F64(torch.Tensor):
        def float(self, *a, **k):  # noqa: A003
            return self

    out = torch_reward_readout(*(x.as_subclass(F64) if x.is_floating_point() else x
                                 for x in (hidden, reward_index, norm_weight, head_weight)), eps)
    return out.as_subclass(torch.Tensor)


def _close(actual, expected, rtol=1e-5, atol_scale=1e-5):
    # fp32 results against a float64 reference: entries near zero come from cancellation, so the
    # absolute tolerance is relative to the largest magnitude in the array.
    atol = atol_scale * float(np.abs(expected).max(initial=0.0)) + 1e-30
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("s,b,h,n,repeats", [
    (16, 4, 64, 20, False),
    (32, 2, 128, 40, True),
    (7, 3, 33, 21, True),   # odd h, every row gathered at least once on average
    (5, 1, 8, 1, False),
])
# eps = 1: as large as mean(x^2) here (~1), where 1e-6 moves nothing at fp32
@pytest.mark.parametrize("eps", [1e-6, 1.0])
def test_matches_torch_reference(s, b, h, n, repeats, eps):
    rng = np.random.default_rng(s * 1000 + h)
    hidden, index, norm_w, head_w, grad_r = _inputs(rng, s, b, h, n, repeats)
    r_ref, gh_ref, gn_ref, gw_ref = _reference(hidden, index, norm_w, head_w, eps, grad_r)

    r = _C.readout_forward(hidden, index, norm_w, head_w, eps)
    assert r.dtype == np.float32 and r.shape == (n,)
    _close(r, r_ref)

    gh, gn, gw = _C.readout_backward(hidden, index, norm_w, head_w, eps, grad_r)
    assert gh.shape == hidden.shape and gh.dtype == np.float32
    _close(gh, gh_ref)
    _close(gn, gn_ref)
    _close(gw, gw_ref)
    # rows never gathered get exactly zero
    untouched = np.ones(s * b, dtype=bool)
    untouched[index] = False
    flat_rows = gh.transpose(1, 0, 2).reshape(s * b, h)  # row bi*s + t
    assert not flat_rows[untouched].any()


def test_large_and_tiny_activations():
    rng = np.random.default_rng(1)
    for scale in (1e-3, 1e3):
        hidden, index, norm_w, head_w, grad_r = _inputs(rng, 8, 4, 256, 12, True, scale)
        r_ref, gh_ref, gn_ref, gw_ref = _reference(hidden, index, norm_w, head_w, 1e-5, grad_r)
        _close(_C.readout_forward(hidden, index, norm_w, head_w, 1e-5), r_ref)
        for a, e in zip(_C.readout_backward(hidden, index, norm_w, head_w, 1e-5, grad_r),
                        (gh_ref, gn_ref, gw_ref)):
            _close(a, e)


def test_empty_index():
    hidden = np.ones((4, 2, 8), np.float32)
    w = np.ones(8, np.float32)
    idx = np.zeros(0, np.int64)
    assert _C.readout_forward(hidden, idx, w, w, 1e-6).shape == (0,)
    gh, gn, gw = _C.readout_backward(hidden, idx, w, w, 1e-6, np.zeros(0, np.float32))
    assert not gh.any() and not gn.any() and not gw.any()


@pytest.mark.parametrize("bad", [-1, 4 * 2])
def test_out_of_range_index(bad):
    hidden = np.ones((4, 2, 8), np.float32)
    w = np.ones(8, np.float32)
    idx = np.array([0, 3, bad], np.int64)
    with pytest.raises(ValueError, match=rf"readout_forward: reward_index\[2\] = {bad} .*\[0, 8\)"):
        _C.readout_forward(hidden, idx, w, w, 1e-6)
    with pytest.raises(ValueError, match=rf"readout_backward: reward_index\[2\] = {bad}"):
        _C.readout_backward(hidden, idx, w, w, 1e-6, np.ones(3, np.float32))


def test_input_checks():
    hidden = np.ones((4, 2, 8), np.float32)
    w = np.ones(8, np.float32)
    idx = np.array([0, 1], np.int64)
    with pytest.raises(TypeError, match="hidden must have dtype float32"):
        _C.readout_forward(hidden.astype(np.float64), idx, w, w, 1e-6)
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        _C.readout_forward(hidden[0], idx, w, w, 1e-6)
    with pytest.raises(ValueError, match="hidden must be C-contiguous"):
        _C.readout_forward(np.ones((2, 4, 8), np.float32).transpose(1, 0, 2), idx, w, w, 1e-6)
    with pytest.raises(TypeError, match="reward_index must have dtype int64"):
        _C.readout_forward(hidden, idx.astype(np.int32), w, w, 1e-6)
    # np.longlong is int64 too (another dtype object than np.int64; see test_packer)
    np.testing.assert_array_equal(_C.readout_forward(hidden, idx.astype(np.longlong), w, w, 1e-6),
                                  _C.readout_forward(hidden, idx, w, w, 1e-6))
    with pytest.raises(TypeError, match="hidden must have dtype float32, got >f4"):
        _C.readout_forward(hidden.astype(">f4"), idx, w, w, 1e-6)
    with pytest.raises(ValueError, match="head_weight has 7 entries but hidden has h = 8"):
        _C.readout_forward(hidden, idx, w, w[:7], 1e-6)
    with pytest.raises(TypeError, match="numpy array"):
        _C.readout_forward(torch.ones(4, 2, 8), idx, w, w, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        _C.readout_forward(hidden, idx, w, w, -1.0)
    with pytest.raises(ValueError, match="grad_rewards has 3 entries but reward_index has 2"):
        _C.readout_backward(hidden, idx, w, w, 1e-6, np.ones(3, np.float32))
