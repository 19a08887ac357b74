"""Cross-request batching: every request's items wait in one bounded queue, at most `max_wait_s`;
a worker thread takes what is there, groups items sharing an id prefix (grouping.py, across
requests too), packs the groups into rows (engine.packing.plan_sequences) and runs token-budgeted
forward passes. Each request gets back exactly its own rewards, in its own order.

The model runs in this one worker thread, so the event loop serving HTTP never blocks on it, and
requests that were cancelled (timed out, client gone) before their round started leave the queue.
No row is wider than the model's positions (`max_positions`), and a round that fails is scored
again request by request, so a request that cannot be scored fails alone; an item given a
non-finite reward beside others in its row is scored again in a row of its own (a NaN reaches
every item of its row), so only an item that is non-finite alone is refused.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from engine.packing import collate, plan_sequences
from polar.serve.grouping import ServeGroup, group_items


class QueueFull(Exception):
    def __init__(self, retry_after_s: int, pending: int):
        super().__init__(f"the server's queue is full ({pending} items waiting); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Closed(Exception):
    pass


@dataclass
class _Job:
    ids: list
    future: concurrent.futures.Future
    enqueued: float
    tokens: int


@dataclass
class RoundStats:
    items: int = 0
    tokens: int = 0  # each item counted alone
    computed: int = 0  # shared prefixes counted once
    padded: int = 0  # rows x row length over all forward passes
    forwards: int = 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_forwards(groups: list[ServeGroup], row_tokens: int, max_batch_tokens: int,
                  pack_rows: bool = True) -> list[list[list[ServeGroup]]]:
    """Groups -> forward passes, each a list of rows (lists of whole groups). A row holds at most
    max(row_tokens, its longest group) tokens, or one group when not `pack_rows`; a forward holds
    rows x padded row length <= max_batch_tokens tokens (at least one row)."""
    if not groups:
        return []
    if pack_rows:
        lengths = np.array([len(g) for g in groups], dtype=np.int64)
        row_len = max(row_tokens, int(lengths.max()))
        rows = [[groups[i] for i in idx] for idx in plan_sequences(lengths, row_len, "best_fit")]
    else:
        rows = [[g] for g in groups]
    fills = [sum(len(g) for g in r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -fills[i])
    forwards, current, width = [], [], 0
    for i in order:
        # Rows come longest first: the first row of a forward sets its padded length.
        w = width or fills[i]
        if current and (len(current) + 1) * w > max_batch_tokens:
            forwards.append(current)
            current, w = [], fills[i]
        current.append(rows[i])
        width = w
    forwards.append(current)
    return forwards


class Batcher:
    def __init__(self, score: Callable, pad_id: int, *, max_wait_s: float = 0.01, max_batch_tokens: int = 16384,
                 row_tokens: int = 4096, max_queue_items: int = 4096, share_prefixes: bool = True,
                 pack_rows: bool = True, pad_multiple: int = 16, max_positions: Optional[int] = None,
                 metrics=None):
        """`pack_rows`: several groups per packed row. Worth it with a kernel that skips masked
        tiles (Triton); the torch reference attention computes a dense L x L mask per row, so one
        group per row costs less there. `max_positions`: the model's (max_position_embeddings);
        rows are never wider, and `row_tokens` is lowered to it (RewardScorer.max_positions)."""
        self.score_fn = score
        self.pad_id = pad_id
        self.max_wait_s = max_wait_s
        self.max_batch_tokens = max_batch_tokens
        self.max_positions = max_positions
        self.row_tokens = min(row_tokens, max_positions) if max_positions else row_tokens
        self.max_queue_items = max_queue_items
        self.share_prefixes = share_prefixes
        self.pack_rows = pack_rows
        self.pad_multiple = pad_multiple
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._pending_items = 0
        self._pending_tokens = 0
        # callers waiting for room (submit with room_wait_s), first come first served: one ticket each
        self._waiters: deque[object] = deque()
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        # Retry-After's drain rate: the fastest of the last few full rounds after the first (0: none yet)
        self._tokens_per_s = 0.0
        self._full_rounds = 0
        self._recent_rates: collections.deque = collections.deque(maxlen=8)
        self.last_round = RoundStats()
        self.totals = RoundStats()

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Batcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="polar-serve-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: Optional[float] = None) -> None:
        """Finish every queued request, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def queued_items(self) -> int:
        return self._pending_items

    @property
    def waiting_for_room(self) -> int:
        """Callers inside submit waiting for room in the queue (or behind others waiting)."""
        return len(self._waiters)

    def check_room(self) -> None:
        """QueueFull when the queue is full now, or callers wait for room (a submit now would queue
        behind them): lets a server refuse a request before reading it."""
        with self._cond:
            if self._waiters or self._pending_items >= self.max_queue_items:
                raise self._queue_full()

    def _queue_full(self) -> QueueFull:
        if self.metrics:
            self.metrics.rejected.inc()
        # Until a full round has been measured the drain time is unknown: a retry in 1 s costs the
        # client one more 429 (refused before its body is read), where a guess of 1000 tokens/s told
        # a fresh server's first burst to come back in 40 minutes after it drained in 2 s.
        wait = math.ceil(self._pending_tokens / self._tokens_per_s) if self._tokens_per_s else 1
        return QueueFull(max(1, wait), self._pending_items)

    # ---- submitting ----------------------------------------------------------------------------
    def submit(self, ids: list, room_wait_s: float = 0.0) -> concurrent.futures.Future:
        """Queue one request's items (int32 id arrays, each non-empty); the future gets their fp32
        rewards; cancelling it before its round starts takes them off the queue. Raises QueueFull
        when the queue cannot take them within `room_wait_s` seconds (None: however long it takes),
        Closed after close() (a caller waiting for room too), ValueError for an item longer than the
        model's positions (it would fail the forward of every request batched with it).

        Room is given first come, first served: a call that finds others waiting for room queues
        behind them, even where its items would fit now (with room_wait_s 0 it gets QueueFull, as
        for a full queue), so a large call is not passed for ever by small ones that fit in the room
        each round frees. An empty queue takes a request however large, so one of more than
        max_queue_items items waits for the queue to drain, and those behind it wait with it; a
        caller whose wait runs out leaves its place and the next in line is woken."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not ids:
            fut.set_result(np.zeros(0, dtype=np.float32))
            return fut
        if self.max_positions:
            for i, a in enumerate(ids):
                if len(a) > self.max_positions:
                    raise ValueError(f"item {i} is {len(a)} tokens long, more than the model's "
                                     f"{self.max_positions} positions (max_position_embeddings)")
        deadline = None if room_wait_s is None else time.monotonic() + room_wait_s
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if self._waiters or not self._fits(len(ids)):
                self._wait_for_room(len(ids), deadline)
            job = _Job(list(ids), fut, time.monotonic(), int(sum(len(a) for a in ids)))
            self._pending.append(job)
            self._pending_items += len(ids)
            self._pending_tokens += job.tokens
            if self.metrics:
                self.metrics.queue_items.set(self._pending_items)
            self._cond.notify_all()
        fut.add_done_callback(lambda f: f.cancelled() and self._drop(job))
        return fut

    def _fits(self, n: int) -> bool:
        return not self._pending_items or self._pending_items + n <= self.max_queue_items

    def _wait_for_room(self, n: int, deadline: Optional[float]) -> None:
        """Under the condition: returns once this caller is the first in line and its n items fit."""
        ticket = object()
        self._waiters.append(ticket)
        try:
            while True:
                if self._waiters[0] is ticket and self._fits(n):
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise self._queue_full()
                # rounds taking items, cancelled requests, the callers ahead leaving and close() notify
                self._cond.wait(left)
                if self._closing:
                    raise Closed("the server is shutting down")
        finally:
            self._waiters.remove(ticket)
            if self._waiters:
                self._cond.notify_all()  # the next in line may fit now

    def _drop(self, job: _Job) -> None:
        """A cancelled request leaves the queue at once: its items no longer count against the
        queue's limit (a client that gave up and retries would otherwise be refused by its own ghost)."""
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # already taken by a round, which skips it
            self._pending_items -= len(job.ids)
            self._pending_tokens -= job.tokens
            if self.metrics:
                self.metrics.queue_items.set(self._pending_items)
            self._cond.notify_all()

    async def score(self, ids: list) -> np.ndarray:
        return await asyncio.wrap_future(self.submit(ids))

    def score_sync(self, ids: list, timeout: Optional[float] = None) -> np.ndarray:
        """The rewards, for a caller in this process (polar.in_process_scorer): a full queue is waited
        on, as an HTTP client retries a 429, within `timeout` (None: no limit) in all; callers
        waiting for room are let in in the order they came (submit)."""
        start = time.monotonic()
        fut = self.submit(ids, room_wait_s=timeout)
        return fut.result(None if timeout is None else max(0.0, timeout - (time.monotonic() - start)))

    # ---- the worker ----------------------------------------------------------------------------
    def _take(self) -> Optional[list[_Job]]:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None  # closing, nothing left
            deadline = self._pending[0].enqueued + self.max_wait_s
            while (not self._closing and self._pending_tokens < self.max_batch_tokens
                   and (now := time.monotonic()) < deadline):
                self._cond.wait(deadline - now)
            # Whole requests, up to a few forward passes' worth of tokens (shared prefixes shrink it).
            jobs, tokens = [], 0
            while self._pending and (not jobs or tokens + self._pending[0].tokens <= 4 * self.max_batch_tokens):
                job = self._pending.popleft()
                jobs.append(job)
                tokens += job.tokens
                self._pending_items -= len(job.ids)
                self._pending_tokens -= job.tokens
            if self.metrics:
                self.metrics.queue_items.set(self._pending_items)
            self._cond.notify_all()  # callers waiting for room (score_sync)
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            # A cancelled future (request timed out or client gone) is not scored.
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            self._score_isolating(jobs)

    def _score_isolating(self, jobs: list[_Job]) -> None:
        """Score the round; if it fails, which request broke it is unknown, so score each half on
        its own, recursively: only the breaking requests fail, after about 2 log2(len(jobs)) more
        rounds for one bad request (not len(jobs)), and a round too large for the device (out of
        memory) is retried in halves that may fit. The worker lives on whatever is raised."""
        try:
            results = self._score_round(jobs, time.monotonic())
        except BaseException as e:
            if len(jobs) == 1:
                jobs[0].future.set_exception(e)
                return
            half = len(jobs) // 2
            self._score_isolating(jobs[:half])
            self._score_isolating(jobs[half:])
            return
        for j, r in zip(jobs, results):
            j.future.set_result(r)

    def _forward(self, groups: list[ServeGroup], pack_rows: bool, rewards: np.ndarray,
                 stats: RoundStats) -> np.ndarray:
        """Scores the groups into `rewards` (indexed by ServeGroup.items); returns, per item of
        `rewards`, whether its row held another candidate."""
        crowded = np.zeros(len(rewards), dtype=bool)
        for rows in plan_forwards(groups, self.row_tokens, self.max_batch_tokens, pack_rows):
            fills = [sum(len(g) for g in r) for r in rows]
            width = _round_up(max(fills), self.pad_multiple)
            if self.max_positions:
                width = min(width, self.max_positions)  # the padding must not pass it either
            batch = collate(rows, width, self.pad_id)
            t0 = time.monotonic()
            out = self.score_fn(batch)
            if self.metrics:
                self.metrics.forward.observe(time.monotonic() - t0)
                self.metrics.batch_items.observe(len(out))
                self.metrics.batch_tokens.observe(len(rows) * width)
            # collate numbers candidates row by row, group by group, candidate by candidate.
            where = [i for r in rows for g in r for i in g.items]
            rewards[where] = out
            for r in rows:
                if sum(len(g.items) for g in r) > 1:
                    crowded[[i for g in r for i in g.items]] = True
            stats.computed += int(sum(fills))
            stats.padded += len(rows) * width
            stats.forwards += 1
        return crowded

    def _score_round(self, jobs: list[_Job], start: float) -> list[np.ndarray]:
        flat = [a for j in jobs for a in j.ids]
        groups = group_items(flat, self.row_tokens) if self.share_prefixes else _alone(flat, range(len(flat)))
        rewards = np.empty(len(flat), dtype=np.float32)
        stats = RoundStats(items=len(flat), tokens=int(sum(len(a) for a in flat)))
        crowded = self._forward(groups, self.pack_rows, rewards, stats)
        # A NaN or inf in one item's activations reaches every item that shared its row: the masked
        # attention weights are exact zeros, and 0 * NaN is NaN. Such items (a sibling of a shared
        # prefix, a group packed beside it, another request's) are scored again each in a row of its
        # own, where rows share nothing; an item that is non-finite alone stays so and is named.
        again = np.flatnonzero(~np.isfinite(rewards) & crowded)
        if again.size:  # its forwards count, not its tokens again: computed stays at most tokens (prefix_saved)
            rescored = RoundStats()
            self._forward(_alone(flat, again.tolist()), False, rewards, rescored)
            stats.padded += rescored.padded
            stats.forwards += rescored.forwards
        elapsed = time.monotonic() - start
        # Only a round of a forward's worth of tokens or more measures how fast a full queue drains: a
        # smaller one is mostly the cost of a forward pass (one item in a few ms reads as a few
        # thousand tokens/s, and the Retry-After of the queue behind it as an hour).
        # The first full round after start carries one-off costs (CUDA context, Triton's compiles) and
        # would make the hint given while the next one runs 10-100x the real drain time; of the rest,
        # the fastest recent one: a hint too short costs a client one more 429 (refused before its body
        # is read), one too long stalls an RL step that honours it.
        if elapsed > 0 and stats.tokens >= self.max_batch_tokens:
            self._full_rounds += 1
            if self._full_rounds > 1:
                self._recent_rates.append(stats.tokens / elapsed)
                self._tokens_per_s = max(self._recent_rates)
        self.last_round = stats
        for k in ("items", "tokens", "computed", "padded", "forwards"):
            setattr(self.totals, k, getattr(self.totals, k) + getattr(stats, k))
        if self.metrics:
            m = self.metrics
            m.items.inc(stats.items)
            m.tokens.inc(stats.tokens)
            m.computed_tokens.inc(stats.computed)
            m.prefix_saved.inc(stats.tokens - stats.computed)
            m.batch_requests.observe(len(jobs))
            for j in jobs:
                m.queue_wait.observe(start - j.enqueued)
        out, k = [], 0
        for j in jobs:
            out.append(rewards[k:k + len(j.ids)])
            k += len(j.ids)
        return out


