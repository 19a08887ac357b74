"""Rewards through the batcher (cross-request batching, shared prefixes, any grouping and
concurrency) equal each item scored alone (fp32, 1e-5)."""
import concurrent.futures
import math
import threading

import numpy as np
import pytest

from polar.serve.batcher import Batcher, Closed, QueueFull
from polar.serve.items import StructuredItem, format_structured, tokenize_served_text

from .items_gen import make_items
from .test_app_failures import _until, held_rounds


def _ids(tokenizer, items, max_length=16384, max_response=4096):
    structured = [StructuredItem(it["prompt"], it["reference"], it["output"], it["wrapper"]) for it in items]
    return [ids for _, ids in format_structured(tokenizer, structured, max_length, max_response)]


@pytest.mark.parametrize("share,max_batch_tokens,row_tokens", [(True, 4096, 1024), (True, 300, 256), (False, 2048, 512)])
def test_concurrent_requests_equal_each_item_alone(scorer, tokenizer, alone, share, max_batch_tokens, row_tokens):
    requests = [_ids(tokenizer, make_items(seed, groups=3, rollouts=3)) for seed in range(6)]
    expected = [alone(r) for r in requests]
    b = Batcher(scorer.score, tokenizer.pad_id, max_wait_s=0.05, max_batch_tokens=max_batch_tokens,
                row_tokens=row_tokens, share_prefixes=share).start()
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(b.score_sync, requests))
    finally:
        b.close()
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
    if share:
        assert b.totals.computed < b.totals.tokens  # prefixes were shared
    else:
        assert b.totals.computed == b.totals.tokens


def test_served_text_tokenizes_to_the_formatted_ids(tokenizer):
    structured = [StructuredItem(it["prompt"], it["reference"], it["output"], it["wrapper"]) for it in make_items(3)]
    for text, ids in format_structured(tokenizer, structured, 16384, 4096):
        np.testing.assert_array_equal(tokenize_served_text(tokenizer, [text])[0], ids)


def test_long_items_are_truncated_by_the_format_rules(scorer, tokenizer, alone):
    items = make_items(5, groups=2, rollouts=3, long=400)
    ids = _ids(tokenizer, items, max_length=256, max_response=64)
    assert max(len(a) for a in ids) <= 257 and max(len(a) for a in ids) > 200
    b = Batcher(scorer.score, tokenizer.pad_id, max_wait_s=0, row_tokens=512).start()
    try:
        np.testing.assert_allclose(b.score_sync(ids), alone(ids), rtol=0, atol=1e-5)
    finally:
        b.close()


def test_full_queue_refuses_with_a_retry_hint(scorer, tokenizer):
    b = Batcher(scorer.score, tokenizer.pad_id, max_queue_items=3)  # not started: nothing drains the queue
    first = b.submit([np.array([256, 1, 259], dtype=np.int32)] * 2)
    with pytest.raises(QueueFull) as e:
        b.submit([np.array([256, 2, 259], dtype=np.int32)] * 2)
    assert e.value.retry_after_s >= 1
    b.start()
    assert len(first.result(60)) == 2
    b.close()


def test_the_retry_hint_of_a_full_queue_is_measured_on_full_rounds(scorer, tokenizer):
    """A fresh server's first burst was told to retry in 40 minutes (Retry-After 2452 s; its queue
    drained in 2 s): the hint was the queued tokens over the last round's rate, or 1000 tokens/s
    before any round, and a round of one short item (a forward's fixed cost) reads as a few
    thousand tokens/s. Only a round of --max-batch-tokens or more now sets the rate, not the first
    such round (one-off costs: CUDA context, Triton's compiles), the fastest of the recent ones;
    until then the hint is 1 s."""
    gate, rounds, held = held_rounds(scorer)
    b = Batcher(held, tokenizer.pad_id, max_wait_s=0, max_batch_tokens=64, max_queue_items=4).start()
    short = [np.array([256, 1, 259], dtype=np.int32)]
    long_items = [np.full(20_000, 7, dtype=np.int32)] * 4  # never scored: cancelled while the worker is held

    def refused_while_held(before):
        gate.clear()
        running = b.submit(short)  # its round holds the worker
        assert _until(lambda: len(rounds) > before)
        queued = b.submit(long_items)
        with pytest.raises(QueueFull) as e:
            b.submit(short)
        queued.cancel()
        gate.set()
        running.result(60)
        return e.value.retry_after_s

    try:
        gate.set()
        b.score_sync(short, 60)
        assert refused_while_held(len(rounds)) == 1  # only short rounds so far
        full = [np.arange(256, 256 + 40, dtype=np.int32) % 250] * 4  # 160 tokens: a full round
        b.score_sync(full, 60)
        assert b._tokens_per_s == 0 and refused_while_held(len(rounds)) == 1  # the first full round: warm-up
        b.score_sync(full, 60)
        rate = b._tokens_per_s
        assert rate > 0
        assert refused_while_held(len(rounds)) == max(1, math.ceil(80_000 / rate))
        b._recent_rates.append(rate / 100)  # a slow round later: the fastest recent one still sets the hint
        b.score_sync(full, 60)
        assert b._tokens_per_s == max(b._recent_rates) >= rate
    finally:
        gate.set()
        b.close()


