"""Which whole groups go into which packed sequence: the C++ packer (engine._C) over group lengths.

Without torch (numpy and the pybind11 packer only), so `polar data build`'s worker processes, which
only plan, start in a fraction of a second and without torch's ~250 MB each; engine.packing
re-exports plan_sequences beside collate, which lays the planned sequences out as tensors.
"""
from __future__ import annotations

import numpy as np

_PACKERS = {"best_fit": "pack_best_fit", "ordered": "pack_first_fit_ordered"}


def _native():
    try:
        from engine import _C
    except ImportError as exc:
        raise ImportError(
            "engine._C, the C++ packer, is not built: run `pip install -e .` in the repository root "
            "(or `python setup.py build_ext --inplace`)"
        ) from exc
    return _C


def plan_sequences(groups_lengths: np.ndarray, seq_length: int, method: str = "best_fit") -> list[np.ndarray]:
    """Group indices (int64, ascending) of each packed sequence of at most `seq_length` tokens.

    method: "best_fit" (best-fit decreasing, fewest sequences; for training data packed once) or
    "ordered" (keeps the input order, starts a new sequence when the next group does not fit: a
    data.packing / --packing choice for data whose order matters). Deterministic for a given input. A group longer than seq_length
    raises ValueError naming it.
    """
    if method not in _PACKERS:
        raise ValueError(f"data.packing={method!r}: expected one of {', '.join(_PACKERS)}")
    lengths = np.asarray(groups_lengths)
    if lengths.ndim != 1 or (lengths.size and not np.issubdtype(lengths.dtype, np.integer)):
        raise TypeError(f"groups_lengths must be a 1-D integer array, got {lengths.dtype} with shape {lengths.shape}")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    bins = getattr(_native(), _PACKERS[method])(lengths, int(seq_length))
    if bins.size == 0:
        return []
    # A stable sort by sequence id keeps each sequence's groups in input order.
    order = np.argsort(bins, kind="stable")
    return np.split(order, np.cumsum(np.bincount(bins))[:-1])