def _alone(ids: list, which) -> list[ServeGroup]:
    """Items `which` of `ids`, each its own group: no prefix shared."""
    return [ServeGroup(prefix=ids[i][:-1], candidates=[ids[i][-1:]], items=[i]) for i in which]


def non_finite(rewards: np.ndarray, names: list[str]) -> Optional[str]:
    """What to say of rewards that are NaN or inf (`names[i]`: item i as the caller knows it), or None
    when all are finite: a trainer would take NaN as a reward, so no caller is handed one."""
    bad = np.flatnonzero(~np.isfinite(rewards))
    if not bad.size:
        return None
    return (f"the model gave non-finite rewards ({rewards[bad[0]]}) for {bad.size} of the {len(rewards)} items "
            f"({', '.join(names[i] for i in bad[:8].tolist())}{', ...' if bad.size > 8 else ''}); an overflow in "
            "the model's precision or a broken checkpoint")


def score_each_alone(score: Callable, ids: list, pad_id: int) -> np.ndarray:
    """Each item as its own one-row batch, no sharing: the reference the batched rewards must equal."""
    out = np.empty(len(ids), dtype=np.float32)
    for k, a in enumerate(ids):
        g = ServeGroup(prefix=a[:-1], candidates=[a[-1:]], items=[0])
        out[k] = score(collate([[g]], len(a), pad_id))[0]
    return out
