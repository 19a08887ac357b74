"""Real clients against the live server on loopback: POLAR's reward client's requests to /classify
and /pooling (sglang, vllm, lmdeploy), OpenRLHF's /get_reward, the native /v1/rewards, verl's
compute_score_batch through polar.reward; rewards equal each item scored alone (fp32, 1e-5)."""
import asyncio
import json
import re
import socket

import httpx
import numpy as np
import pytest

from polar import reward
from polar.serve.items import StructuredItem, format_structured

from .conftest import live_server, served
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


@pytest.mark.parametrize("ref", ["", "   ", [{"role": "assistant", "content": ""}]])
def test_an_empty_reference_is_refused_on_every_path(server, ref):
    """verl's hooks scored a rollout against an empty ground truth (-7.65 for "", -8.09 for "   ", no
    error) and /v1/rewards answered 200, while OpenRLHF's hooks refused an empty label: a dataset
    without its references would train a whole run against nothing. Every path refuses it now,
    naming the item, before anything is scored."""
    url, service = server
    before = service.batcher.totals.items
    with pytest.raises(ValueError, match=r"^ground_truth: the reference is empty.*reward_model\.ground_truth"):
        reward.compute_score("ds", "The answer is 4.", ref, {"prompt": "What is 2+2?"}, url=url)
    with pytest.raises(ValueError, match=r"^ground_truths\[1\]: the reference is empty"):
        reward.compute_score_batch(["ds"] * 2, ["4", "5"], ["4", ref], [{"prompt": "q"}] * 2, url=url)
    with pytest.raises(ValueError, match=r"^labels\[0\]: the reference is empty"):
        reward.reward_func(["q a"], ["q"], [ref], url=url)
    # the client's own items, sent in chunks: named by the item's index in the call
    items = [{"prompt": "p", "reference": ref, "output": "o"}]
    with reward.RewardClient(url, chunk_size=2) as client:
        with pytest.raises(reward.RewardServerError, match=r"400: items\[3\]\.reference: the reference is empty"):
            client.score([{"prompt": "p", "reference": "r", "output": "o"}] * 3 + items)
        before += 2  # the first chunk, which the server scored
        with pytest.raises(reward.RewardServerError, match=r"400: items\[0\]\.reference: the reference is empty"):
            client.score(items)
    assert service.batcher.totals.items == before


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
    # OpenRLHF without --data.label_key (--label_key before April 2026): every rollout would be scored against no
    # reference; the message named only the old flag, which today's OpenRLHF refuses
    ("/get_reward", {"query": ["pa"], "prompts": ["p"], "labels": [""]}, 400,
     "labels[0]: the reference is empty; OpenRLHF sends an empty label when --data.label_key (--label_key before "
     "April 2026) is not set"),
    ("/get_reward", {"query": ["pa"], "prompts": ["p"], "labels": [{"reference": [{"content": ""}]}]}, 400,
     "labels[0]: the reference is empty"),
    ("/get_reward", {"query": ["pa"], "prompts": ["p"], "labels": [" \n"]}, 400,
     "labels[0]: the reference is empty (only whitespace)"),
    # the native endpoint scored an output against an empty reference (verl's empty ground truth): 200
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": "r", "output": "o"},
                               {"prompt": "p", "reference": "", "output": "o"}]}, 400,
     "items[1].reference: the reference is empty; POLAR scores each output against the reference trajectory"),
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": "   ", "outputs": ["o"]}]}, 400,
     "items[0].reference: the reference is empty (only whitespace)"),
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": [{"role": "assistant", "content": ""}] * 2,
                                "output": "o"}]}, 400, "items[0].reference: the reference is empty (only whitespace)"),
    # the reward is read at the last token: one after the reward token (or none at all) was scored silently
    ("/classify", {"text": [served("a"), served("b") + "\n"]}, 400,
     "text[1] does not end with the reward token [UNUSED_TOKEN_130] (it ends 'rd|>b[UNUSED_TOKEN_130]\\n')"),
    ("/classify", {"text": "<|reward|>a"}, 400, "text[0] does not end with the reward token [UNUSED_TOKEN_130]"),
    ("/pooling", {"input": ["a"]}, 400, "input[0] does not end with the reward token [UNUSED_TOKEN_130]"),
    ("/lmdeploy/pooling", {"input": [served("a"), served("b") + " "]}, 400, "input[1] does not end with the reward"),
    ("/classify", {"input": [""]}, 400, "input[0] does not end with the reward token"),
    # both SGLang's 'text' and 'input': 'text' was scored and 'input' ignored
    ("/classify", {"text": [served("a")], "input": [served("b")]}, 400,
     "give the texts in 'text' (SGLang's field) or in 'input', not both"),
    # a near miss of a field the endpoint reads was ignored: "missing field", or scored without it
    ("/classify", {"texts": [served("a")]}, 400, "unknown field 'texts': did you mean 'text'? (fields other than"),
    ("/pooling", {"Input": [served("a")]}, 400, "unknown field 'Input': did you mean 'input'?"),
    ("/get_reward", {"query": ["pa"], "prompt": ["p"], "labels": ["r"]}, 400,
     "unknown field 'prompt': did you mean 'prompts'?"),
    ("/v1/rewards", {"itmes": [{"prompt": "p", "reference": "r", "output": "o"}]}, 400,
     "unknown field 'itmes': did you mean 'items'?"),
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": "r", "output": "o"}], "modle": "m"}, 400,
     "unknown field 'modle': did you mean 'model'?"),
    # a wrapper beside the items, not in them: each item was scored as sft, silently
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": "r", "output": "o"}], "wrapper": "pretrain"}, 400,
     "field 'wrapper' belongs in each item (items[i].wrapper): beside the items it would be ignored"),
    ("/get_reward", {"query": ["pa"], "prompts": ["p"], "labels": ["r"], "wrapper": "pretrain"}, 400,
     """field 'wrapper' belongs in each label ({"reference": ..., "wrapper": ...}): beside the labels"""),
])
def test_bad_requests_get_a_clear_4xx(server, path, body, status, words):
    url, _ = server
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    res = httpx.post(f"{url}{path}", timeout=30, **kw)
    assert res.status_code == status, res.text
    assert words in res.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200



