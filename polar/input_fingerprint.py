"""Input fingerprints: which bytes the inputs of a `polar data build` held, told apart without reading them.

The build id (polar/data_build.py) knows each input by its name, size and line count, the same for an input
regenerated with other content of those (its lines reordered: a shuffle run again under another seed). The N
shards of a build are built apart (a job array), so a job array run again after some shards failed built the
missing ones from the new bytes beside those built from the old: one dataset, some records twice and others never.
Each shard now records every input's fingerprint in its metadata (`sources[i]["sample_sha256"]`, an opaque field
to engine/, outside the build id: shards built before it stay extendable), and a build that writes a shard beside
shards of its build compares theirs with its own (check_beside).

A fingerprint is the sha256 of SAMPLES + 2 blocks of BLOCK bytes, the first, the last and SAMPLES evenly spaced
between, each prefixed by its offset; an input of at most that many bytes is hashed whole. A machine reads at
most 1.1 MiB of each input for it, whatever its size (inputs are terabytes; a shard's machine reads 1/N of them,
or with a `polar data scan` not every input at all). A rewrite that moves every line (a reshuffle) changes
every block; one that changes only bytes between the samples is not seen here, and the kept-shard check
(data_build._read_digest, its own chunks' bytes read whole) is the one that finds it for a shard run again.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from engine.build_sets import shard_builds
from polar.data_inputs import names

BLOCK = 1 << 16
SAMPLES = 16
FIELD = "sample_sha256"


def block_offsets(size: int, block: int = BLOCK, samples: int = SAMPLES) -> list[int]:
    """Where the sampled blocks start: [0] (the whole file, one read) for a file of at most
    (samples + 2) * block bytes, else the first block, `samples` evenly spaced, and the last."""
    if size <= (samples + 2) * block:
        return [0]
    last = size - block
    return sorted({0, last, *(last * (k + 1) // (samples + 1) for k in range(samples))})


def fingerprint(path: str, size: int, block: int = BLOCK, samples: int = SAMPLES) -> str:
    """The fingerprint of `path`'s first `size` bytes (the size its lines were counted at). An input cut
    shorter since is hashed as it is: the chunk reads of the build stop on it, naming the first line lost
    (polar.data_chunks.InputChanged)."""
    offsets = block_offsets(size, block, samples)
    length = size if offsets == [0] else block
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for at in offsets:
            f.seek(at)
            h.update(at.to_bytes(8, "little"))
            h.update(f.read(length))
    return h.hexdigest()


def with_fingerprints(sources: list[dict]) -> list[dict]:
    """The build's sources entries (polar.data_chunks.plan_chunks), each with its input's fingerprint."""
    return [{**s, FIELD: fingerprint(s["path"], s["bytes"])} for s in sources]


def _beside(directory: Path, name: Path, build_id: str) -> list[tuple[str, dict]]:
    """The shards of build `build_id` in `directory` other than `name` (the one being written), with their
    metadata."""
    return [(shard, meta) for shard, meta, build in shard_builds(directory) if build == build_id and shard != name.name]


def check_beside(directory: Path, name: Path, build_id: str, sources: list[dict]) -> str | None:
    """FileExistsError naming the inputs and the shards if a shard of build `build_id` in `directory` was
    built from other bytes of an input than `sources` (with_fingerprints) hold now; else a note naming the
    shards that record no fingerprint (built before they were recorded), which cannot be checked, or None.
    The same build id means the same inputs by name, size and lines, in the same order: compared by index."""
    differ, shards, unchecked = [], [], []
    for shard, meta in _beside(directory, name, build_id):
        theirs = meta.get("sources")
        if not isinstance(theirs, list) or len(theirs) != len(sources) or not all(
                isinstance(s, dict) and isinstance(s.get(FIELD), str) for s in theirs):
            unchecked.append(shard)
            continue
        other = [mine["path"] for mine, s in zip(sources, theirs) if s[FIELD] != mine[FIELD]]
        if other:
            shards.append(shard)
            differ += [p for p in other if p not in differ]
    if differ:
        n = len(differ)
        raise FileExistsError(
            f"{directory} holds shards of this build built from other bytes of {names(differ, 3)} than "
            f"{'it holds' if n == 1 else 'they hold'} now ({names(shards, 5)}): {'an input' if n == 1 else 'inputs'} "
            "rewritten since with the same name, size and line count (its lines reordered?), which a shard "
            "built now beside them would read as one dataset with some records twice and others never: restore "
            f"the input{'s' * (n > 1)} as {'it was' if n == 1 else 'they were'} and build this shard again, or "
            "remove those shards and build every shard again (or build into another directory)")
    if unchecked:
        return (f"{names(unchecked, 5)} in {directory}, of this build, record no input fingerprints (built before "
                f"they were recorded): whether they were built from the bytes the inputs hold now cannot be checked")
    return None
