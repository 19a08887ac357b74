"""How far a benchmarked implementation's results are from its reference's, checked before it is
timed: a kernel that computes something else must not show as a speed-up."""
import torch


def rel_diff(want, got) -> float:
    """The largest elementwise difference between two lists of tensors or arrays (pairwise, in
    float64) over the largest magnitude in `want`; the bare difference where `want` is all zero."""
    with torch.no_grad():
        want = [torch.as_tensor(w).detach().double() for w in want]
        got = [torch.as_tensor(g).detach().double() for g in got]
        diff = max(float((w - g).abs().max()) if w.numel() else 0.0 for w, g in zip(want, got, strict=True))
        scale = max(float(w.abs().max()) if w.numel() else 0.0 for w in want)
    return diff / scale if scale else diff
