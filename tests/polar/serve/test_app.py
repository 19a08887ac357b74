"""Real clients against the live server on loopback: POLAR's reward client's requests to /classify
and /pooling (sglang, vllm, lmdeploy), OpenRLHF's /get_reward, the native /v1/rewards, verl's
compute_score_batch through polar.reward; rewards equal each item scored alone (fp32, 1e-5)."""
import asyncio
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from polar import reward
from polar.serve.items import StructuredItem, format_structured

from .conftest import live_server
from .items_gen import make_items


@pytest.fixture(scope="module")
def server(scorer, tokenizer):
    with live_server(scorer, tokenizer, max_items=64, max_body_bytes=200_000) as s:
        yield s


def _formatted(tokenizer, items):
    structured = [StructuredItem(it["prompt"], it["reference"], it["output"], it["wrapper"]) for it in items]
    return format_structured(tokenizer, structured, 16384, 4096)


@pytest.fixture(scope="module")
def batch(tokenizer, alone):
    items = make_items(21, groups=3, rollouts=4)
    texts, ids = zip(*_formatted(tokenizer, items))
    return items, list(texts), alone(list(ids))


# ---- the requests POLAR's RewardModelClient sends, read the way it reads them -----------------

def test_sglang_classify(server, batch):
    url, _ = server
    _, texts, expected = batch
    res = httpx.post(f"{url}/classify", json={"model": "internlm/POLAR-7B", "text": texts}, timeout=60)
    rewards = [e["embedding"][0] for e in res.json()]
    np.testing.assert_allclose(rewards, expected, rtol=0, atol=1e-5)


def test_sglang_classify_one_text_answers_one_object(server, batch):
    url, _ = server
    _, texts, expected = batch
    res = httpx.post(f"{url}/classify", json={"text": texts[0]}, timeout=60).json()
    assert isinstance(res, dict) and res["embedding"][0] == pytest.approx(expected[0], abs=1e-5)


def test_vllm_pooling(server, batch):
    url, _ = server
    _, texts, expected = batch
    res = httpx.post(f"{url}/pooling", json={"input": texts}, timeout=60)
    rewards = [e["data"][-1][0] for e in res.json()["data"]]
    np.testing.assert_allclose(rewards, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["/lmdeploy/pooling", "/pooling?format=lmdeploy"])
def test_lmdeploy_pooling(server, batch, path):
    url, _ = server
    _, texts, expected = batch
    res = httpx.post(f"{url}{path}", json={"input": texts}, timeout=60)
    rewards = [e["data"] for e in res.json()["data"]]
    np.testing.assert_allclose(rewards, expected, rtol=0, atol=1e-5)


def test_openrlhf_get_reward(server, batch, _alone_items):
    url, _ = server
    items, _, _ = batch
    sft = [it for it in items if it["wrapper"] == "sft" and isinstance(it["prompt"], str)]
    body = {"query": [it["prompt"] + it["output"] for it in sft], "prompts": [it["prompt"] for it in sft],
            "labels": [it["reference"] for it in sft]}
    res = httpx.post(f"{url}/get_reward", json=body, timeout=60).json()
    assert res["rewards"] == res["scores"] and res["extra_logs"] == {}
    np.testing.assert_allclose(res["rewards"], _alone_items(sft), rtol=0, atol=1e-5)


def test_openrlhf_get_reward_shards_of_one_rollout_over_several_servers(server, _alone_items):
    """OpenRLHF's --remote_rm_url URL1,URL2 splits each call's queries into one slice per server,
    ceil(n / servers) long, and it asks for one rollout at a time: every server after the first gets
    {"query": [], "prompts": [], "labels": []}. Answered 400, OpenRLHF retried it and then dropped the
    first server's reward with it (asyncio.gather), so a run with two replicas got no rewards."""
    url, _ = server
    item = {"prompt": "Q: hi A:", "reference": "yes", "output": " yes", "wrapper": "sft"}
    shards = [{"query": ["Q: hi A: yes"], "prompts": ["Q: hi A:"], "labels": ["yes"]},
              {"query": [], "prompts": [], "labels": []}]
    first, second = [httpx.post(f"{url}/get_reward", json=body, timeout=60) for body in shards]
    assert first.status_code == 200 and second.status_code == 200, second.text
    np.testing.assert_allclose(first.json()["rewards"], _alone_items([item]), rtol=0, atol=1e-5)
    assert second.json() == {"rewards": [], "scores": [], "extra_logs": {}}
    # empty, yet not a shard: the lists still must match
    res = httpx.post(f"{url}/get_reward", json={"query": [], "prompts": ["p"], "labels": []}, timeout=60)
    assert res.status_code == 400 and "must match" in res.json()["error"]["message"]


@pytest.fixture(scope="module")
def _alone_items(tokenizer, alone):
    return lambda items: alone([ids for _, ids in _formatted(tokenizer, items)])


