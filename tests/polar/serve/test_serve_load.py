"""A small run of benchmarks/serve_load.py against the live server: concurrent clients, valid and
malformed requests; zero 5xx, zero lost or mismatched answers, healthy afterwards."""
import asyncio
import importlib.util
import os


from polar.serve.items import StructuredItem, format_structured
from polar.serve.batcher import score_each_alone

from .conftest import ROOT, live_server


def _load_module():
    spec = importlib.util.spec_from_file_location("serve_load", os.path.join(ROOT, "benchmarks", "serve_load.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_small_load_run(scorer, tokenizer):
    load = _load_module()
    pool = load.make_pool(seed=3, prompts=6, rollouts=4, words=12)
    formatted = format_structured(tokenizer, [StructuredItem(**it) for it in pool], 16384, 4096)
    expected = score_each_alone(scorer.score, [ids for _, ids in formatted], tokenizer.pad_id)
    with live_server(scorer, tokenizer, max_items=8, batcher_kw=dict(max_queue_items=24, pack_rows=False)) as (url, _):
        stats = asyncio.run(load.run_load(url, pool, [t for t, _ in formatted], expected, clients=6, seconds=4,
                                          bad_fraction=0.3, max_request=8, seed=1))
    assert stats["valid"] > 0 and stats["malformed"] > 0
    assert stats["5xx"] == 0 and stats["lost"] == 0 and stats["mismatched"] == 0 and stats["bad_not_4xx"] == 0
    assert stats["healthy_after"]
    assert load.ok(stats)


def test_burst_counts_what_waits_and_what_is_refused(scorer, tokenizer):
    """benchmarks/serve_load.py --burst: with the room for bodies held (--max-reading-bytes, by
    default --max-preparing 2 x --max-body-bytes: two bodies declared that large), 5 of 12 requests
    wait (--max-waiting) and are answered 200 once the room is let go; the other 7 are refused at once."""
    load = _load_module()
    with live_server(scorer, tokenizer, max_preparing=2, preparing_wait_s=60, max_waiting=5) as (url, service):
        stats = load.burst(url, service, 12, 2048)
    assert (stats["refused_at_once"], stats["waited"], stats["then_200"], stats["other_or_none"]) == (7, 5, 5, 0)
    assert stats["body_bytes"] == 2048 and stats["waiting_heap_mb"] > 0 and stats["held_by"] == 2
