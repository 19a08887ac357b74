"""polar.input_fingerprint: an input's fingerprint is its whole bytes when small, else sampled blocks
(about 1 MiB read per input, whatever its size), and tells apart an input whose lines were reordered."""
from __future__ import annotations

import hashlib

import numpy as np

from polar.input_fingerprint import BLOCK, SAMPLES, block_offsets, fingerprint


def le8(n: int) -> bytes:
    return n.to_bytes(8, "little")


def test_a_small_input_is_hashed_whole(tmp_path):
    p = tmp_path / "small.jsonl"
    data = b'{"a": 1}\n' * 1000
    p.write_bytes(data + b"appended after the count\n")
    assert block_offsets(len(data)) == [0]
    assert fingerprint(str(p), len(data)) == hashlib.sha256(le8(len(data)) + le8(0) + data).hexdigest()


def test_a_large_input_is_sampled_and_its_lines_reordered_are_told_apart(tmp_path):
    rng = np.random.default_rng(0)
    lines = [b'{"i": %d, "x": "%s"}\n' % (i, b"y" * int(rng.integers(50, 400))) for i in range(12000)]
    p = tmp_path / "big.jsonl"
    p.write_bytes(b"".join(lines))
    size = p.stat().st_size
    assert size > (SAMPLES + 2) * BLOCK
    at = block_offsets(size)
    assert len(at) == SAMPLES + 2 and at[0] == 0 and at[-1] == size - BLOCK
    assert all(b - a >= BLOCK for a, b in zip(at, at[1:]))  # evenly spaced, none overlapping
    expected = hashlib.sha256(le8(size))
    with open(p, "rb") as f:
        for a in at:
            f.seek(a)
            expected.update(le8(a) + f.read(BLOCK))
    first = fingerprint(str(p), size)
    assert first == expected.hexdigest()
    # a byte between two samples is not read (the cost is the samples', not the input's)
    gap = at[1] + BLOCK + 10
    data = bytearray(p.read_bytes())
    data[gap] = ord("z")
    p.write_bytes(bytes(data))
    assert fingerprint(str(p), size) == first
    # the lines shuffled: the same size and line count, another fingerprint
    order = rng.permutation(len(lines))
    p.write_bytes(b"".join(lines[i] for i in order))
    assert p.stat().st_size == size and fingerprint(str(p), size) != first
