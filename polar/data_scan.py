"""`polar data scan`: the line counts of `polar data build`'s inputs, counted once for all its machines.

    polar data scan data/ --output scan/                          # one machine reads the inputs once
    polar data scan data/ --output scan/ --num-parts 8 --part 3   # or 8 machines each read an eighth
    polar data build data/ --scan scan/ --output ds/ --num-shards 100 --shard-index 7 ...

Which lines a shard of a build holds depends on the line count of every input (polar/data_chunks.py),
so each of the --num-shards machines of a build without a scan reads every input in full to count
them: 100 machines read the corpus 100 times. A scan reads it once, split over as many machines as
wanted (--num-parts N --part i: part i counts the i-th of N equal runs of the inputs' 4 MiB blocks,
taken in input order), and a build given it (--scan) reads only the blocks where its own chunks
begin. Its shards are byte for byte those of a build without a scan (the same lines, record ids
and build id).

SCAN is a directory; part i of N writes scan-{i:05d}-of-{N:05d}.json into it, holding the newlines
of each block it read (base64 of little-endian uint32) with the path, size and modification time of
the inputs it read them from, as it saw them, and a digest of every input's file name, size and
time, in order: a part's size is that of what it counted, not of the whole input list, which every
building machine would otherwise read N times over (at 10^5 inputs and 100 parts, 1 GB of JSON).
An empty input, which has no block, is listed by the part whose run holds the block after it (the
last part for those at the end), so that the parts together list every input. A build reads every
part there: it refuses parts that disagree (on the digest, the block size or N) or that miss one,
naming the files, and a scan whose inputs are not the build's (another list of files, or one
changed since: its size or its modification time), naming the input and what differs. Parts of
version 1, which listed every input in every part, are read as they are. An input changed in place
since the scan without a new size or time is still found where the blocks the build reads again do
not hold the lines the scan counted (InputChanged, as without a scan).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from engine.cli_types import ArgumentParser
from polar import data_chunks
from polar.data_chunks import LineCount, ScanProgress, amount_of, count_blocks, line_count
from polar.data_inputs import input_files, missing_dirs

FORMAT, VERSION = "polar data scan", 2
_READ = (1, 2)  # version 1 differs only in listing every input in every part
_PART = re.compile(r"scan-(\d{5})-of-(\d{5})\.json")
_AGAIN = "run `polar data scan` again on the build's inputs (nothing was built)"


class ScanError(ValueError):
    """A scan that cannot serve the build: unreadable, incomplete, or not of the build's inputs."""


def part_name(part: int, num_parts: int) -> str:
    return f"scan-{part:05d}-of-{num_parts:05d}.json"


def _stat(path: str) -> dict:
    st = os.stat(path)
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _when(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9).isoformat(sep=" ", timespec="microseconds")


def _seen(s: dict) -> tuple[str, int, int]:
    """What tells two scans' inputs apart: file name, size and time, not the path, since the machines
    of a split scan may mount the inputs elsewhere."""
    return os.path.basename(s["path"]), s["bytes"], s["mtime_ns"]


def inputs_digest(inputs: list[dict]) -> str:
    """What the parts of one scan share of its whole input list: each input's _seen, in order."""
    return hashlib.sha256(json.dumps(list(map(_seen, inputs))).encode()).hexdigest()