def test_native_groups_of_outputs(server, batch, _alone_items):
    url, _ = server
    items, _, expected = batch
    body = {"items": [{"prompt": it["prompt"], "reference": it["reference"], "wrapper": it["wrapper"],
                       "outputs": [it["output"], "", it["output"] + " more"]} for it in items[:4]]}
    res = httpx.post(f"{url}/v1/rewards", json=body, timeout=60).json()
    flat = [dict(it, output=o) for it in items[:4] for o in (it["output"], "", it["output"] + " more")]
    got = [r for d in res["data"] for r in d["rewards"]]
    np.testing.assert_allclose(got, _alone_items(flat), rtol=0, atol=1e-5)
    assert res["usage"]["items"] == 12


def test_concurrent_clients_get_their_own_answers(server, tokenizer, _alone_items):
    url, service = server
    requests = [make_items(100 + i, groups=2, rollouts=3) for i in range(8)]
    expected = [_alone_items(r) for r in requests]

    async def run():
        async with reward.AsyncRewardClient(url, chunk_size=4) as client:
            return await asyncio.gather(*(client.score(r) for r in requests))

    before = service.batcher.totals.tokens - service.batcher.totals.computed
    got = asyncio.run(run())
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
    assert service.batcher.totals.tokens - service.batcher.totals.computed > before  # prefixes shared


def test_a_batch_over_the_servers_body_limit_is_halved_until_it_fits(scorer, tokenizer, _alone_items):
    """A server taking bodies of at most 20,000 bytes; 48 items that repeat a 500-byte reference make
    one of about 29 KB, which the client (its own budget, 32 MiB, is larger) sends whole, then in
    halves after the 413, and every reward is the item's own. (Its own server: the module's allows
    200,000 bytes, and items long enough to pass that cost minutes to score alone on a CPU.)"""
    reference = "a long reference trajectory " * 18
    items = [{"prompt": "question?", "reference": reference, "output": f"answer {i}", "wrapper": "sft"}
             for i in range(48)]
    expected = _alone_items(items)
    with live_server(scorer, tokenizer, max_items=64, max_body_bytes=20_000) as (url, service):
        for client_cls in (reward.RewardClient, reward.AsyncRewardClient):
            refused = _requests_refused_for_size(service)
            client = client_cls(url, chunk_size=64)
            got = client.score(items) if client_cls is reward.RewardClient else asyncio.run(client.score(items))
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
            assert _requests_refused_for_size(service) > refused  # the whole batch was sent, and refused


def _requests_refused_for_size(service) -> float:
    return sum(s.value for m in service.metrics.requests.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels.get("status") == "413")


def test_a_batch_over_the_servers_item_limit_is_halved_until_it_fits(server, _alone_items):
    """A server run with --max-items (64 here) below the client's chunk_size: the 413 naming
    --max-items is met by halving, as one over --max-body-bytes is (every call failed)."""
    url, service = server
    items = [{"prompt": "question?", "reference": "ref", "output": f"answer {i}", "wrapper": "sft"} for i in range(80)]
    for client_cls in (reward.RewardClient, reward.AsyncRewardClient):
        refused = _requests_refused_for_size(service)
        client = client_cls(url, chunk_size=100)
        got = client.score(items) if client_cls is reward.RewardClient else asyncio.run(client.score(items))
        np.testing.assert_allclose(got, _alone_items(items), rtol=0, atol=1e-5)
        assert _requests_refused_for_size(service) > refused


