"""Build sets: the shards one `polar data build` split over N machines, checked complete in a
dataset directory.

A builder that splits one dataset over N shards (machines) names the build set in each shard's
metadata: `build = {"id": str, "shard_index": i, "num_shards": N, "inputs": str}` (`inputs`
identifies the records read). A directory must hold every shard of each build set exactly once,
and no two build sets of the same inputs: a missing shard would silently lose its records, and a
leftover of an earlier build (another --num-shards, say) would read them twice. Shards without
`build` (other writers) are not checked.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.shard_format import DatasetFormatError

# The ids the data was written with. Not the tokenizer's name: it is a path on the machine that
# built the shard, and shards built elsewhere from the same tokenizer name it differently.
AGREED = ("vocab_size", "pad_id", "bos_id")
# Compared where both shards record them (shards written before a key was recorded lack it): the
# tokenizer's content digest, the same on every machine, and its reward tokens' ids. Two tokenizers of
# one size with the same special ids (two BPEs trained apart) passed AGREED, and a directory holding a
# build of each trained on two meanings of every id.
AGREED_WHERE_RECORDED = ("tokenizer_digest", "reward_sep_id", "reward_token_id")


def ids_disagreement(a: dict, b: dict):
    """(key, a's value, b's value) of the first of AGREED, then of AGREED_WHERE_RECORDED where both record it,
    on which two datasets' metadata differ (their ids would mean other tokens); None where they agree."""
    recorded = [k for k in AGREED_WHERE_RECORDED if k in a and k in b]
    return next(((k, a.get(k), b.get(k)) for k in (*AGREED, *recorded) if a.get(k) != b.get(k)), None)


def build_of(name: Path, meta: dict):
    b = meta.get("build")
    if b is None:
        return None
    ok = (isinstance(b, dict) and isinstance(b.get("id"), str) and isinstance(b.get("inputs"), str)
          and all(type(b.get(k)) is int for k in ("shard_index", "num_shards"))
          and 0 <= b["shard_index"] < b["num_shards"])
    if not ok:
        raise DatasetFormatError(f"{name}.json: build must be {{id, shard_index, num_shards, inputs}} with "
                                 f"0 <= shard_index < num_shards, got {b!r:.200}")
    return b


def check_build_sets(directory: Path, shards: list[tuple[Path, dict]]) -> None:
    """DatasetFormatError naming the directory and the files unless every build set among the
    (shard name, metadata) pairs is complete, has no shard twice, and no two share their inputs."""
    sets: dict[str, dict] = {}
    for name, meta in shards:
        b = build_of(name, meta)
        if b is not None:
            s = sets.setdefault(b["id"], {"n": b["num_shards"], "inputs": b["inputs"], "at": {}})
            if (b["num_shards"], b["inputs"]) != (s["n"], s["inputs"]):
                raise DatasetFormatError(f"{name}.json: build {b['id']} has num_shards {b['num_shards']} and inputs "
                                         f"{b['inputs']}, other shards of it {s['n']} and {s['inputs']}")
            s["at"].setdefault(b["shard_index"], []).append(name.name)
    problems, by_inputs = [], {}
    for bid, s in sets.items():
        n, at = s["n"], s["at"]
        present = ", ".join(sorted(x for names in at.values() for x in names))
        for i, names in sorted(at.items()):
            if len(names) > 1:
                problems.append(f"shard {i} of {n} of build {bid} is there {len(names)} times ({', '.join(names)})")
        missing = [i for i in range(n) if i not in at]
        if missing:
            # Builders name shards part-IIIII-of-NNNNN: the missing names follow from a present one.
            j, name = next((j, names[0]) for j, names in at.items())
            tag = f"{j:05d}-of-{n:05d}"
            names = [name.replace(tag, f"{i:05d}-of-{n:05d}") if tag in name else f"shard {i}" for i in missing]
            # a shard whose metadata was lost is there but not known as this build's
            hint = ", ".join(m + (" (its .idx is there, its .json metadata is missing)"
                                  if (directory / f"{m}.idx").is_file() and not (directory / f"{m}.json").is_file()
                                  else "") for m in names)
            problems.append(f"build {bid} of {n} shards lacks {len(missing)} ({hint}; present: {present})")
        by_inputs.setdefault(s["inputs"], []).append(f"build {bid} ({present})")
    for builds in by_inputs.values():
        if len(builds) > 1:
            problems.append(f"the same inputs were built more than once, their records would be read "
                            f"{len(builds)} times: {'; '.join(builds)} (leftovers of an earlier build?)")
    if problems:
        raise DatasetFormatError(f"{directory}: " + "; ".join(problems))


def shard_builds(directory: Path) -> list[tuple[str, dict, str | None]]:
    """(name, metadata, build id) of each complete shard in `directory`, in name order; {} and None
    for metadata that cannot be read or names no build."""
    out = []
    for idx in sorted(Path(directory).glob("*.idx")):
        try:
            meta = json.loads(idx.with_suffix(".json").read_text())
        except (OSError, ValueError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        b = meta.get("build")
        out.append((idx.stem, meta, b.get("id") if isinstance(b, dict) else None))
    return out


def foreign_shards(directory: Path, build_id: str) -> list[str]:
    """Names of the complete shards in `directory` that are not of build `build_id`."""
    return [name for name, _, build in shard_builds(directory) if build != build_id]