def part_blocks(sizes: list[int], block: int, num_parts: int, part: int) -> list[tuple[int, int, int]]:
    """The blocks part `part` of `num_parts` counts: (input, first block, stop block) for each input
    it reaches into. The inputs' blocks, in input order, are cut into num_parts runs of equal count.
    An empty input (no block) falls to the part whose run holds the block after it, or to the last
    part after the last block: (input, 0, 0) in exactly one part."""
    per_file = [-(-s // block) for s in sizes]
    total = sum(per_file)
    first, stop = part * total // num_parts, (part + 1) * total // num_parts
    last = part == num_parts - 1
    out, offset = [], 0
    for k, n in enumerate(per_file):
        a, b = max(first - offset, 0), min(stop - offset, n)
        if a < b:
            out.append((k, a, b))
        elif n == 0 and (first <= offset < stop or (offset == total and last)):
            out.append((k, 0, 0))
        offset += n
    return out


def scan(inputs: list[str], output: str, num_parts: int = 1, part: int = 0, quiet: bool = False) -> dict:
    """Count the newlines of part `part` of `num_parts` of the inputs' blocks; write them to
    OUTPUT/scan-PART-of-NUM_PARTS.json (replacing a part of that name) and return what was written."""
    if num_parts < 1:
        raise ValueError(f"--num-parts must be >= 1, got {num_parts}")
    if not 0 <= part < num_parts:
        raise ValueError(f"--part {part} is outside 0..{num_parts - 1} (--num-parts {num_parts})")
    files = input_files(inputs)
    missing_dirs(Path(output), "--output")  # a file there, found before the inputs are counted, not after
    block = data_chunks._SCAN_BLOCK
    seen = [_stat(f) for f in files]
    todo = part_blocks([s["bytes"] for s in seen], block, num_parts, part)
    total = sum(min(b * block, seen[k]["bytes"]) - a * block for k, a, b in todo)
    progress, start = ScanProgress(total, quiet), time.time()
    counted, newlines = [], 0
    for k, a, b in todo:
        size = seen[k]["bytes"]
        counts, last = count_blocks(files[k], size, a, b, block, progress, began="the scan began",
                                    changed="changed during the scan; nothing was written: scan again once it is "
                                            "complete")
        if _stat(files[k]) != seen[k]:  # a file being written: the build would refuse the scan's time for it
            raise ScanError(f"{files[k]}: changed while it was scanned (still being written?); nothing was written: "
                            "scan again once it is complete")
        counted.append({"input": k, **seen[k], "first_block": a, "newlines": _encode(counts),
                        "last_byte": last if b * block >= size else None})
        newlines += int(counts.sum())
    doc = {"format": FORMAT, "version": VERSION, "num_parts": num_parts, "part": part, "block": block,
           "num_inputs": len(seen), "inputs_digest": inputs_digest(seen), "blocks": counted}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / part_name(part, num_parts)
    # a build reading the directory meanwhile never sees half a part; a name of its own, as another
    # machine may be writing the same part (a retried job): one temporary file shared, the first
    # rename would publish the other's half-written part and the second find nothing to rename
    # (not mkstemp's, whose file only its owner may read: the build may run as another user)
    tmp = out / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x") as f:
            f.write(json.dumps(doc))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "files": len(files), "bytes": total, "all_bytes": sum(s["bytes"] for s in seen),
            "newlines": newlines, "elapsed_s": time.time() - start}


def _encode(counts: np.ndarray) -> str:
    return base64.b64encode(counts.astype("<u4").tobytes()).decode("ascii")


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<u4").astype(np.int64)


@dataclass
class Scan:
    """Every input's LineCount from a complete scan, and the file it came from (for messages)."""
    where: str
    counts: list[LineCount]

    def line_counts(self, files: list[str]) -> list[LineCount]:
        """The counts for a build of `files` (as its machine names them: the scan's paths may be another
        machine's mount of the same files, so inputs match by position, file name, size and time).
        ScanError naming the first input that differs."""
        for k, (path, count) in enumerate(zip(files, self.counts)):
            if os.path.basename(path) != os.path.basename(count.path):
                raise ScanError(f"--scan {self.where} is not of this build's inputs: its input {k + 1} is "
                                f"{count.path}, the build's is {path}: {_AGAIN}")
        if len(files) != len(self.counts):
            extra = (f"the build's {files[len(self.counts)]} is not in it" if len(files) > len(self.counts) else
                     f"its {self.counts[len(files)].path} is not the build's")
            raise ScanError(f"--scan {self.where} counted {len(self.counts)} inputs, the build reads {len(files)} "
                            f"({extra}): {_AGAIN}")
        out = []
        for path, count in zip(files, self.counts):
            now = _stat(path)
            if (now["bytes"], now["mtime_ns"]) != (count.size, count.mtime_ns):
                raise ScanError(f"{path} changed since --scan {self.where} counted its lines: {_differs(now, count)}: "
                                f"{_AGAIN}")
            out.append(LineCount(str(path), count.size, count.lines, count.newlines, count.block))
        return out


def _differs(now: dict, count) -> str:
    said = []
    if now["bytes"] != count.size:
        said.append(f"{now['bytes']:,} bytes now, {count.size:,} in the scan")
    if now["mtime_ns"] != count.mtime_ns:
        said.append(f"modified {_when(now['mtime_ns'])} now, {_when(count.mtime_ns)} in the scan")
    return "; ".join(said)


@dataclass
class _Counted(LineCount):
    mtime_ns: int = 0


def _read_part(path: Path) -> dict:
    """A part, with `listed`: the inputs it names, by position (version 1: every input)."""
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} part")
        if doc.get("version") not in _READ:
            raise ValueError(f"version {doc.get('version')!r}, where this polar reads versions "
                             f"{', '.join(map(str, _READ))}")
        for key in ("num_parts", "part", "block", "blocks") + (("inputs",) if doc["version"] == 1 else
                                                               ("num_inputs", "inputs_digest")):
            if key not in doc:
                raise ValueError(f"no {key!r}")
        if doc["version"] == 1:
            doc["listed"] = dict(enumerate(doc["inputs"]))
            doc["num_inputs"], doc["inputs_digest"] = len(doc["inputs"]), inputs_digest(doc["inputs"])
        else:
            doc["listed"] = {c["input"]: {"path": c["path"], "bytes": c["bytes"], "mtime_ns": c["mtime_ns"]}
                             for c in doc["blocks"]}
        return doc
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ScanError(f"{path}: {f'an entry without {e}' if isinstance(e, KeyError) else e}: {_AGAIN}") from None


