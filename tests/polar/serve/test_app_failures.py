"""The live server on loopback under load and failure: a full queue (429, the client retries), a
request timeout (504), bearer auth, a client that gave up, the --max-reading-bytes, --max-preparing
and --max-waiting limits, a client that leaves while waiting, a body over --max-body-bytes, a large body that must
not stall the event loop, a stalled body (408), a failing round, non-finite rewards, start-up
refusals and the graceful timeout (503)."""
import asyncio
import contextlib
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from polar import reward
from polar.serve.admission import MIN_BODY_CHARGE
from polar.serve.items import StructuredItem

from .conftest import live_server, served


# ---- limits: queue, timeout, auth ------------------------------------------------------------

def held_rounds(scorer):
    """-> (gate, rounds, score): `score` records each round's batch in `rounds` and holds the
    batcher's one worker inside it until `gate` is set."""
    gate, rounds = threading.Event(), []

    def held(batch):
        rounds.append(batch)
        gate.wait(60)
        return scorer.score(batch)

    return gate, rounds, held


def test_full_queue_answers_429_and_the_client_retries(scorer, tokenizer):
    """The batcher's one worker is held inside a round, so the queue stays full for as long as the
    test needs: no race with the batching window, however slow the machine."""
    gate, rounds, held = held_rounds(scorer)
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


def test_the_client_waits_out_a_full_queue_longer_than_its_retries(scorer, tokenizer):
    """Under a sustained overload (48 threads of 8 items against --max-queue 16) every attempt was
    answered 429 at once and the client raised after max_retries of them, ~10 s, failing the RL
    step: a 429 is now retried for max_wait_s in all. Here the queue stays full for three refusals
    of a client allowed one retry."""
    gate, rounds, held = held_rounds(scorer)
    with live_server(scorer, tokenizer, score=held, batcher_kw=dict(max_queue_items=2)) as (url, service):
        running = threading.Thread(target=lambda: httpx.post(f"{url}/classify", json={"text": [served("a")] * 2},
                                                             timeout=60))
        running.start()
        assert _until(lambda: rounds)
        queued = threading.Thread(target=lambda: httpx.post(f"{url}/classify", json={"text": [served("b")] * 2},
                                                            timeout=60))
        queued.start()
        assert _until(lambda: service.batcher.queued_items == 2)  # full
        got, client = {}, reward.RewardClient(url, max_retries=1, backoff_s=0.01)

        def score():
            try:
                got["r"] = client.score([{"prompt": "p", "reference": "r", "output": "o"}])
            except Exception as e:
                got["r"] = e

        retrying = threading.Thread(target=score)
        refusals = lambda: service.metrics.registry.get_sample_value("polar_serve_rejected_total")  # noqa: E731
        before = refusals()
        retrying.start()
        assert _until(lambda: refusals() >= before + 3 or "r" in got, 60)
        gate.set()
        for t in (running, queued, retrying):
            t.join(60)
        assert isinstance(got["r"], list) and len(got["r"]) == 1, got["r"]
        assert refusals() >= before + 3


def test_request_timeout_is_504_and_the_server_lives_on(scorer, tokenizer):
    with live_server(scorer, tokenizer, timeout_s=0.2, batcher_kw=dict(max_wait_s=1.0)) as (url, _):
        res = httpx.post(f"{url}/classify", json={"text": [served("a")]}, timeout=30)
        assert res.status_code == 504 and "--timeout-s" in res.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_bearer_auth(scorer, tokenizer):
    with live_server(scorer, tokenizer, api_key="s3cret") as (url, _):
        def status(authorization=None):
            headers = {} if authorization is None else {"Authorization": authorization}
            return httpx.post(f"{url}/classify", json={"text": [served("a")]}, headers=headers, timeout=60).status_code

        assert status() == 401
        assert status("Bearer nope") == 401
        assert status("Bearer s3cret") == 200
        # RFC 7235 2.1: the scheme is case-insensitive, and one or more spaces come before the credentials
        # ("bearer s3cret" was refused 401); the token itself is not
        assert [status(a) for a in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret")] == [200] * 3
        assert [status(a) for a in ("Bearer S3CRET", "Basic s3cret", "Bearers3cret", "s3cret", "Bearer s3cret x",
                                    "Bearer")] == [401] * 6
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
        # HEAD answers as GET does, the key needed alike
        assert [httpx.head(f"{url}{p}").status_code for p in ("/health", "/metrics")] == [200, 401]


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
    gate, rounds, held = held_rounds(scorer)
    with live_server(scorer, tokenizer, score=held) as (url, service):
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(f"{url}/classify", json={
            "text": [served("a"), served("b")]}, timeout=60)))
        t.start()
        assert _until(lambda: rounds)  # the first request's round is running, held
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/classify", json={"text": [served("c"), served("d"), served("e")]}, timeout=0.5)
        noticed = _until(lambda: service.batcher.queued_items == 0, 10)
        gate.set()
        t.join(60)
        assert first["r"].status_code == 200
        time.sleep(0.3)
        assert noticed and service.batcher.totals.items == 2
        metrics = httpx.get(f"{url}/metrics").text
        assert 'polar_serve_requests_total{endpoint="classify",status="499"} 1.0' in metrics
        assert 'polar_serve_client_gone_total{stage="queued"} 1.0' in metrics