@pytest.mark.parametrize("path,body", [
    ("/classify", {"text": [served("a")], "model": "m", "rid": "r1", "dimensions": 1}),  # SGLang's own fields
    ("/pooling", {"input": [served("a")], "encoding_format": "float", "user": "u", "truncate_prompt_tokens": -1,
                  "priority": 0}),  # vLLM's
    ("/get_reward", {"query": ["pa"], "prompts": ["p"], "labels": ["r"], "prompt_ids": [], "model": "m"}),
    ("/v1/rewards", {"items": [{"prompt": "p", "reference": "r", "output": "o"}], "user": "u", "request_id": "x"}),
])
def test_fields_an_endpoint_does_not_read_are_ignored_unless_a_near_miss(server, path, body):
    url, _ = server
    res = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert res.status_code == 200, res.text


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

def test_head_answers_as_get_without_a_body(server):
    """HEAD /health was 405 (FastAPI's GET routes take no HEAD), and load balancers' checks may send it."""
    url, _ = server
    for path in ("/health", "/metrics"):
        get, head = httpx.get(f"{url}{path}", timeout=30), httpx.head(f"{url}{path}", timeout=30)
        assert (head.status_code, head.content) == (200, b""), (path, head.status_code)
        assert head.headers["content-type"] == get.headers["content-type"]


@pytest.mark.parametrize("length", [b"abc", b"-5"])
def test_a_request_that_is_not_http_is_answered_in_the_error_shape(server, length):
    """uvicorn answered a malformed Content-Length with plain text "Invalid HTTP request received."."""
    from .test_app_failures import _answer_of

    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}")
        head, body = _answer_of(conn).split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"content-type: application/json" in head, head
        assert json.loads(body)["error"] == {"message": "the request is not valid HTTP/1.1: bad Content-Length",
                                             "type": "invalid_request_error", "code": 400}
        assert conn.recv(1) == b""  # closed
    assert httpx.get(f"{url}/health").status_code == 200


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
            res = httpx.post(f"{url}{path}", json={key: [served("ok"), text]}, timeout=60)
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
