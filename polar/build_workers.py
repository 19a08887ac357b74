"""The worker side of `polar data build` (polar/data_build.py): one chunk of JSONL lines -> tokenized
shared-prefix groups -> packed sequences, the chunks run inline or in a pool of worker processes.

A chunk (polar/data_chunks.py: --chunk-records lines of one input, known by its byte range and line
count) is parsed and tokenized with POLAR's format (polar/format.py), each record becoming one group,
and its groups are packed on its own: packing reaches across records of one chunk only, and the
best-fit sequences are ordered by a generator seeded with --seed and the chunk's index. process_chunk
is thus a pure function of the chunk's bytes and the config, and the build writes the results in
chunk order whichever worker made them: the shard is the same for any --workers. The bytes read
are checked against the lines the build counted (a file rewritten since is InputChanged, not lines
built under other numbers), and their digest goes back with the result (a kept shard's input_sha256).

The pool is a ProcessPoolExecutor under multiprocessing's default start method; its workers take
process_chunk and their initializer by module path (pickled by reference), die with the build and
import no torch (engine.pack_plan plans without it). A worker that dies is WorkerDied, naming the
chunk, where multiprocessing.Pool waited forever.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from dataclasses import dataclass, field

import numpy as np

from engine.worker_processes import die_with_parent, kill_workers
from polar.data_chunks import CHANGED, Chunk, InputChanged
from polar.records import RecordError, parse_line, record_digest, reject_entry, strip_bom


@dataclass
class BuildConfig:
    tokenizer: str = "byte"
    seq_length: int = 16384
    max_length: int = 0  # 0: seq_length
    max_response: int = 4096
    wrapper: str = "sft"
    packing: str = "best_fit"
    on_error: str = "fail"
    seed: int = 0


@dataclass
class ChunkResult:
    index: int
    lines: int
    bytes: int
    blank: int = 0  # lines that hold no record (whitespace only): not records, not rejected
    arrays: dict = field(default_factory=dict)  # ShardWriter.add_sequences arguments; empty if no group
    rejects: list = field(default_factory=list)
    records: int = 0
    too_long: int = 0
    prompts_shortened: int = 0  # groups whose prompt was cut beyond POLAR's rule to fit the pack
    prompt_tokens_cut: int = 0
    responses_cut: int = 0  # references and candidates cut to --max-response by POLAR's rule
    prompts_cut: int = 0  # prompts cut to their tail by POLAR's rule (--max-length)
    tokens: int = 0
    candidates: int = 0
    # per group, in input order: its record's id and records.record_digest (two uint64s)
    record_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    digests: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))
    read_sha256: bytes = b""  # of the chunk's bytes as read (data_build._read_digest reads them again)


_WORKER: dict = {}


def _init_worker(cfg: BuildConfig) -> None:
    from polar.tokenizer import load_tokenizer

    _WORKER["cfg"] = cfg
    _WORKER["tok"] = load_tokenizer(cfg.tokenizer)


def _start_worker(cfg: BuildConfig, parent_pid: int) -> None:
    """A pool worker: it ends with the build. Left behind by a build killed without its cleanup
    (SIGKILL, the out-of-memory killer) it waited forever to hand over a chunk nobody read, holding
    the shard's lock (the writer's locked file, inherited at the fork): the same command then failed
    with "another process is writing this shard". SIGTERM has its default action here: the handler
    inherited from the build (SigtermStops) is for the main process."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(cfg)


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Parse, tokenize and pack one chunk; a pure function of the chunk's bytes and the config."""
    from engine.shard_format import token_dtype
    from engine.group import Group
    from engine.pack_plan import plan_sequences
    from polar.format import encode_groups

    cfg: BuildConfig = _WORKER["cfg"]
    tok = _WORKER["tok"]
    max_length = cfg.max_length or cfg.seq_length
    before = 1 if chunk.start else 0  # the "\n" that ends the line before the chunk's first
    with open(chunk.file, "rb") as f:
        f.seek(chunk.start - before)
        data = f.read(chunk.end - chunk.start + before)
    if len(data) != chunk.end - chunk.start + before:
        # the scan counted these bytes' lines: read short, the file's last lines were lost without a word
        raise InputChanged(f"{chunk.file}: {os.path.getsize(chunk.file)} bytes, fewer than the {chunk.end} the "
                           f"build scanned (from line {chunk.first_line} on): {CHANGED}")
    edge, data = data[:before], data[before:]
    res = ChunkResult(chunk.index, 0, len(data), read_sha256=hashlib.sha256(data).digest())
    if chunk.start == 0:
        data = strip_bom(data)
    lines = data.split(b"\n")
    # A file rewritten since its lines were counted (regenerated, as long or longer) was read from
    # wherever the counted offsets now fall: lines cut in two, built or rejected under others' numbers.
    if edge not in (b"", b"\n") or len(lines) - 1 != chunk.newlines or data.endswith(b"\n") != (
            chunk.newlines == chunk.lines):
        raise InputChanged(f"{chunk.file}: bytes {chunk.start}-{chunk.end} do not hold lines {chunk.first_line}-"
                           f"{chunk.first_line + chunk.lines - 1} as the build counted them: {CHANGED}")
    if data.endswith(b"\n"):
        lines.pop()
    res.lines = len(lines)

    def bad(k: int, field: str, reason: str) -> None:
        line = chunk.first_line + k
        if cfg.on_error == "fail":
            raise RecordError(chunk.file, line, field, reason)
        res.rejects.append(reject_entry(chunk.file, line, field, reason, lines[k]))

    records, where = [], []
    for k, raw in enumerate(lines):
        try:
            rec = parse_line(raw, chunk.file, chunk.first_line + k)
        except RecordError as e:
            bad(k, e.field, e.reason)
            continue
        if rec is not None:
            records.append(rec)
            where.append(k)
        else:
            res.blank += 1

    def encode(recs):
        return encode_groups(tok, [r.prompt for r in recs], [r.reference for r in recs],
                             [r.candidates for r in recs], [r.wrapper or cfg.wrapper for r in recs],
                             max_length=max_length, max_response=cfg.max_response,
                             group_capacity=cfg.seq_length)

    try:
        encoded = encode(records)  # two batched tokenizer calls for the whole chunk
    except (TypeError, ValueError):
        encoded = []  # find the record the tokenizer or format refused, one by one
        for rec, k in zip(records, where):
            try:
                encoded.extend(encode([rec]))
            except (TypeError, ValueError) as e:
                encoded.append(None)
                bad(k, "(encode)", str(e))
    groups, ids, digests = [], [], []
    for rec, k, enc in zip(records, where, encoded):
        if enc is None:
            continue
        g = Group(prefix=enc.prefix, candidates=enc.candidates, labels=np.asarray(rec.labels, dtype=np.int8))
        if len(g) > cfg.seq_length:  # no prompt cut makes it fit (or a BPE merged otherwise)
            res.too_long += 1
            cut = enc.prompt_cut_to_fit
            cut = f" even with its prompt cut by {cut} tokens beyond POLAR's rule" if cut else ""
            bad(k, "(group)", f"{len(g)} tokens after truncation to max_length={max_length}, more than "
                              f"seq_length={cfg.seq_length}{cut} (a group is never split)")
            continue
        if enc.prompt_cut_to_fit:
            res.prompts_shortened += 1
            res.prompt_tokens_cut += enc.prompt_cut_to_fit
        res.responses_cut += enc.responses_cut
        res.prompts_cut += enc.prompt_cut
        groups.append(g)
        ids.append(chunk.first_record + k)
        digests.append(record_digest(rec.prompt, rec.reference, rec.candidates, rec.labels, rec.wrapper or cfg.wrapper))
    res.records = len(groups)
    if not groups:
        return res
    res.record_ids = np.asarray(ids, dtype=np.int64)
    res.digests = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2)
    lengths = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    plan = plan_sequences(lengths, cfg.seq_length, method=cfg.packing)
    # Best-fit emits sequences ordered by their largest group; a reader that does not shuffle
    # (evaluation) should not see length-sorted batches, so the order is mixed, by the seed.
    if cfg.packing == "best_fit":
        order = np.random.default_rng([cfg.seed, chunk.index]).permutation(len(plan))
        plan = [plan[i] for i in order]
    # Flat arrays in the shard's token dtype: half the bytes of int32 Groups through the pipe, and
    # the parent appends a whole chunk with a few numpy calls.
    order = np.concatenate(plan)
    ordered = [groups[i] for i in order]
    pieces = [p for g in ordered for p in (g.prefix, *g.candidates)]
    res.arrays = dict(
        tokens=np.concatenate(pieces).astype(token_dtype(tok.vocab_size)),
        piece_lengths=np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces)),
        piece_labels=np.concatenate([np.concatenate([[-1], g.labels]) for g in ordered]).astype(np.int8),
        group_pieces=np.fromiter((1 + len(g.candidates) for g in ordered), dtype=np.int64, count=len(ordered)),
        seq_groups=np.fromiter((len(p) for p in plan), dtype=np.int64, count=len(plan)),
        sources=res.record_ids[order],
    )
    res.tokens = int(lengths.sum())
    res.candidates = sum(len(g.candidates) for g in groups)
    return res