@contextlib.contextmanager
def _part_of_a_body(url):
    """A /classify connection that sent its headers and the first bytes of its body, then nothing:
    -> (the socket, the bytes of the body not sent)."""
    body = json.dumps({"text": [served("a")]}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        yield conn, body[5:]


def _answer_of(conn) -> bytes:
    """The whole answer on a raw connection: its head and its Content-Length of body (what came
    before the connection closed, if it closed first). Not read to the close: a kept-alive
    connection stays open for --read-timeout-s."""
    answer = b""
    while True:
        head, sep, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head) if sep else None
        if length and len(body) >= int(length[1]):
            return answer
        got = conn.recv(65536)
        if not got:
            return answer
        answer += got


# --max-reading-bytes that one request being read fills (each is charged at least MIN_BODY_CHARGE)
ONE_BODY = dict(max_reading_bytes=MIN_BODY_CHARGE, max_body_bytes=MIN_BODY_CHARGE)


def test_requests_beyond_max_reading_bytes_are_refused_before_their_body_is_read(scorer, tokenizer):
    with live_server(scorer, tokenizer, preparing_wait_s=0.5, **ONE_BODY) as (url, _):
        with _part_of_a_body(url) as (slow, rest):
            assert _until(lambda: httpx.get(f"{url}/health").json()["reading"] == 1)
            busy = httpx.post(f"{url}/classify", json={"text": [served("b")]}, timeout=30)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            message = busy.json()["error"]["message"]
            assert "holding 65536 of the 65536 bytes" in message and "(--max-reading-bytes)" in message, message
            assert "within 0.5 s" in message
            slow.sendall(rest)
            assert slow.recv(65536).startswith(b"HTTP/1.1 200")
        assert _until(lambda: httpx.get(f"{url}/health").json()["reading"] == 0)
        assert httpx.post(f"{url}/classify", json={"text": [served("b")]}, timeout=30).status_code == 200


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
    """/health requests are answered while the server parses a 61 MB body, and while it checks one
    of a million one-character texts. Counted, not timed: a parse that held the GIL throughout
    (json.loads), or a parse or check that ran on the event loop, lets no request start and finish
    inside its window, however fast or loaded the machine is."""
    from polar.serve import validation

    windows = {}

    def timed(name):
        def run(*args):
            t = time.perf_counter()
            try:
                return original(*args)
            finally:
                windows[name] = (t, time.perf_counter())
        original = getattr(validation, name)
        monkeypatch.setattr(validation, name, run)

    timed("parse_json")
    timed("classify")
    with live_server(scorer, tokenizer) as (url, _):
        probes, done = [], threading.Event()

        def probe():
            with httpx.Client(timeout=60) as c:
                while not done.is_set():
                    t = time.perf_counter()
                    c.get(f"{url}/health")
                    probes.append((t, time.perf_counter()))
                    time.sleep(0.005)

        def answered_inside(body, name):
            windows.clear()
            res = httpx.post(f"{url}/classify", content=body, timeout=120)
            start, end = windows[name]
            return res, sum(start <= a and b <= end for a, b in probes), end - start

        t = threading.Thread(target=probe)
        t.start()
        parsed = answered_inside(json.dumps({"model": 5, "text": ["ab\"cd\n" * 2000] * 4000}).encode(), "parse_json")
        # checked element by element on the event loop before its count was refused: 0 inside
        checked = answered_inside(json.dumps({"text": ["a"] * 1_000_000}).encode(), "classify")
        done.set()
        t.join(60)
    res, inside, took = parsed
    assert res.status_code == 400 and "'model' must be a string" in res.text  # parsed in full, then refused
    assert inside >= 3, (inside, took, len(probes))  # 14-51 here, loaded or not; json.loads: 0
    res, inside, took = checked
    assert res.status_code == 413 and "1000000 items in one request" in res.text
    assert inside >= 3, (inside, took, len(probes))