def _parts_differ(a: dict, b: dict) -> str:
    """What two parts of a scan disagree on ("" when nothing); their inputs match by _seen."""
    for key, what in (("num_parts", "their number of parts"), ("block", "their block size")):
        if a[key] != b[key]:
            return f"{what} ({a[key]} and {b[key]})"
    if a["inputs_digest"] == b["inputs_digest"]:
        return ""
    for k in sorted(a["listed"].keys() & b["listed"].keys()):  # a file written between two parts' scans, most often
        x, y = a["listed"][k], b["listed"][k]
        if _seen(x) != _seen(y):
            said = [f"{s['path']} of {s['bytes']:,} bytes modified {_when(s['mtime_ns'])}" for s in (x, y)]
            return f"their input {k + 1}: {said[0]} and {said[1]}"
    if a["num_inputs"] != b["num_inputs"]:
        return f"their number of inputs ({a['num_inputs']} and {b['num_inputs']})"
    return (f"their inputs (digests {a['inputs_digest'][:12]} and {b['inputs_digest'][:12]}: another list or order "
            "of the same number of files, or a file written between their scans)")


def _inputs(where: str, parts: list[tuple[Path, dict]]) -> list[dict]:
    """Every input of the scan, from the parts that list it; ScanError for one no part lists (a part
    edited or written by something else), or a list that is not the one the parts' digest names."""
    doc0 = parts[0][1]
    inputs = [None] * doc0["num_inputs"]
    for p, doc in parts:
        for k, s in doc["listed"].items():
            if not (isinstance(k, int) and 0 <= k < len(inputs)):
                raise ScanError(f"{p}: its input {k!r} is not one of the scan's {len(inputs)}: {_AGAIN}")
            inputs[k] = inputs[k] or s
    absent = [k for k, s in enumerate(inputs) if s is None]
    if absent:
        raise ScanError(f"--scan {where}: no part lists its input {absent[0] + 1} of {len(inputs)} ({len(absent)} "
                        f"unlisted): {_AGAIN}")
    if inputs_digest(inputs) != doc0["inputs_digest"]:
        raise ScanError(f"--scan {where}: the inputs its parts list are not those of their digest: {_AGAIN}")
    return inputs