def run_inline(cfg: BuildConfig, chunks: list[Chunk]):
    _init_worker(cfg)
    for c in chunks:
        yield process_chunk(c)


class WorkerDied(RuntimeError):
    """A worker process ended without an answer (killed: the out-of-memory killer, a signal)."""


def run_pool(cfg: BuildConfig, chunks: list[Chunk], workers: int):
    """Results in chunk order, with at most 2 x workers chunks in flight (bounded memory). A pool
    whose worker dies is an error naming the chunk, where multiprocessing.Pool waited forever."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=_start_worker,
                               initargs=(cfg, os.getpid()))
    todo, pending = iter(chunks), deque()

    def died(c: Chunk) -> WorkerDied:
        return WorkerDied(f"a build worker died (killed: out of memory?) while the pool was reading {c.file} from "
                          f"line {c.first_line} (chunk {c.index}) or a chunk after it; nothing of the shard was "
                          "written: run again (fewer --workers or --chunk-records use less memory)")

    def submit(c: Chunk) -> None:
        try:
            pending.append((c, pool.submit(process_chunk, c)))
        except BrokenProcessPool:  # a worker died since the last answer: the oldest chunk in flight is named
            raise died(pending[0][0] if pending else c) from None

    try:
        for c in todo:
            submit(c)
            if len(pending) == 2 * workers:
                break
        while pending:
            c, fut = pending.popleft()
            try:
                res = fut.result()
            except BrokenProcessPool:
                raise died(c) from None
            nxt = next(todo, None)
            if nxt is not None:
                submit(nxt)
            yield res
    except BaseException:
        # A build that stops (an error, SIGTERM, Ctrl-C, the generator closed) wants nothing more of
        # the chunks in flight: shutdown would wait for each to be finished and handed over.
        kill_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