def test_verl_compute_score_batch_through_the_client(server, _alone_items):
    url, _ = server
    items = make_items(7, groups=2, rollouts=3)
    prompts = [it["prompt"] if isinstance(it["prompt"], list) else [{"role": "user", "content": it["prompt"]}]
               for it in items]
    solutions = [f"<think>scratch {i}</think>  " + it["output"] for i, it in enumerate(items)]
    got = reward.compute_score_batch(["polar"] * len(items), solutions, [it["reference"] for it in items],
                                     [{"prompt": p} for p in prompts], url=url, wrapper="sft")
    expected = _alone_items([dict(it, prompt=p, wrapper="sft", output=it["output"].strip())
                             for it, p in zip(items, prompts)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_openrlhf_reward_func(server, _alone_items):
    url, _ = server
    out = reward.reward_func(["Q: hi A: yes", "Q: hi A: "], ["Q: hi A:", "Q: hi A:"], ["yes", "yes"], url=url)
    expected = _alone_items([{"prompt": "Q: hi A:", "reference": "yes", "output": o, "wrapper": "sft"}
                             for o in (" yes", " ")])
    np.testing.assert_allclose(out["rewards"].numpy(), expected, rtol=0, atol=1e-5)
    # labels as /get_reward takes them: {"reference", "wrapper"}
    labels = [{"reference": "yes", "wrapper": "pretrain"}, {"reference": "yes"}]
    out = reward.reward_func(["Q: hi A: yes", "Q: hi A: "], ["Q: hi A:", "Q: hi A:"], labels, url=url)
    expected = _alone_items([{"prompt": "Q: hi A:", "reference": "yes", "output": " yes", "wrapper": "pretrain"},
                             {"prompt": "Q: hi A:", "reference": "yes", "output": " ", "wrapper": "sft"}])
    np.testing.assert_allclose(out["rewards"].numpy(), expected, rtol=0, atol=1e-5)


# ---- bad input: a 4xx that says what is wrong, and the server keeps serving ---------------------

@pytest.mark.parametrize("path,body,status,words", [
    ("/classify", b"{not json", 400, "not valid JSON"),
    ("/classify", b"", 400, "empty"),
    ("/classify", b"[1, 2]", 400, "must be a JSON object, got array"),
    ("/classify", b"null", 400, "must be a JSON object, got null"),
    ("/classify", b"3.5", 400, "must be a JSON object, got number"),
    ("/classify", b'"text"', 400, "must be a JSON object, got string"),
    ("/classify", {"text": [None]}, 400, "text[0] must be a string, got null"),
    ("/classify", {"model": "m"}, 400, "missing field 'text'"),
    ("/classify", {"text": [1]}, 400, "text[0] must be a string"),
    ("/classify", {"text": []}, 400, "empty batch"),
    ("/classify", {"text": ["a"] * 65}, 413, "--max-items"),
    ("/pooling", {"input": {"a": 1}}, 400, "array of strings"),
    ("/pooling?format=xml", {"input": ["a"]}, 400, "format must be one of"),
    ("/get_reward", {"query": ["ab"], "labels": ["r"]}, 400, "missing field 'prompts'"),
    ("/get_reward", {"query": ["ab"], "prompts": ["x"], "labels": ["r"]}, 400, "does not start with"),
    ("/get_reward", {"query": ["ab"], "prompts": ["a", "b"], "labels": ["r"]}, 400, "must match"),
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": "r"}]}, 400, "exactly one of 'output'"),
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": 3, "output": "o"}]}, 400, "items[0].reference"),
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": "r", "output": "o", "wrapper": "chat"}]}, 400, "wrapper"),
    ("/v1/rewards", {"items": [{"prompt": [{"role": "user"}], "reference": "r", "output": "o"}]}, 400,
     "items[0].prompt[0]: missing field 'content'"),
    ("/v1/rewards", {"items": [{"prompt": [{"role": "user", "content": 5}], "reference": "r", "output": "o"}]}, 400,
     "items[0].prompt[0].content must be a string, got number"),
    ("/v1/rewards", {"items": [{"prompt": ["hi"], "reference": "r", "output": "o"}]}, 400,
     "items[0].prompt[0] must be an object with a string 'content', got string"),
    ("/get_reward", {"query": ["ab"], "prompts": ["a"], "labels": [[{"role": "user", "content": 5}]]}, 400,
     "labels[0][0].content must be a string, got number"),
    ("/get_reward", {"query": ["ab"], "prompts": ["a"], "labels": [[{"role": "user", "content": None}]]}, 400,
     "labels[0][0].content must be a string, got null"),
    ("/v1/rewards", {"items": []}, 400, "empty batch"),
    ("/classify", {"text": ["x" * 250_000]}, 413, "--max-body-bytes"),
    ("/classify", b'{"text": ["ok", "abc \\ud800 def"]}', 400, "text[1] holds a lone surrogate"),
    ("/classify", b'{"input": ["\\udc00"]}', 400, "input[0] holds a lone surrogate"),
    ("/pooling", b'{"input": ["a"], "model": "m\\ud800"}', 400, "field 'model' holds a lone surrogate"),
    ("/v1/rewards", b'{"items": [{"prompt": [{"role": "user", "content": "\\ud800"}], "reference": "r", '
                    b'"output": "o"}]}', 400, "items[0].prompt[0].content holds a lone surrogate"),
    ("/get_reward", b'{"query": ["ab"], "prompts": ["a"], "labels": ["\\ud800"]}', 400,
     "labels[0] holds a lone surrogate"),
    ("/classify", b"[" * 50_000 + b"]" * 50_000, 400, "nested too deeply"),
    ("/classify", b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "nested too deeply"),
    ("/classify", b'{"text": ["a"]} x', 400, "not valid JSON"),
    ("/classify", b'{"text": ["a",]}', 400, "not valid JSON"),
    ("/v1/rewards", b'{"items": [{"prompt": "p", "reference": "r", "output": "o", "output": "x"}]}', 400,
     'the key "output" twice in one object (inside "items"[0])'),
    ("/classify", b'{"text": ["a"], "text": ["b", "c"]}', 400, 'the key "text" twice in one object:'),
    # OpenRLHF without --label_key: every rollout would be scored against no reference
    ("/get_reward", {"query": ["pa"], "prompts": ["p"], "labels": [""]}, 400,
     "labels[0]: the reference is empty; OpenRLHF sends an empty label when --label_key is not set"),
    ("/get_reward", {"query": ["pa"], "prompts": ["p"], "labels": [{"reference": [{"content": ""}]}]}, 400,
     "labels[0]: the reference is empty"),
])
def test_bad_requests_get_a_clear_4xx(server, path, body, status, words):
    url, _ = server
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    res = httpx.post(f"{url}{path}", timeout=30, **kw)
    assert res.status_code == status, res.text
    assert words in res.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200



@pytest.mark.parametrize("method,path,status,words", [
    ("POST", "/v1/reward", 404, "POST /v1/reward: Not Found; this server answers GET /health, GET /metrics, "
                                "POST /classify"),
    ("GET", "/classify", 405, "GET /classify: Method Not Allowed; this server answers"),
])
def test_an_unknown_path_or_method_answers_the_documented_error_shape(server, method, path, status, words):
    """Both answered FastAPI's {"detail": ...}, where every other error is {"error": {"message", ...}}."""
    url, _ = server
    res = httpx.request(method, f"{url}{path}", json={"text": ["a"]}, timeout=30)
    assert res.status_code == status
    assert words in res.json()["error"]["message"] and res.json()["error"]["code"] == status
    assert status != 405 or res.headers["allow"] == "POST"

def test_a_compressed_body_is_refused_naming_its_content_encoding(server):
    """A body sent gzip-compressed (Content-Encoding: gzip) was read as JSON text and refused as
    "not valid utf-8 ... at byte 1", which points at the text, not at the compression."""
    import gzip

    url, _ = server
    body = json.dumps({"text": ["<|reward|>a[UNUSED_TOKEN_130]"]}).encode()
    res = httpx.post(f"{url}/classify", content=gzip.compress(body), timeout=30,
                     headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert res.status_code == 415, res.text
    assert "Content-Encoding gzip" in res.json()["error"]["message"]
    res = httpx.post(f"{url}/classify", content=body, timeout=30, headers={"Content-Encoding": "identity"})
    assert res.status_code == 200, res.text


def test_metrics_report_traffic(server, batch):
    url, _ = server
    httpx.post(f"{url}/classify", json={"text": batch[1][:4]}, timeout=60)
    text = httpx.get(f"{url}/metrics").text
    for name in ("polar_serve_requests_total", "polar_serve_items_total", "polar_serve_prefix_tokens_saved_total",
                 "polar_serve_batch_items_bucket", "polar_serve_queue_items", "polar_serve_request_seconds_bucket"):
        assert name in text
    assert 'polar_serve_requests_total{endpoint="classify",status="200"}' in text


# ---- limits: queue, timeout, auth ------------------------------------------------------------

def test_full_queue_answers_429_and_the_client_retries(scorer, tokenizer):
    """The batcher's one worker is held inside a round, so the queue stays full for as long as the
    test needs: no race with the batching window, however slow the machine."""
    gate, rounds = threading.Event(), []

    def held(batch):
        rounds.append(batch)
        gate.wait(60)
        return scorer.score(batch)

    with live_server(scorer, tokenizer, score=held, batcher_kw=dict(max_queue_items=4)) as (url, service):
        texts = ["<|reward|>a[UNUSED_TOKEN_130]"] * 3
        answers = {}

        def post(key, n):
            answers[key] = httpx.post(f"{url}/classify", json={"text": texts[:1] * n}, timeout=60)

        running = threading.Thread(target=post, args=("running", 1))
        running.start()
        assert _until(lambda: rounds)  # its round holds the worker
        queued = threading.Thread(target=post, args=("queued", 6))  # more than the limit: alone, it is taken
        queued.start()
        assert _until(lambda: service.batcher.queued_items == 6)
        busy = httpx.post(f"{url}/classify", json={"text": texts}, timeout=60)
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
        assert "queue is full" in busy.json()["error"]["message"]
        # the queue is full: refused before its body is read, not even parsed
        assert httpx.post(f"{url}/classify", content=b"{not json", timeout=60).status_code == 429
        # polar.reward is refused too, waits Retry-After, and gets the answer once the queue drains
        got, client = {}, reward.RewardClient(url, backoff_s=0.05)
        retrying = threading.Thread(target=lambda: got.update(r=client.score(
            [{"prompt": "p", "reference": "r", "output": str(i)} for i in range(3)])))
        refusals = lambda: service.metrics.registry.get_sample_value("polar_serve_rejected_total")  # noqa: E731
        before = refusals()
        retrying.start()
        assert _until(lambda: refusals() > before)
        gate.set()
        for t in (running, queued, retrying):
            t.join(60)
        assert answers["running"].status_code == 200 and len(answers["running"].json()) == 1
        assert answers["queued"].status_code == 200 and len(answers["queued"].json()) == 6
        assert len(got["r"]) == 3


def test_request_timeout_is_504_and_the_server_lives_on(scorer, tokenizer):
    with live_server(scorer, tokenizer, timeout_s=0.2, batcher_kw=dict(max_wait_s=1.0)) as (url, _):
        res = httpx.post(f"{url}/classify", json={"text": ["a"]}, timeout=30)
        assert res.status_code == 504 and "--timeout-s" in res.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_bearer_auth(scorer, tokenizer):
    with live_server(scorer, tokenizer, api_key="s3cret") as (url, _):
        assert httpx.post(f"{url}/classify", json={"text": ["a"]}, timeout=60).status_code == 401
        bad = httpx.post(f"{url}/classify", json={"text": ["a"]}, headers={"Authorization": "Bearer nope"}, timeout=60)
        assert bad.status_code == 401
        ok = httpx.post(f"{url}/classify", json={"text": ["a"]}, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        assert reward.RewardClient(url, api_key="s3cret").score([{"prompt": "p", "reference": "r", "output": "o"}])


def test_with_a_key_only_health_answers_without_it(scorer, tokenizer):
    """/health is open on purpose (load balancers and Kubernetes probes carry no credentials); every
    other route, present or added later, needs the key."""
    from polar.serve.app import create_app

    with live_server(scorer, tokenizer, api_key="s3cret") as (url, service):
        routes = [(m, r.path) for r in create_app(service).routes for m in getattr(r, "methods", ()) if m != "HEAD"]
        assert {p for _, p in routes} >= {"/health", "/metrics", "/classify", "/pooling", "/vllm/pooling",
                                          "/lmdeploy/pooling", "/get_reward", "/v1/rewards"}
        for method, path in routes:
            res = httpx.request(method, f"{url}{path}", json={}, timeout=60)
            if path == "/health":
                assert res.status_code == 200 and res.json()["status"] == "ok"
            else:
                assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer", (method, path)
                assert "bearer token" in res.json()["error"]["message"]


def _until(condition, limit_s=20.0) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_client_that_gave_up_is_not_scored(scorer, tokenizer):
    """POLAR's client gives up after 30 s and sends the batch again: the abandoned copy must leave
    the queue, not be scored once per attempt."""
    gate, rounds = threading.Event(), []

    def held(batch):
        rounds.append(batch)
        gate.wait(60)
        return scorer.score(batch)

    with live_server(scorer, tokenizer, score=held) as (url, service):
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(f"{url}/classify", json={"text": ["a", "b"]},
                                                                           timeout=60)))
        t.start()
        assert _until(lambda: rounds)  # the first request's round is running, held
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/classify", json={"text": ["c", "d", "e"]}, timeout=0.5)
        noticed = _until(lambda: service.batcher.queued_items == 0, 10)
        gate.set()
        t.join(60)
        assert first["r"].status_code == 200
        time.sleep(0.3)
        assert noticed and service.batcher.totals.items == 2
        assert 'polar_serve_requests_total{endpoint="classify",status="499"} 1.0' in httpx.get(f"{url}/metrics").text


def test_requests_beyond_max_preparing_are_refused_before_their_body_is_read(scorer, tokenizer):
    with live_server(scorer, tokenizer, max_preparing=1, preparing_wait_s=0.5) as (url, _):
        body = json.dumps({"text": ["a"]}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            slow.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
            assert _until(lambda: httpx.get(f"{url}/health").json()["preparing"] == 1)
            busy = httpx.post(f"{url}/classify", json={"text": ["b"]}, timeout=30)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert "--max-preparing" in busy.json()["error"]["message"] and "within 0.5 s" in busy.text
            slow.sendall(body[5:])
            assert slow.recv(65536).startswith(b"HTTP/1.1 200")
        assert _until(lambda: httpx.get(f"{url}/health").json()["preparing"] == 0)
        assert httpx.post(f"{url}/classify", json={"text": ["b"]}, timeout=30).status_code == 200


def test_a_burst_of_small_requests_waits_for_a_preparing_slot_instead_of_429(scorer, tokenizer):
    """OpenRLHF asks /get_reward for one rollout at a time, all at once (aiohttp, 5 tries 1 s apart,
    then the reward is dropped): 400 such requests got 368 429s at --max-preparing 32 with the queue
    nearly empty, since each slot is held for a millisecond and the burst arrives within one."""
    async def burst(url, n):
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n)) as c:
            bodies = [{"query": [f"Q{k}: A: yes"], "prompts": [f"Q{k}: A:"], "labels": ["yes"]} for k in range(n)]
            return await asyncio.gather(*(c.post(f"{url}/get_reward", json=b, timeout=60) for b in bodies))

    with live_server(scorer, tokenizer, max_preparing=2) as (url, service):
        answers = asyncio.run(burst(url, 60))
        assert [r.status_code for r in answers] == [200] * 60, [r.text for r in answers if r.status_code != 200][:2]
        assert service.preparing == 0


def test_a_large_body_does_not_stall_the_event_loop(scorer, tokenizer, monkeypatch):
    """/health requests are answered while the server parses a 61 MB body. Counted, not timed: a
    parse that held the GIL throughout (json.loads) or ran on the event loop lets no request start
    and finish inside its window, however fast or loaded the machine is."""
    from polar.serve import validation

    body = json.dumps({"model": 5, "text": ["ab\"cd\n" * 2000] * 4000}).encode()  # 61 MB
    windows, parse_json = [], validation.parse_json

    def timed_parse(b):
        t = time.perf_counter()
        try:
            return parse_json(b)
        finally:
            windows.append((t, time.perf_counter()))

    monkeypatch.setattr(validation, "parse_json", timed_parse)
    with live_server(scorer, tokenizer) as (url, _):
        probes, done = [], threading.Event()

        def probe():
            with httpx.Client(timeout=60) as c:
                while not done.is_set():
                    t = time.perf_counter()
                    c.get(f"{url}/health")
                    probes.append((t, time.perf_counter()))
                    time.sleep(0.005)

        t = threading.Thread(target=probe)
        t.start()
        res = httpx.post(f"{url}/classify", content=body, timeout=120)
        done.set()
        t.join(60)
    assert res.status_code == 400 and "'model' must be a string" in res.text  # parsed in full, then refused
    (start, end), = windows
    inside = sum(start <= a and b <= end for a, b in probes)
    assert inside >= 3, (inside, end - start, len(probes))  # 14-51 here, loaded or not; json.loads: 0


def test_max_item_tokens_bounds_formatted_texts_and_not_structured_items(scorer, tokenizer, _alone_items):
    """Structured items are bounded by POLAR's truncation (--max-length), as `polar score` bounds
    them; --max-item-tokens is for the already-formatted texts of /classify and /pooling."""
    with live_server(scorer, tokenizer, max_item_tokens=300) as (url, _):
        items = [{"prompt": "p", "reference": "r", "output": o, "wrapper": "sft"} for o in ("short", "o" * 400)]
        expected = _alone_items(items)
        body = {"items": [{"prompt": "p", "reference": "r", "outputs": ["short", "o" * 400]}]}
        res = httpx.post(f"{url}/v1/rewards", json=body, timeout=60)
        assert res.status_code == 200, res.text
        np.testing.assert_allclose(res.json()["data"][0]["rewards"], expected, rtol=0, atol=1e-5)
        res = httpx.post(f"{url}/get_reward", json={"query": ["p" + "o" * 400], "prompts": ["p"], "labels": ["r"]},
                         timeout=60)
        assert res.status_code == 200, res.text
        np.testing.assert_allclose(res.json()["rewards"], expected[1:], rtol=0, atol=1e-5)
        text = _formatted(tokenizer, items[1:])[0][0]
        for path, key in (("/classify", "text"), ("/pooling", "input")):
            res = httpx.post(f"{url}{path}", json={key: ["ok", text]}, timeout=60)
            assert res.status_code == 413, res.text
            message = res.json()["error"]["message"]
            assert f"{key}[1] is" in message and "--max-item-tokens" in message, message


def test_a_truncation_cut_inside_a_character_is_scored_as_polar_score_scores_it(dynamic_scorer, tokenizer,
                                                                                alone_dynamic):
    """POLAR's truncation keeps a prompt's last tokens: a cut inside a UTF-8 character leaves bytes
    that decode to U+FFFD, 3 bytes each, so the item ends longer than max_length + 1 (here 256 >
    251), yet within the model's 256 positions; `polar score` scores it, and so does the server."""
    item = {"prompt": "x" + "\u4e2d" * 100, "reference": "reference", "output": "\u00e9" * 10}
    (_, ids), = format_structured(tokenizer, [StructuredItem(**item)], 250, 64)
    assert 250 + 1 < len(ids) <= 256
    with live_server(dynamic_scorer, tokenizer, max_length=250, max_response=64, max_item_tokens=251) as (url, _):
        res = httpx.post(f"{url}/v1/rewards", json={"items": [item]}, timeout=60)
        assert res.status_code == 200, res.text
        np.testing.assert_allclose(res.json()["data"][0]["reward"], alone_dynamic([ids])[0], rtol=0, atol=1e-5)
        body = {"query": [item["prompt"] + item["output"]], "prompts": [item["prompt"]], "labels": [item["reference"]]}
        res = httpx.post(f"{url}/get_reward", json=body, timeout=60)
        assert res.status_code == 200, res.text
        np.testing.assert_allclose(res.json()["rewards"], alone_dynamic([ids]), rtol=0, atol=1e-5)


def _cut_counts(url):
    text = httpx.get(f"{url}/metrics").text
    return {f: float(re.search(rf'polar_serve_truncated_total{{field="{f}"}} (\S+)', text).group(1))
            for f in ("output", "reference", "prompt")}


def test_metrics_count_what_polar_truncation_cut(dynamic_scorer, tokenizer):
    """A reward read from an output cut to its head never saw its end: /metrics says how often."""
    with live_server(dynamic_scorer, tokenizer, max_length=250, max_response=64) as (url, _):
        assert _cut_counts(url) == {"output": 0, "reference": 0, "prompt": 0}
        items = [{"prompt": "p", "reference": "r", "output": "o" * 100},  # output: 101 ids > 64
                 {"prompt": "q" * 300, "reference": "r" * 64, "output": "o"},  # reference: 65 ids; prompt
                 {"prompt": "p" * 10, "reference": "r" * 63, "output": "o" * 63}]  # 64 ids each: kept whole
        res = httpx.post(f"{url}/v1/rewards", json={"items": items}, timeout=60)
        assert res.status_code == 200, res.text
        assert _cut_counts(url) == {"output": 1, "reference": 1, "prompt": 1}
        body = {"query": ["p" + "o" * 100], "prompts": ["p"], "labels": ["r"]}  # OpenRLHF's form
        assert httpx.post(f"{url}/get_reward", json=body, timeout=60).status_code == 200
        assert _cut_counts(url) == {"output": 2, "reference": 1, "prompt": 1}


def test_a_stalled_body_gets_408_and_frees_its_slot(scorer, tokenizer):
    """A client that sends its headers and part of its body, then nothing (a hung worker, a stuck
    proxy), must not hold its --max-preparing slot: with one slot, every other request would get
    429 for as long as that connection stays open."""
    with live_server(scorer, tokenizer, max_preparing=1, read_timeout_s=0.5) as (url, _):
        body = json.dumps({"text": ["a"]}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as stalled:
            stalled.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                got = stalled.recv(65536)
                if not got:
                    break
                answer += got
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"--read-timeout-s" in answer
            assert _until(lambda: httpx.get(f"{url}/health").json()["preparing"] == 0)
            # the stalled connection is still open on this side: the slot is free all the same
            res = httpx.post(f"{url}/classify", json={"text": ["b"]}, timeout=30)
            assert res.status_code == 200, res.text
        assert 'polar_serve_requests_total{endpoint="classify",status="408"} 1.0' in httpx.get(f"{url}/metrics").text


def test_settings_that_leave_the_prompt_unbounded_are_refused(tokenizer):
    from polar.serve.app import ServeSettings, Service
    from polar.serve.batcher import Batcher
    from polar.serve.metrics import Metrics

    def service(max_length, max_response):
        return Service(tokenizer, Batcher(lambda b: None, tokenizer.pad_id), ServeSettings(
            max_length=max_length, max_response=max_response, max_item_tokens=max_length + 1), Metrics())

    with pytest.raises(ValueError, match=r"--max-length.*8198"):
        service(8192, 4096)
    svc = service(8198, 4096)
    prompt = StructuredItem(prompt="p" * 100_000, reference="r" * 5000, output="o" * 5000)
    assert len(svc.items_to_ids([prompt], ["items[0].output"])[0]) <= 8199


def test_a_round_that_fails_fails_only_its_own_request(scorer, tokenizer, alone):
    poison, calls, gate = ord("~"), [], threading.Event()  # the byte tokenizer: one id per character

    def picky(batch):
        calls.append(batch)
        if len(calls) == 1:
            gate.wait(60)  # the first round holds the worker while the two requests queue up
        if (batch.tokens == poison).any():
            raise RuntimeError("this batch cannot be scored")
        return scorer.score(batch)

    with live_server(scorer, tokenizer, score=picky) as (url, service):
        texts = ["<|reward|>a[UNUSED_TOKEN_130]", "<|reward|>b[UNUSED_TOKEN_130]"]
        answers = {}

        def post(name, text):
            answers[name] = httpx.post(f"{url}/classify", json={"text": text}, timeout=60)

        first = threading.Thread(target=post, args=("first", ["<|reward|>c[UNUSED_TOKEN_130]"]))
        first.start()
        assert _until(lambda: calls)
        threads = [threading.Thread(target=post, args=a) for a in (("good", texts), ("bad", ["~~~"]))]
        for t in threads:
            t.start()
        assert _until(lambda: service.batcher.queued_items == 3)
        gate.set()
        for t in (first, *threads):
            t.join(60)
    calls = calls[1:]  # the rounds after the one that held the worker
    assert (calls[0].tokens == poison).any() and calls[0].reward_index.numel() == 3  # one round for both
    assert answers["bad"].status_code == 500 and "cannot be scored" in answers["bad"].text
    assert answers["good"].status_code == 200
    np.testing.assert_allclose([e["embedding"][0] for e in answers["good"].json()],
                               alone(tokenizer.encode_served_batch(texts)), rtol=0, atol=1e-5)


def test_non_finite_rewards_are_refused_naming_the_items(scorer, tokenizer):
    """NaN or inf is not a reward: JSON cannot carry it, and a trainer would take it as one. The
    request gets a 500 naming its items, which POLAR's client does not retry (the same items overflow
    again); a request scored in the same server stays answered."""
    poison = ord("~")
    poisoned = []

    def overflowing(batch):
        rewards = scorer.score(batch)
        if (batch.tokens == poison).any():
            poisoned.append(1)
            return np.full_like(rewards, np.nan)
        return rewards

    with live_server(scorer, tokenizer, score=overflowing) as (url, _):
        texts = ["<|reward|>~a[UNUSED_TOKEN_130]", "<|reward|>~[UNUSED_TOKEN_130]", "<|reward|>b~[UNUSED_TOKEN_130]"]
        res = httpx.post(f"{url}/classify", json={"text": texts}, timeout=60)
        assert res.status_code == 500, res.text
        message = res.json()["error"]["message"]
        assert "non-finite rewards (nan) for 3 of the 3 items (text[0], text[1], text[2])" in message
        ok = httpx.post(f"{url}/classify", json={"text": ["<|reward|>a[UNUSED_TOKEN_130]"]}, timeout=60)
        assert ok.status_code == 200 and np.isfinite(ok.json()[0]["embedding"][0])

        poisoned.clear()
        client = reward.RewardClient(url, max_retries=3, backoff_s=0.05)
        with pytest.raises(reward.RewardServerError, match="non-finite rewards") as err:
            client.score([{"prompt": "p", "reference": "r", "output": "~"}])
        assert err.value.status == 500 and len(poisoned) == 1  # one request, no retries


def test_non_finite_rewards_name_the_items_as_the_request_and_the_call_number_them(scorer, tokenizer):
    """The message names the item by where it is in the request (items[1] of /v1/rewards, not its
    place among the flattened outputs), so that the client renumbers it for a call sent in chunks."""
    poison = ord("~")

    def overflowing(batch):  # one item per row (no sharing, no packing): inf for the poisoned rows only
        rewards = np.array(scorer.score(batch))
        rewards[(batch.tokens == poison).any(dim=1).numpy()] = np.inf
        return rewards

    kw = dict(share_prefixes=False, pack_rows=False)
    with live_server(scorer, tokenizer, score=overflowing, batcher_kw=kw) as (url, _):
        body = {"items": [{"prompt": "p", "reference": "r", "outputs": ["a", "b"]},
                          {"prompt": "p", "reference": "r", "output": "~"}]}
        res = httpx.post(f"{url}/v1/rewards", json=body, timeout=60)
        assert res.status_code == 500 and "for 1 of the 3 items (items[1])" in res.json()["error"]["message"]
        body = {"query": ["pa", "p~"], "prompts": ["p", "p"], "labels": ["r", "r"]}
        res = httpx.post(f"{url}/get_reward", json=body, timeout=60)
        assert res.status_code == 500 and "(query[1])" in res.json()["error"]["message"]
        items = [{"prompt": "p", "reference": "r", "output": o} for o in ("a", "b", "c", "~")]
        for client_cls in (reward.RewardClient, reward.AsyncRewardClient):
            client = client_cls(url, chunk_size=2)
            with pytest.raises(reward.RewardServerError, match=r"\(items\[3\]\)"):
                client.score(items) if client_cls is reward.RewardClient else asyncio.run(client.score(items))


def test_a_tokenizer_other_than_the_checkpoints_is_refused_at_start_up(scorer, tmp_path):
    """`polar serve --tokenizer DIR` on a byte-tokenized model: refused by what the checkpoint was
    trained with (polar.checkpoint_tokenizer.choose), before any size comparison; the checkpoint's
    own tokenizer, named or found, is taken."""
    from polar.serve.server import build_service, parse_args
    from tests.polar.test_tokenizer import train_bpe

    bpe = train_bpe(tmp_path / "bpe")
    ckpt = str(scorer.info.step_dir)
    with pytest.raises(ValueError, match=r"--tokenizer .*bpe: .* was trained with the byte tokenizer, which gives "
                                         r"other ids; leave --tokenizer out"):
        build_service(parse_args(["--checkpoint", ckpt, "--tokenizer", bpe]), scorer)
    for named in ([], ["--tokenizer", "byte"]):
        service = build_service(parse_args(["--checkpoint", ckpt, *named]), scorer)  # its batcher not started
        assert service.tokenizer.vocab_size == 260


def test_requests_still_queued_at_the_graceful_timeout_are_not_scored_after_it(scorer, tokenizer):
    """uvicorn cancels the requests still in flight when --graceful-timeout-s runs out; their items
    must leave the queue then, not be scored for nobody by the batcher's close() while the process
    should be exiting (torchrun and SLURM kill it soon after)."""
    import uvicorn

    from polar.serve.app import ServeSettings, Service, create_app
    from polar.serve.batcher import Batcher
    from polar.serve.metrics import Metrics

    rounds, gate = [], threading.Event()

    def slow(batch):
        rounds.append(batch)
        gate.wait(60)  # the first round holds the worker until every request has queued
        time.sleep(0.5)
        return scorer.score(batch)

    # a budget of 4 x 8 tokens: every request (43 tokens) is a round of its own
    batcher = Batcher(slow, tokenizer.pad_id, max_wait_s=0.0, max_batch_tokens=8, row_tokens=1024,
                      max_positions=scorer.max_positions)
    service = Service(tokenizer, batcher, ServeSettings(), Metrics())
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="critical",
                                           timeout_graceful_shutdown=0.5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert _until(lambda: server.started)
    url = "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]

    def post(i):
        try:
            httpx.post(f"{url}/classify", json={"text": [f"<|reward|>{i}{'x' * 40}[UNUSED_TOKEN_130]"]}, timeout=60)
        except httpx.HTTPError:
            pass  # cancelled at the graceful timeout: the connection closes unanswered

    clients = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for c in clients:
        c.start()
    assert _until(lambda: rounds and batcher.queued_items == 7)
    gate.set()
    server.should_exit = True
    thread.join(60)
    for c in clients:
        c.join(60)
    assert not thread.is_alive()
    assert len(rounds) <= 3, len(rounds)  # the one running, the one started within the 0.5 s; 8 without the fix