def test_a_stalled_body_gets_408_and_frees_its_room(scorer, tokenizer):
    """A client that sends its headers and part of its body, then nothing (a hung worker, a stuck
    proxy), must not hold its room (--max-reading-bytes) for ever: with room for one body, every
    other request would get 429 for as long as that connection stays open."""
    with live_server(scorer, tokenizer, read_timeout_s=0.5, **ONE_BODY) as (url, _):
        with _part_of_a_body(url) as (stalled, _):
            answer = _answer_of(stalled)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"--read-timeout-s" in answer
            assert _until(lambda: httpx.get(f"{url}/health").json()["reading"] == 0)
            # the stalled connection is still open on this side: the room is free all the same
            res = httpx.post(f"{url}/classify", json={"text": [served("b")]}, timeout=30)
            assert res.status_code == 200, res.text
        assert 'polar_serve_requests_total{endpoint="classify",status="408"} 1.0' in httpx.get(f"{url}/metrics").text


def _waiting(url) -> int:
    return httpx.get(f"{url}/health").json()["waiting"]


def _classify(url, text, answers, key):
    """POST /classify in a thread, its answer in answers[key]."""
    t = threading.Thread(target=lambda: answers.update({key: httpx.post(
        f"{url}/classify", json={"text": [served(text)]}, timeout=120)}))
    t.start()
    return t


def test_requests_beyond_max_waiting_are_refused_at_once(scorer, tokenizer):
    """Each request waiting for room to be read in holds its connection, its task and what uvicorn buffered of
    its body (25 KB for a small request, 150 KB for a large one: benchmarks/serve_load.py --burst),
    and there was no limit to how many waited. Beyond --max-waiting (default --max-queue) a request
    is refused at once, its body unread; those waiting are served once the slot is free."""
    from polar.serve.app import ServeSettings, Service
    from polar.serve.batcher import Batcher
    from polar.serve.metrics import Metrics

    service = Service(tokenizer, Batcher(lambda b: None, tokenizer.pad_id, max_queue_items=7), ServeSettings(),
                      Metrics())
    assert service.max_waiting == 7
    from polar.serve.server import parse_args

    assert parse_args(["--checkpoint", "c", "--max-waiting", "0"]).max_waiting == 0
    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", "c", "--max-waiting", "-1"])
    with live_server(scorer, tokenizer, preparing_wait_s=60, max_waiting=2, **ONE_BODY) as (url, service):
        with _part_of_a_body(url) as (slow, rest):
            assert _until(lambda: service.reading == 1)
            answers = {}
            waiting = [_classify(url, str(k), answers, k) for k in range(2)]
            assert _until(lambda: _waiting(url) == 2)
            busy = httpx.post(f"{url}/classify", json={"text": [served("c")]}, timeout=30)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
            message = busy.json()["error"]["message"]
            assert "2 requests are waiting" in message and "(--max-waiting 2)" in message, message
            assert "(--max-reading-bytes 65536)" in message
            slow.sendall(rest)
            assert _answer_of(slow).startswith(b"HTTP/1.1 200")
            for t in waiting:
                t.join(60)
        assert [answers[k].status_code for k in range(2)] == [200, 200]
        assert service.waiting == 0 and service.preparing == 0


