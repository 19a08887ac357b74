"""`polar data build`: JSONL records -> tokenized shared-prefix groups -> packed shard on disk.

    polar data build data/*.jsonl --output ds/ --tokenizer byte --seq-length 16384 --workers 8
    polar data build data/ --output ds/ --num-shards 4 --shard-index 2     # one machine of four
    polar data build data/ --output ds/ --num-shards 4 --shard-index 2 --scan scan/  # lines counted once

Records (polar/records.py) are tokenized with POLAR's format (polar/format.py: the record's wrapper,
else --wrapper; truncation to --max-length, default the pack length, and --max-response, counted
and reported), each becomes one group (shared prefix + K candidates), and groups are packed whole into sequences of
--seq-length tokens by the C++ packer. POLAR's truncation bounds each candidate's input, not the
group: when the prompt, the reference and all K candidates together exceed --seq-length, the
prompt keeps a shorter tail so that the group fits (counted and reported as "prompts shortened to
fit the pack"); a group that does not fit even without its prompt is rejected. A record repeating
an earlier one of the shard is kept, counted and named (polar/build_repeats.py). The result is one
shard of a packed dataset directory (engine/shard_format.py): NAME.bin (tokens), NAME.idx (index), NAME.json
(metadata: tokenizer, special ids, counts, sources), NAME.rejects.jsonl (bad records and groups
too long to pack, if any). A build that makes no group at all (an empty input, every record
rejected) is an error that writes no shard; one shard of several (--num-shards) is written all
the same, with a note. Which rejects list a build writes, and what a rebuild (--force) does with
the list of the shard it replaces, is polar/build_rejects.py's; a SIGTERM stop, polar/build_stop.py's.
A shard already there is kept when it is this build's (the same command run again: a job array
resubmitted after some of its shards failed) and its chunks' input bytes are the ones it was built
from (read again, not parsed), else refused unless --force.

Determinism: the input lines (files in the order given, directories as their sorted *.jsonl in any
case; their other files are named on stderr, not read) are cut into chunks of --chunk-records
lines, each parsed, tokenized and packed on its own (packing reaches across records of one chunk
only: polar/build_workers.py) and written in chunk order, so the output is the same for any --workers.
--num-shards N splits the chunks into N contiguous runs; shard i writes `part-{i:05d}-of-{N:05d}`,
and the directory holding all N shards reads as exactly the dataset one machine would have built.
Which lines each shard builds, and how a machine finds them without holding every line's offset,
is polar/data_chunks.py's. Each machine counts the lines of every input to find them, unless given
--scan, the counts of a `polar data scan` made once for all machines (polar/data_scan.py).
The shards of one build carry a build id (a hash of the settings and of the inputs' names, sizes
and line counts); the builder refuses an output directory holding shards of any other build, and
the reader refuses a directory that lacks a shard of a build, holds one twice or holds two builds
of the same inputs. An input rewritten with the same name, size and line count (a reshuffle) is
the same build id: each shard also records every input's fingerprint (sampled blocks, about 1 MiB
read per input: polar/input_fingerprint.py), and a shard is not written beside shards of its build
built from other bytes of an input (the inputs and shards are named: restore the input, or remove
those shards and build every shard again). Shards that record no fingerprint (built before they
were recorded) cannot be checked: a shard is written beside them with a note. To concatenate
datasets, copy their shard files into one directory under names that sort in the order wanted
(see engine/shard_format.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from engine.cli_types import ArgumentParser
from engine.stop_signal import EXIT_SIGTERM
from polar import data_scan
from polar.build_repeats import Repeats, summary_line
from polar.build_rejects import check_rejects_path, rejects_in_place, replaced_rejects, same_file
from polar.build_stop import SigtermStops, Terminated
from polar.build_workers import BuildConfig, ChunkResult, WorkerDied, run_inline, run_pool
from polar.data_chunks import plan_chunks
from polar.data_inputs import input_files, missing_dirs, names
from polar.input_fingerprint import check_beside, with_fingerprints
from polar.records import ON_ERROR, RecordError


class _Progress:
    def __init__(self, total_bytes: int, quiet: bool, interval: float = 2.0):
        self.total, self.quiet, self.interval = total_bytes, quiet, interval
        self.start = self.last = time.time()
        self.bytes = self.records = self.tokens = 0

    def update(self, res: ChunkResult) -> None:
        self.bytes += res.bytes
        self.records += res.lines - res.blank
        self.tokens += res.tokens
        now = time.time()
        if self.quiet or now - self.last < self.interval:
            return
        self.last = now
        dt = now - self.start
        eta = dt * (self.total - self.bytes) / max(self.bytes, 1)
        print(f"  {self.records:,} records ({self.bytes / max(self.total, 1):.0%}) | {self.records / dt:,.0f} "
              f"records/s | {self.tokens / dt / 1e6:.2f}M tokens/s | ETA {eta:.0f}s", file=sys.stderr, flush=True)


def _tokenizer_dir(spec: str) -> str:
    """The tokenizer as the metadata records it: "byte", or the absolute directory of tokenizer.json,
    so that a run reading the data from any working directory finds it (polar.checkpoint_tokenizer)."""
    if spec == "byte":
        return spec
    p = Path(spec).resolve()
    return str(p.parent if p.is_file() else p)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_digest(tok) -> str:
    """The tokenizer as the build id knows it, the same on every machine: "byte", or a digest of its
    tokenizer.json's bytes and reward tokens' texts. Its size and special ids alone were one build for
    another version of a tokenizer that keeps them and moves other ids, so a job array run again with
    it kept the shards of the old (nothing rebuilt, rc 0) and built the rest with the new."""
    path = getattr(tok, "path", None)
    if path is None:
        return "byte"
    h = hashlib.sha256(Path(path).read_bytes())
    h.update(json.dumps([tok.reward_sep_text, tok.reward_token_text]).encode())
    return h.hexdigest()[:16]


def _read_digest(chunks, quiet: bool) -> str:
    """What a shard records of the input bytes it was built from (its metadata's input_sha256): the
    digest of its chunks' own, read again here without parsing. The build id knows the inputs by
    name, size and lines, the same for an input rewritten since (regenerated, its lines in another
    order), whose shards a build run again kept as its own, where a fresh build makes others."""
    from polar.data_chunks import ScanProgress

    progress = ScanProgress(chunks.bytes, quiet, what="checking the kept shard's input bytes")
    h = hashlib.sha256()
    for c in chunks:
        one = hashlib.sha256()
        with open(c.file, "rb") as f:
            f.seek(c.start)
            left = c.end - c.start
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    break
                one.update(block)
                left -= len(block)
                progress(len(block))
        h.update(one.digest())
    return h.hexdigest()


def _build_set(meta: dict, cfg: BuildConfig, vocab_size: int) -> dict:
    """The metadata that ties the N shards of one build together (engine/build_sets.py): the
    same on every machine running the same command. Inputs count by file name, size and lines,
    not by path, which may differ between machines; the tokenizer by its ids and tokenizer_digest
    (_tokenizer_digest), for the same reason.
    Not --on-error: a shard built under "fail" is the one "skip" builds of records none of which is
    bad, and a shard stopped by a bad record ("--on-error skip sets bad records aside", says the
    error) was refused when run again with skip, beside the shards built before it under fail."""
    inputs = _digest([(Path(s["path"]).name, s["bytes"], s["lines"]) for s in meta["sources"]])
    settings = {k: v for k, v in meta.items()
                if k not in ("tokenizer", "shard_index", "chunks", "sources", "on_error")}
    return {"id": _digest([settings, inputs, cfg.seq_length, vocab_size]), "shard_index": meta["shard_index"],
            "num_shards": meta["num_shards"], "inputs": inputs}


def build(inputs: list[str], output: str, cfg: BuildConfig, workers: int = 1, chunk_records: int = 8192,
          num_shards: int = 1, shard_index: int = 0, rejects_path: str = "", quiet: bool = False,
          force: bool = False, scan: str = "") -> dict:
    """Build one shard; returns its metadata (also written next to it). RecordError on a bad record
    with on_error="fail", after which nothing of the shard remains."""
    from engine.build_sets import foreign_shards
    from engine.shard_writer import ShardWriter
    from polar.format import TRUNCATION_RULE
    from polar.tokenizer import load_tokenizer

    if cfg.on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {cfg.on_error!r}")
    # Checked here, not left to the format: a bad setting would otherwise be blamed on every record
    # (--on-error skip sets them all aside) or fail in the index header after the tokens are written.
    # --num-shards 0 was "--shard-index 0 is outside 0..-1"; a negative --seed numpy's "expected
    # non-negative integer", once the inputs were counted and the first chunk tokenized.
    for flag, value, least in (("--seq-length", cfg.seq_length, 1), ("--max-length", cfg.max_length, 0),
                               ("--max-response", cfg.max_response, 1), ("--seed", cfg.seed, 0),
                               ("--workers", workers, 1), ("--chunk-records", chunk_records, 1),
                               ("--num-shards", num_shards, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
    files = input_files(inputs, output, rejects_path)
    tok = load_tokenizer(cfg.tokenizer)
    name = Path(output) / f"part-{shard_index:05d}-of-{num_shards:05d}"
    # Kept if it is this build's (known once the inputs are counted), else refused: a job array run
    # again after some of its shards failed (or a requeued job whose shard was done) ended 2,
    # "exists: remove the shard or pass --force", for every shard already built.
    existing = name.with_suffix(".idx").exists() and not force
    rejects_file = Path(rejects_path) if rejects_path else name.with_suffix(".rejects.jsonl")
    if rejects_file.is_dir():
        raise IsADirectoryError(f"--rejects {rejects_path} is a directory: it names the rejects list's file")
    # the rejects list this build may replace: its shard's own, or the one the shard it replaces names
    replaced, own = replaced_rejects(name) if force or existing else (None, "")
    check_rejects_path(rejects_file, rejects_path, replaced, own)
    # Both made by the build and removed again if it fails and leaves them empty. Found now, not as
    # the first reject is written (a --rejects directory not there: hours into a build, an errno),
    # nor before the inputs are counted.
    made = [missing_dirs(Path(output), "--output"), missing_dirs(rejects_file.parent, "--rejects")]
    # a scan's line counts, checked against the inputs now, spare this machine reading every input
    counts = data_scan.load(scan).line_counts(files) if scan else None
    mine, sources = plan_chunks(files, chunk_records, quiet, num_shards, shard_index, counts)

    meta = {
        "format": "polar shared-prefix groups", "truncation": TRUNCATION_RULE,
        "tokenizer": _tokenizer_dir(cfg.tokenizer), "tokenizer_digest": _tokenizer_digest(tok), "bos_id": tok.bos_id,
        "reward_sep_id": tok.reward_sep_id, "reward_token_id": tok.reward_token_id,
        "wrapper_default": cfg.wrapper, "max_length": cfg.max_length or cfg.seq_length,
        "max_response": cfg.max_response, "packing": cfg.packing, "seed": cfg.seed, "on_error": cfg.on_error,
        "chunk_records": chunk_records, "num_shards": num_shards, "shard_index": shard_index,
        "chunks": [mine.first, mine.stop] if len(mine) else [0, 0], "sources": sources,
    }
    meta["build"] = _build_set(meta, cfg, tok.vocab_size)
    if existing:
        kept = _shard_meta(name)
        if (kept.get("build") or {}).get("id") != meta["build"]["id"]:
            raise FileExistsError(f"{name}.idx exists, a shard of another build (other settings or inputs): "
                                  "remove the shard or pass --force")
        if kept.get("input_sha256") != _read_digest(mine, quiet):
            raise FileExistsError(f"{name}.idx exists, built from other bytes than its inputs' lines hold now (an "
                                  "input rewritten with the same name, size and line count, its lines reordered?): "
                                  "remove the shard or pass --force")
        return {**kept, "path": str(name), "kept": True}
    # The shard this build replaces (--force) is no leftover: its name is taken over whole.
    others = [o for o in foreign_shards(Path(output), meta["build"]["id"]) if not (force and o == name.name)]
    if others:
        raise FileExistsError(f"{output} holds shards of another build ({', '.join(others)}), which a reader "
                              "would mix with this one: remove them or build into another directory")
    # Not in the build id (the shards built before it would be another build): compared with this build's
    # shards beside, which would otherwise be read with this one if an input was rewritten since them.
    meta["sources"] = with_fingerprints(sources)
    unchecked = check_beside(Path(output), name, meta["build"]["id"], meta["sources"])
    if unchecked:
        print(f"note: {unchecked}", file=sys.stderr, flush=True)
    # Written under a temporary name and put in place with the shard, so that a failed rebuild
    # (--force) leaves the old shard with its own rejects.
    rejects_tmp = rejects_file.with_name(rejects_file.name + ".tmp")
    # The writer first: it stops a second run of this shard before its rejects list is touched.
    writer = ShardWriter(name, cfg.seq_length, tok.vocab_size, tok.pad_id, meta)
    rejects_tmp.unlink(missing_ok=True)
    progress = _Progress(mine.bytes, quiet)
    counts = dict(lines=0, blank=0, records=0, rejected=0, too_long=0, prompts_shortened=0, prompt_tokens_cut=0,
                  responses_cut=0, prompts_cut=0, groups=0, candidates=0, tokens=0)
    rejects_out, first_reject, results, digest, read = None, None, None, hashlib.sha256(), hashlib.sha256()
    repeats = Repeats(name.parent)  # its rows spilled beside the shard, as the writer's index
    with SigtermStops() as stop:
        try:
            rejects_file.parent.mkdir(parents=True, exist_ok=True)
            results = run_inline(cfg, mine) if workers == 1 else run_pool(cfg, mine, workers)
            for res in results:
                if res.arrays:
                    writer.add_sequences(**res.arrays)
                if res.rejects:
                    first_reject = first_reject or res.rejects[0]
                    rejects_out = rejects_out or open(rejects_tmp, "wb")
                    lines = "".join(json.dumps(r) + "\n" for r in res.rejects).encode()
                    digest.update(lines)
                    rejects_out.write(lines)
                counts["lines"] += res.lines
                counts["blank"] += res.blank
                counts["records"] += res.records
                counts["rejected"] += len(res.rejects)
                counts["too_long"] += res.too_long
                counts["prompts_shortened"] += res.prompts_shortened
                counts["prompt_tokens_cut"] += res.prompt_tokens_cut
                counts["responses_cut"] += res.responses_cut
                counts["prompts_cut"] += res.prompts_cut
                counts["groups"] += res.records
                counts["candidates"] += res.candidates
                counts["tokens"] += res.tokens
                repeats.add(res.record_ids, res.digests)
                read.update(res.read_sha256)
                progress.update(res)
            if rejects_out:
                rejects_out.close()
            # A shard of no group exited 0 and looked like a dataset; fine-tuning and evaluation stop on
            # such input ("no usable record"), so the build does too. One shard of several is written all
            # the same: the directory needs every shard, and the others may hold groups.
            if not counts["groups"] and num_shards == 1:
                old = force and name.with_suffix(".idx").exists()
                where = None
                if counts["rejected"]:
                    # kept to say why, but not under the name of the old shard's list, which stays with it
                    if old and (not rejects_path or same_file(rejects_file, replaced)):
                        where = f"not listed: {rejects_file} is the kept shard's; --rejects PATH lists them"
                    else:
                        os.replace(rejects_tmp, rejects_file)
                        where = f"listed with their reasons in {rejects_file}"
                raise ValueError(_no_group(files, counts, first_reject, where, old))
            counts["duplicates"], shown = repeats.find(sources)
            writer.meta["counts"] = {**counts, "sequences": writer.num_sequences}
            writer.meta["input_sha256"] = read.hexdigest()  # what a run of this command again checks to keep it
            writer.meta["duplicates_first"] = shown  # [record, the earlier one it repeats], file:line each
            # absolute: a rebuild (--force) run from another directory finds it the list it replaces
            writer.meta["rejects_file"] = os.path.abspath(rejects_file) if counts["rejected"] else None
            # what makes a list at that path this shard's (polar.build_rejects.replaced_rejects): another
            # build may write one there once this list is gone
            writer.meta["rejects_sha256"] = digest.hexdigest() if counts["rejected"] else None
            with_files, old_list = rejects_in_place(rejects_file, rejects_tmp, counts["rejected"], rejects_path,
                                                    replaced, own)
            writer.sync()
            # close() renames the new .json and .bin over the shard it replaces (--force) before the
            # .idx: a stop between them left a shard of two builds, said to be kept. Done, not stopped.
            stop.hold()
            try:
                meta = writer.close(with_files)
            except KeyboardInterrupt:
                if not writer.committed:
                    raise
                # Ctrl-C while the files were renamed, held back to their end: the build is done
                print(f"note: Ctrl-C came as {name} was put in place: it is whole, the build had finished",
                      file=sys.stderr, flush=True)
                meta = json.loads(name.with_suffix(".json").read_text())
        except BaseException:
            stop.hold()
            if results is not None:
                results.close()  # its workers killed, not left to finish their chunks
            if rejects_out:
                rejects_out.close()
            writer.abort()
            rejects_tmp.unlink(missing_ok=True)
            # a failed build into a new directory leaves none behind (one a listed reject is in stays)
            for chain in made:
                for d in chain:
                    try:
                        d.rmdir()
                    except OSError:
                        break
            raise
    if old_list:
        print(f"note: {old_list}", file=sys.stderr, flush=True)
    meta["elapsed_s"] = time.time() - progress.start
    meta["path"] = str(name)
    if not counts["groups"]:
        print(f"note: {name} holds no group ({counts['lines'] - counts['blank']:,} records read, "
              f"{counts['rejected']:,} rejected): shard {shard_index} of {num_shards} is written for the directory "
              "to be complete; training refuses a dataset whose shards hold none", file=sys.stderr, flush=True)
    return meta


def _shard_meta(name: Path) -> dict:
    """The metadata of the shard at `name`, {} where it cannot be read."""
    try:
        meta = json.loads(name.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _no_group(files: list[str], counts: dict, first_reject: dict | None, where: str | None, old: bool) -> str:
    read = counts["lines"] - counts["blank"]
    blank = f" and {counts['blank']:,} blank lines" if counts["blank"] else ""
    msg = f"no usable record in {names(files, 3)}: {read:,} records read{blank}"
    if counts["rejected"]:
        r = first_reject
        too_long = f", {counts['too_long']:,} of them too long to pack" if counts["too_long"] else ""
        msg += (f", {counts['rejected']:,} rejected{too_long}, the first {r['file']}:{r['line']}: {r['field']}: "
                f"{r['reason']} ({where})")
    return msg + ("; the shard was not replaced" if old else "; no shard was written")


def _summary(meta: dict, workers: int) -> str:
    c, L = meta["counts"], meta["seq_length"]
    dt = max(meta["elapsed_s"], 1e-9)
    eff = c["tokens"] / max(1, c["sequences"] * L)
    too_long = f" ({c['too_long']:,} too long to pack)" if c["too_long"] else ""
    rej = f", {c['rejected']:,} rejected{too_long} -> {meta['rejects_file']}" if c["rejected"] else ""
    # what POLAR's rule cut is reported too: a model never sees the end of a response cut to its head
    cut = [f"{c['responses_cut']:,} of {c['records'] + c['candidates']:,} responses (references and candidates) cut to "
           f"their first {meta['max_response']} ids, BOS counted ({max(meta['max_response'] - 1, 0)} tokens of text)"
           if c["responses_cut"] else "",
           f"{c['prompts_cut']:,} prompts to their last tokens within max_length {meta['max_length']}"
           if c["prompts_cut"] else "",
           f"{c['prompts_shortened']:,} prompts shortened to fit the pack ({c['prompt_tokens_cut']:,} tokens beyond "
           "POLAR's rule)" if c["prompts_shortened"] else ""]
    cut = f"\n  truncation {'; '.join(x for x in cut if x)}" if any(cut) else ""
    records = c["lines"] - c["blank"]
    blank = f" ({c['blank']:,} blank lines skipped)" if c["blank"] else ""
    dup = summary_line(c["duplicates"], meta["duplicates_first"], meta["num_shards"])
    return "\n".join([
        f"wrote {meta['path']}.{{bin,idx,json}}",
        f"  records    {records:,}{blank}: {c['records']:,} groups{rej}{cut}{dup}",
        f"  packed     {c['groups']:,} groups, {c['candidates']:,} candidates -> {c['sequences']:,} sequences of "
        f"{L} tokens, packing efficiency {eff:.2%}",
        f"  tokens     {c['tokens']:,} ({meta['token_dtype']})",
        f"  time       {dt:.1f}s: {records / dt:,.0f} records/s, {c['tokens'] / dt / 1e6:.2f}M tokens/s "
        f"({workers} worker{'s' if workers > 1 else ''})",
    ])


def parse_args(argv):
    ap = ArgumentParser(prog="polar data build", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("inputs", nargs="+", help="JSONL files, or directories of *.jsonl")
    ap.add_argument("--output", "-o", required=True, help="dataset directory (created)")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a local HF tokenizer directory (default: byte)")
    ap.add_argument("--seq-length", type=int, default=16384, help="pack length in tokens (default 16384)")
    ap.add_argument("--max-length", type=int, default=0,
                    help="POLAR max_length for truncation (default: --seq-length); a group longer than "
                         "--seq-length after it gets a shorter prompt, counted in the report")
    # --max-response-length: the name of `polar score`, `polar eval` and `polar format` (the client's)
    ap.add_argument("--max-response", "--max-response-length", type=int, default=4096,
                    help="reference/candidate head kept (default 4096)")
    ap.add_argument("--wrapper", default="sft", choices=("sft", "pretrain"),
                    help="for records without one (default sft)")
    ap.add_argument("--packing", default="best_fit", choices=("best_fit", "ordered"),
                    help="best_fit: best-fit decreasing, fewest sequences (default); ordered: input order, a "
                         "new sequence when the next group does not fit")
    ap.add_argument("--workers", type=int, default=1,
                    help="worker processes (default 1; the output is the same for any number)")
    ap.add_argument("--chunk-records", type=int, default=8192,
                    help="lines per independently packed chunk (default 8192)")
    ap.add_argument("--num-shards", type=int, default=1, help="machines sharing the build")
    ap.add_argument("--shard-index", type=int, default=0, help="this machine's shard, 0..num_shards-1")
    ap.add_argument("--scan", default="",
                    help="a `polar data scan` of these inputs: its line counts instead of reading every input "
                         "(each machine then reads only the blocks where its own chunks begin); refused if an "
                         "input's size or modification time changed since")
    ap.add_argument("--on-error", default="fail", choices=ON_ERROR,
                    help="fail: stop at the first bad record; skip: write it to the rejects file and go on")
    ap.add_argument("--rejects", default="", help="rejects JSONL (default: <output>/<shard>.rejects.jsonl)")
    ap.add_argument("--seed", type=int, default=0, help="orders the packed sequences within each chunk (default 0)")
    ap.add_argument("--force", action="store_true",
                    help="build again over a shard of the same name (without it: one of this build is kept, "
                         "another refused)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = BuildConfig(tokenizer=args.tokenizer, seq_length=args.seq_length, max_length=args.max_length,
                      max_response=args.max_response, wrapper=args.wrapper, packing=args.packing,
                      on_error=args.on_error, seed=args.seed)
    try:
        meta = build(args.inputs, args.output, cfg, workers=args.workers, chunk_records=args.chunk_records,
                     num_shards=args.num_shards, shard_index=args.shard_index, rejects_path=args.rejects,
                     quiet=args.quiet, force=args.force, scan=args.scan)
    except Terminated as e:
        if isinstance(e.__context__, OSError):  # the SIGTERM was held over the shard's renames, which failed
            print(f"error: {e.__context__}", file=sys.stderr)
            print("stopped by SIGTERM", file=sys.stderr)
            return EXIT_SIGTERM
        kept = " (a shard it was to replace, --force, is kept)" if args.force else ""
        print(f"stopped by SIGTERM: nothing of the shard was written{kept}", file=sys.stderr)
        return EXIT_SIGTERM
    except RecordError as e:
        print(f"error: {e} (nothing written; --on-error skip sets bad records aside)", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if meta.get("kept"):
        # --on-error is no part of the build id (a shard stopped under fail is built again with skip), so a
        # shard kept by a command that says fail may hold fewer records than its lines: said, not dropped unsaid
        rejected = (meta.get("counts") or {}).get("rejected")
        aside = (f"; it was built with --on-error skip, {rejected:,} bad record{'s' * (rejected != 1)} set aside, "
                 f"listed in {meta.get('rejects_file')}" if rejected else "")
        print(f"{meta['path']} is already built by this build ({meta['build']['id']}: the same inputs and "
              f"settings): kept, nothing done; --force builds it again{aside}")
        return 0
    print(_summary(meta, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