def test_cancelled_request_is_skipped_and_others_are_served(scorer, tokenizer, alone):
    b = Batcher(scorer.score, tokenizer.pad_id, max_wait_s=0.2)
    ids = [np.array([256, 7, 8, 259], dtype=np.int32)]
    gone = b.submit(ids)
    kept = b.submit(ids)
    assert gone.cancel()
    b.start()
    np.testing.assert_allclose(kept.result(60), alone(ids), atol=1e-5)
    b.close()
    assert b.totals.items == 1


def test_a_failing_round_is_bisected_to_the_request_that_broke_it(scorer, tokenizer, alone):
    """16 requests in one round, one of them unscorable: it alone fails, the others get their
    rewards, in 1 + 2 * log2(16) = 9 forwards (halving the round), not 1 + 16 (each request alone)."""
    poison, calls = 7, []

    def picky(batch):
        calls.append(batch)
        if (batch.tokens == poison).any():
            raise RuntimeError("this batch cannot be scored")
        return scorer.score(batch)

    b = Batcher(picky, tokenizer.pad_id, max_wait_s=0.5, max_batch_tokens=1 << 20)
    good = [[np.array([256, 10 + k, 11 + k, 259], dtype=np.int32)] for k in range(16)]
    bad_at = 11
    futures = [b.submit([np.array([256, poison, 8, 259], dtype=np.int32)] if k == bad_at else good[k])
               for k in range(16)]
    b.start()  # every request is queued before the worker takes its first round
    for k, f in enumerate(futures):
        if k == bad_at:
            with pytest.raises(RuntimeError, match="cannot be scored"):
                f.result(60)
        else:
            np.testing.assert_allclose(f.result(60), alone(good[k]), atol=1e-5)
    b.close()
    assert calls[0].reward_index.numel() == 16 and len(calls) == 9


def test_a_caller_in_this_process_waits_for_room_in_a_full_queue(scorer, tokenizer, alone):
    """The in-process scorer (score_sync) was refused with QueueFull, 'the server's queue is full ...
    retry after 1 s', when its call came while others filled the queue: an RL trainer's second thread
    stopped on an exception where an HTTP client waits and retries the 429. It now waits for room,
    within its timeout; HTTP requests (submit) are still refused at once."""
    gate, rounds, held = held_rounds(scorer)
    b = Batcher(held, tokenizer.pad_id, max_wait_s=0, max_queue_items=8).start()
    calls = [[np.array([256, 30 + 3 * k + i, 40, 259], dtype=np.int32) for i in range(n)]
             for k, n in enumerate((1, 6, 6))]
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(b.score_sync, calls[0], 60)
            assert _until(lambda: rounds)  # its round holds the worker
            second = pool.submit(b.score_sync, calls[1], 60)
            assert _until(lambda: b.queued_items == 6)
            with pytest.raises(QueueFull):
                b.submit(calls[2])  # an HTTP request: refused at once
            with pytest.raises(QueueFull):
                b.score_sync(calls[2], 0.2)  # no room within its timeout
            third = pool.submit(b.score_sync, calls[2], 60)
            assert not _until(third.done, 0.3)  # waiting for room, not refused
            gate.set()
            for fut, ids in zip((first, second, third), calls):
                np.testing.assert_allclose(fut.result(60), alone(ids), rtol=0, atol=1e-5)
        gate.clear()
        b.submit(calls[0])  # holds the worker again
        assert _until(lambda: len(rounds) == 4)
        b.submit(calls[1])
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(b.score_sync, calls[2])
            assert not _until(waiting.done, 0.3)
            threading.Thread(target=b.close).start()  # a close wakes it: Closed, not a wait for ever
            with pytest.raises(Closed):
                waiting.result(60)
    finally:
        gate.set()
        b.close()


def _stepped_rounds(scorer):
    """-> (step, rounds, score): `score` records each round's batch in `rounds` and holds the
    batcher's one worker inside it until `step.release()` lets exactly one round finish."""
    step, rounds = threading.Semaphore(0), []

    def stepped(batch):
        rounds.append(batch)
        assert step.acquire(timeout=60)
        return scorer.score(batch)

    return step, rounds, stepped