def test_a_client_that_leaves_while_waiting_for_room_gives_up_its_place(scorer, tokenizer):
    """A client that gave up while its request waited for room to be read in (its timeout, then a
    retry) left the request waiting until the room came, its place in --max-waiting taken by an
    answer nobody reads."""
    with live_server(scorer, tokenizer, preparing_wait_s=60, max_waiting=1, **ONE_BODY) as (url, service):
        with _part_of_a_body(url) as (slow, rest):
            assert _until(lambda: service.reading == 1)
            body = json.dumps({"text": [served("a")]}).encode()
            with socket.create_connection(slow.getpeername(), timeout=30) as leaving:
                leaving.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\n\r\n" % len(body) + body)
                assert _until(lambda: _waiting(url) == 1)
            assert _until(lambda: _waiting(url) == 0, 10)
            answers = {}
            t = _classify(url, "b", answers, "b")  # the place is free: it waits instead of a 429
            assert _until(lambda: _waiting(url) == 1)
            slow.sendall(rest)
            assert _answer_of(slow).startswith(b"HTTP/1.1 200")
            t.join(60)
        assert answers["b"].status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'polar_serve_requests_total{endpoint="classify",status="499"} 1.0' in metrics
        assert 'polar_serve_client_gone_total{stage="waiting"} 1.0' in metrics
        assert service.batcher.totals.items == 2  # the slow request and "b"; not the one whose client left


def test_a_body_over_max_body_bytes_is_refused_before_waiting_for_room(scorer, tokenizer):
    """A body declared larger than --max-body-bytes can never be taken, yet it waited for room to be
    read in and, none free, got 429: retry, which a client does for ever. It gets 413 at once, unread;
    a body of no declared length (chunked) gets 413 as soon as what arrived passes the limit."""
    with live_server(scorer, tokenizer, preparing_wait_s=60, max_body_bytes=1000,
                     max_reading_bytes=MIN_BODY_CHARGE) as (url, service):
        with _part_of_a_body(url) as (slow, rest):
            assert _until(lambda: service.reading == 1)
            with socket.create_connection(slow.getpeername(), timeout=30) as big:
                big.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000000000\r\n\r\n" + b" " * 4096)
                answer = _answer_of(big)
            assert answer.startswith(b"HTTP/1.1 413"), answer
            assert b"the body is 1000000000 bytes" in answer and b"(--max-body-bytes)" in answer
            slow.sendall(rest)
            assert _answer_of(slow).startswith(b"HTTP/1.1 200")
        chunked = httpx.post(f"{url}/classify", content=iter([b" " * 400] * 100), timeout=30)
        assert chunked.status_code == 413 and "limit of 1000 bytes (--max-body-bytes)" in chunked.text


def test_settings_that_leave_the_prompt_unbounded_are_refused(tokenizer):
    from polar.serve.app import ServeSettings, Service
    from polar.serve.batcher import Batcher
    from polar.serve.metrics import Metrics

    def service(max_length, max_response):
        return Service(tokenizer, Batcher(lambda b: None, tokenizer.pad_id), ServeSettings(
            max_length=max_length, max_response=max_response, max_item_tokens=max_length + 1), Metrics())

    with pytest.raises(ValueError, match=r"max_length 8192 leaves no prompt budget.*max_length >= 8198"):
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
        threads = [threading.Thread(target=post, args=a) for a in (("good", texts), ("bad", [served("~~~")]))]
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
    should be exiting (torchrun and SLURM kill it soon after), and their clients are answered 503
    with Retry-After (they got uvicorn's plain-text 500)."""
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

    answers = {}

    def post(i):
        try:
            answers[i] = httpx.post(f"{url}/classify", json={"text": [f"<|reward|>{i}{'x' * 40}[UNUSED_TOKEN_130]"]},
                                    timeout=60)
        except httpx.HTTPError as e:  # the connection closed unanswered
            answers[i] = e

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
    # none lost silently: each client is answered, 200 or, cancelled at the graceful timeout, 503 to retry
    codes = {i: getattr(a, "status_code", repr(a)) for i, a in answers.items()}
    assert sorted(codes) == list(range(8)) and set(codes.values()) <= {200, 503} and 503 in codes.values(), codes
    refused = [a for a in answers.values() if a.status_code == 503]
    assert all(a.headers["retry-after"] == "1" and "--graceful-timeout-s" in a.json()["error"]["message"]
               for a in refused)