def load(where: str) -> Scan:
    """The scan in directory `where`: all its parts, merged into one LineCount an input. ScanError
    when a part is missing, unreadable, or of another scan (other inputs, sizes, times or N)."""
    directory = Path(where)
    if not directory.is_dir():
        if directory.exists():  # was "no such directory", of a file there
            raise ScanError(f"--scan {where}: a file, not the directory `polar data scan INPUTS --output DIR` makes")
        raise ScanError(f"--scan {where}: no such directory (`polar data scan INPUTS --output {where}` makes it)")
    paths = sorted(p for p in directory.iterdir() if _PART.fullmatch(p.name))
    if not paths:
        raise ScanError(f"--scan {where}: no scan-*-of-*.json part in it (`polar data scan INPUTS --output {where}` "
                        "writes them)")
    parts = [(p, _read_part(p)) for p in paths]
    first, doc0 = parts[0]
    for p, doc in parts[1:]:
        differ = _parts_differ(doc0, doc)
        if differ:
            raise ScanError(f"--scan {where} holds parts of two scans: {first.name} and {p.name} differ in {differ}: "
                            f"remove the older parts, or {_AGAIN}")
    n = doc0["num_parts"]
    missing = sorted(set(range(n)) - {doc["part"] for _, doc in parts})
    if missing:
        raise ScanError(f"--scan {where} lacks {len(missing)} of the {n} parts of its scan (--part "
                        f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}): run them, or wait "
                        "for them to finish")
    block, inputs = doc0["block"], _inputs(where, parts)
    per_file = [np.full(-(-s["bytes"] // block), -1, dtype=np.int64) for s in inputs]
    last = [10] * len(inputs)
    try:
        for p, doc in parts:
            for c in doc["blocks"]:
                k, a, counts = c["input"], c["first_block"], _decode(c["newlines"])
                into = per_file[k][a:a + len(counts)]
                if len(into) != len(counts) or (into >= 0).any() or (counts > block).any():
                    raise ValueError(f"its blocks {a}..{a + len(counts) - 1} of {inputs[k]['path']} are not the "
                                     "scan's to count")
                into[:] = counts
                if c["last_byte"] is not None:
                    last[k] = c["last_byte"]
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise ScanError(f"{p}: {e}: {_AGAIN}") from None
    for s, counts in zip(inputs, per_file):
        if (counts < 0).any():
            raise ScanError(f"--scan {where}: no part counted block {int(np.argmax(counts < 0))} of {s['path']}: "
                            f"{_AGAIN}")
    counted = []
    for s, counts, end in zip(inputs, per_file, last):
        c = line_count(s["path"], s["bytes"], counts, end, block)
        counted.append(_Counted(c.path, c.size, c.lines, c.newlines, c.block, s["mtime_ns"]))
    return Scan(str(where), counted)


def parse_args(argv):
    ap = ArgumentParser(prog="polar data scan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("inputs", nargs="+", help="JSONL files, or directories of *.jsonl, as given to `polar data build`")
    ap.add_argument("--output", "-o", required=True,
                    help="the scan's directory (created), given to `polar data build --scan`")
    ap.add_argument("--num-parts", type=int, default=1, help="machines sharing the scan (default 1)")
    ap.add_argument("--part", type=int, default=0, help="this machine's part, 0..num_parts-1")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        done = scan(args.inputs, args.output, args.num_parts, args.part, args.quiet)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = max(done["elapsed_s"], 1e-9)
    print(f"wrote {done['path']}: part {args.part} of {args.num_parts}, {amount_of(done['bytes'], done['all_bytes'])} "
          f"of {done['files']} input{'s' if done['files'] != 1 else ''}, "
          f"{done['newlines']:,} line ends, {dt:.1f}s ({done['bytes'] / dt / 1e6:,.0f} MB/s)")
    if args.num_parts > 1:
        print(f"  `polar data build --scan {args.output}` reads it once all {args.num_parts} parts are there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