def _tagged(tag, n=1):
    """n items, each 5 tokens (max_batch_tokens=2 makes a round one request) holding its own tag."""
    return [np.array([256, tag + i, 40, 41, 259], dtype=np.int32) for i in range(n)]


def _scored_order(rounds, tags):
    """The requests (keys of `tags`, each a request's first tag) in the order their rounds ran."""
    return [next(name for name, tag in tags.items() if (batch.tokens == tag).any()) for batch in rounds]


def test_callers_waiting_for_room_are_let_in_first_come_first_served(scorer, tokenizer, alone):
    """A large in-process call waiting for room was starved by small calls from other threads: each
    round freed room for one small call, which took it before the large one fitted, for as long as
    small calls came (verl's per-item reward calls from a thread pool beside a batch call). A call
    that finds others waiting now queues behind them; the large one here, more than the whole queue
    (max_queue_items 4), waits for the queue to drain, and the small ones that came after it wait
    behind it however much room there is."""
    step, rounds, stepped = _stepped_rounds(scorer)
    b = Batcher(stepped, tokenizer.pad_id, max_wait_s=0, max_batch_tokens=2, max_queue_items=4).start()
    small = {f"s{k}": _tagged(10 + k) for k in range(9)}
    large = _tagged(100, 5)
    tags = {"large": 100, **{name: int(ids[0][1]) for name, ids in small.items()}}
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            first = b.submit(small["s0"])
            assert _until(lambda: len(rounds) == 1)  # its round holds the worker
            queued = [b.submit(small[f"s{k}"]) for k in range(1, 5)]  # the queue is full
            big = pool.submit(b.score_sync, large, 60)
            assert _until(lambda: b.waiting_for_room == 1)
            later = {}
            for k in range(5, 8):  # one round at a time frees room for one small call, never for the large one
                step.release()
                assert _until(lambda: len(rounds) == k - 3)
                before = b.queued_items
                later[k] = pool.submit(b.score_sync, small[f"s{k}"], 60)
                assert _until(lambda: b.waiting_for_room == k - 3 or b.queued_items > before)
                assert b.queued_items == before, f"s{k} was queued ahead of the large call waiting before it"
            step.release()  # s4's round takes the last item: the empty queue takes the large call
            assert _until(lambda: b.queued_items == 5)
            later[8] = pool.submit(b.score_sync, small["s8"], 60)
            assert _until(lambda: b.waiting_for_room == 4)
            for _ in range(20):
                step.release()
            np.testing.assert_allclose(big.result(60), alone(large), rtol=0, atol=1e-5)
            for fut, ids in [(first, small["s0"])] + list(zip(queued, [small[f"s{k}"] for k in range(1, 5)])) + [
                    (later[k], small[f"s{k}"]) for k in later]:
                np.testing.assert_allclose(fut.result(60), alone(ids), rtol=0, atol=1e-5)
        assert _scored_order(rounds, tags) == ["s0", "s1", "s2", "s3", "s4", "large", "s5", "s6", "s7", "s8"]
        assert b.waiting_for_room == 0
    finally:
        for _ in range(20):
            step.release()
        b.close()


def test_a_waiter_whose_time_runs_out_lets_the_next_one_in(scorer, tokenizer, alone):
    """The head of the line leaving (its room_wait_s spent) wakes the caller behind it, which
    takes the room that was there all along, with no round having run meanwhile."""
    step, rounds, stepped = _stepped_rounds(scorer)
    b = Batcher(stepped, tokenizer.pad_id, max_wait_s=0, max_batch_tokens=2, max_queue_items=4).start()
    small = [_tagged(10 + k) for k in range(5)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = b.submit(small[0])
            assert _until(lambda: len(rounds) == 1)  # its round holds the worker
            queued = [b.submit(ids) for ids in small[1:4]]  # room for one more item
            head = pool.submit(b.score_sync, _tagged(100, 5), 4.0)  # more than the queue: waits for it to drain
            assert _until(lambda: b.waiting_for_room == 1)
            behind = pool.submit(b.score_sync, small[4], 60)
            assert _until(lambda: b.waiting_for_room == 2)  # it fits, but waits behind the head
            with pytest.raises(QueueFull):
                head.result(30)
            assert _until(lambda: b.queued_items == 4)  # let in by the head leaving
            assert len(rounds) == 1 and b.waiting_for_room == 0
            for _ in range(10):
                step.release()
            for fut, ids in zip([first, *queued, behind], small):
                np.testing.assert_allclose(fut.result(60), alone(ids), rtol=0, atol=1e-5)
    finally:
        for _ in range(10):
            step.release()
        b.close()
