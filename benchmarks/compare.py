"""How far a benchmarked implementation's results are from its reference's, checked before it is
timed: a kernel that computes something else must not show as a speed-up."""
import math

import torch

# of the reference's largest magnitude, for bf16 kernels: bf16 rounding (2^-8 relative) and another summation order
# stay well below it, a kernel that drops or misplaces a term does not
BF16_TOLERANCE = 0.05


def rel_diff(want, got) -> float:
    """The largest, over the pairs of two lists of tensors or arrays, of the largest elementwise
    difference (in float64) over the largest magnitude in that result of `want`; the bare difference
    where it is all zero; NaN where either holds a NaN (max() would drop it: a NaN gradient passed).
    Each result against its own magnitude: over the largest of all of them (a readout's rewards, sums
    over the hidden size, are ~30x its hidden gradient) a gradient half of the reference's passed a
    5% check."""
    worst = 0.0
    with torch.no_grad():
        for w, g in zip(want, got, strict=True):
            w, g = torch.as_tensor(w).detach().double(), torch.as_tensor(g).detach().double()
            if not w.numel():
                continue
            diff, scale = float((w - g).abs().max()), float(w.abs().max())
            r = diff / scale if scale else diff
            if math.isnan(r):
                return math.nan
            worst = max(worst, r)
    return worst
