"""polar/reward.py against a small stand-in for `polar serve` on loopback (real HTTP, no mocks of the
client), and the in-process scorer's checks of its items (with a stub model: the checks come first)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import pickle
import re
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from polar import reward
from polar.in_process_scorer import InProcessScorer


class RewardsServer:
    """POST /v1/rewards -> one reward per item (len(output)), answered as `mode` says:
    "ok" in order; "reversed" in reverse order, each with its index; "short" one reward fewer;
    "html" a 200 that is not JSON; "408-once" a 408 (the body came too slowly) to the first request;
    "nan", "text", "null", "huge": the reward of an output of 4 characters as NaN (which Python's json
    writes), as a string, as null, as an integer of 401 digits (JSON's numbers have no bound). An item
    whose output is a number gets a 400 naming it, one whose output is "busy" a 503. The first
    `overloaded` requests get `overload_status` with "Retry-After: 0", as a full queue answers; a body
    over `max_body` bytes a 413 as `polar serve --max-body-bytes` gives it. `keep_alive`: HTTP/1.1
    connections kept open, as `polar serve` keeps them; `ports`: each request's client port (its
    connection)."""

    def __init__(self, mode: str = "ok", overloaded: int = 0, overload_status: int = 429, port: int = 0,
                 max_body: int = 0, keep_alive: bool = False):
        self.mode = mode
        self.bodies: list = []
        self.sizes: list = []  # bytes of each body
        self.ports: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            if keep_alive:
                protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw_body = self.rfile.read(int(self.headers["Content-Length"]))
                server.ports.append(self.client_address[1])
                if max_body and len(raw_body) > max_body:
                    raw = json.dumps({"error": {"message": f"the body is {len(raw_body)} bytes, more than this "
                                                           f"server's limit of {max_body} (--max-body-bytes)"}})
                    self.send_response(413)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw.encode())
                    return
                body = json.loads(raw_body)
                server.bodies.append(body)
                server.sizes.append(len(raw_body))
                if len(server.bodies) <= overloaded:
                    raw = json.dumps({"error": {"message": "the server's queue is full"}}).encode()
                    self.send_response(overload_status)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                bad = [i for i, it in enumerate(body["items"]) if not isinstance(it["output"], str)]
                status = (408 if server.mode == "408-once" and len(server.bodies) == 1 else
                          503 if any(it["output"] == "busy" for it in body["items"]) else 0)
                if status and not bad:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if bad:  # as `polar serve` names a bad item: by its index in the request it got
                    raw = json.dumps({"error": {"message": f"items[{bad[0]}].output must be a string or an "
                                                           "array of messages, got number"}}).encode()
                    self.send_response(400)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                data = [{"index": i, "reward": float(len(it["output"]))} for i, it in enumerate(body["items"])]
                unusable = {"nan": float("nan"), "text": "4.0", "null": None, "huge": 10 ** 400}
                for d in data:
                    if server.mode in unusable and d["reward"] == 4:
                        d["reward"] = unusable[server.mode]
                if server.mode == "reversed":
                    data = data[::-1]
                elif server.mode == "short":
                    data = data[:-1]
                raw = b"<html>proxy</html>" if server.mode == "html" else json.dumps({"data": data}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


ITEMS = [{"prompt": "p", "reference": "r", "output": "x" * n} for n in (1, 2, 3, 4, 5)]


def test_rewards_follow_the_answers_indices_in_every_chunk():
    with RewardsServer("reversed") as srv:
        with reward.RewardClient(srv.url, chunk_size=2) as client:
            assert client.score(ITEMS) == [1.0, 2.0, 3.0, 4.0, 5.0]

        async def go():
            async with reward.AsyncRewardClient(srv.url, chunk_size=2) as client:
                return await client.score(ITEMS)

        assert asyncio.run(go()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    sizes = [len(b["items"]) for b in srv.bodies]
    assert sizes[:3] == [2, 2, 1] and sorted(sizes[3:]) == [1, 2, 2]  # the async chunks arrive in any order


@pytest.mark.parametrize("mode,message", [("short", "1 rewards for 2 items"), ("html", "not JSON"),
                                          ("nan", r"the reward of items\[3\] is nan, not a finite number"),
                                          ("text", r"the reward of items\[3\] is '4.0', not a finite number"),
                                          ("null", r"the reward of items\[3\] is None, not a finite number"),
                                          ("huge", r"the reward of items\[3\] is 1000000000000000000000000000000"
                                                   r"000000000, not a finite number")])
def test_an_answer_that_is_not_one_reward_per_item_is_an_error_not_misaligned_rewards(mode, message):
    """A NaN (Python's json reads it), a string or a null reward was taken (float()) or failed
    naming no item: an RL step averaged a NaN in; an integer past a float's range let a bare
    OverflowError out of math.isfinite. Sent in chunks of 2, item 3 is the second of its request:
    named by its index in the call, and the server by its URL."""
    with RewardsServer(mode) as srv, reward.RewardClient(srv.url, chunk_size=2) as client:
        with pytest.raises(reward.RewardServerError,
                           match=rf"^reward server at {srv.url}/v1/rewards answered 200: .*{message}"):
            client.score(ITEMS)


@pytest.mark.parametrize("kw,message", [({"chunk_size": 0}, "chunk_size"), ({"max_retries": -1}, "max_retries")])
def test_client_settings_that_could_never_send_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        reward.RewardClient("http://127.0.0.1:9", **kw)


class _StubModel:
    """Reward = the position of the item's last token (its length - 1): enough to see which ids
    were scored."""

    def score(self, batch):
        return batch.layout[:, 0].reshape(-1)[batch.reward_index].numpy().astype(np.float32)


@pytest.fixture
def in_process():
    from polar.tokenizer import ByteTokenizer

    s = InProcessScorer(_StubModel(), ByteTokenizer(), max_length=256, max_response=64, max_wait_s=0.001)
    yield s
    s.close()


class _StubModelOfPositions(_StubModel):
    def __init__(self, positions: int):
        self.max_positions = positions


def test_in_process_scorer_fits_its_lengths_to_the_models_positions():
    """As `polar serve` and `polar score` do (polar.client_limits): the client's default 16384 was
    kept for a model of fewer positions, so items within it but past the positions were formatted and
    then refused one by one; a given max_length that cannot fit is refused at once, naming the largest."""
    from polar.tokenizer import ByteTokenizer

    s = InProcessScorer(_StubModelOfPositions(4096), ByteTokenizer(), max_wait_s=0.001)
    try:
        assert (s.max_length, s.max_response) == (4096 - 15, (4096 - 15 - 6) // 2)
        assert "max_length 4081" in s.lengths_note and "4096 positions" in s.lengths_note
        long = {"prompt": "p" * 9000, "reference": "r" * 5000, "output": "o" * 5000}
        last = s.score([long])[0]  # the position read: the item's length - 1
        assert s.max_length - 8 <= last < s.max_length  # cut to the truncation's length, and scored
    finally:
        s.close()
    with pytest.raises(ValueError, match="max_length 8000: .* the largest max_length whose items fit is 4081"):
        InProcessScorer(_StubModelOfPositions(4096), ByteTokenizer(), max_length=8000)
    # a scorer that knows no positions: a max_length given alone brings the response length that fits it,
    # as on the command line (it was refused: "leaves no prompt budget ... max_response 4096")
    s = InProcessScorer(_StubModel(), ByteTokenizer(), max_length=2000, max_wait_s=0.001)
    assert (s.max_length, s.max_response) == (2000, 997)
    s.close()
    # a model of the client's positions and more keeps the client's lengths, with nothing to say
    s = InProcessScorer(_StubModelOfPositions(32768), ByteTokenizer(), max_wait_s=0.001)
    assert (s.max_length, s.max_response, s.lengths_note) == (16384, 4096, None)
    s.close()


def test_in_process_scorer_reads_a_null_wrapper_as_sft_as_the_server_does(in_process):
    item = {"prompt": "hello", "reference": "world", "output": "earth"}
    sft = in_process.score([{**item, "wrapper": "sft"}])
    assert in_process.score([{**item, "wrapper": None}]) == in_process.score([item]) == sft
    assert in_process.score([{**item, "wrapper": "pretrain"}]) != sft


@pytest.mark.parametrize("item,error,message", [
    ({"prompt": "a", "reference": "b"}, ValueError, "item 0: missing field 'output'"),
    ({"prompt": "a", "reference": "b", "output": 5}, ValueError, "item 0.output must be a string or an array"),
    ({"prompt": "a", "reference": "b", "output": "\ud800"}, ValueError, "item 0.output holds a lone surrogate"),
    ({"prompt": "a", "reference": "", "output": "o"}, ValueError, "item 0.reference: the reference is empty"),
    ({"prompt": "a", "reference": [{"content": " "}], "output": "o"}, ValueError,
     r"item 0.reference: the reference is empty \(only whitespace\)"),
    ("just text", TypeError, "item 0 must be a dict"),
])
def test_in_process_scorer_names_the_bad_item_and_field(in_process, item, error, message):
    with pytest.raises(error, match=message):
        in_process.score([item])


def test_in_process_texts_are_read_as_classify_reads_them(in_process):
    # a bare string was iterated: "abc" gave three rewards, one per character
    text = "<|reward|>abc[UNUSED_TOKEN_130]"
    assert in_process.score_texts(text) == in_process.score_texts([text]) and len(in_process.score_texts(text)) == 1
    assert in_process.score_texts([]) == []
    with pytest.raises(ValueError, match="text 1 holds a lone surrogate"):
        in_process.score_texts([text, "a\ud800"])
    with pytest.raises(TypeError, match="text 1 must be a string, got int"):
        in_process.score_texts([text, 5])


@pytest.mark.parametrize("bad", ["<|reward|>abc[UNUSED_TOKEN_130]\n", "<|reward|>abc", "abc", ""])
def test_in_process_texts_must_end_with_the_reward_token(in_process, bad):
    """The reward is read at a text's last token: one ending after the reward token (a trailing
    newline) or without it was scored at whatever token came last, as /classify scored it."""
    with pytest.raises(ValueError, match=r"^text 1 does not end with the reward token \[UNUSED_TOKEN_130\]"):
        in_process.score_texts(["<|reward|>abc[UNUSED_TOKEN_130]", bad])


def _verl_call(fn, reward_kwargs, **call_kw):
    """How verl calls a custom reward function (verl/trainer/ppo/reward.py, _call_with_kwargs): by
    keyword, with custom_reward_function.reward_kwargs merged in."""
    return fn(**{**call_kw, **reward_kwargs})


def test_verl_batch_function_takes_polars_prompt_key():
    # InternLM/POLAR's compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos,
    # prompt_key="prompt"): a config written for it (reward_kwargs.prompt_key) must work here too
    with RewardsServer() as srv:
        got = _verl_call(reward.compute_score_batch, {"url": srv.url, "prompt_key": "raw_prompt"},
                         data_sources=np.array(["d"] * 3, dtype=object),
                         # the third as DeepSeek-R1's template leaves it: `<think>` was in the prompt
                         solution_strs=["ab", "<think>x</think> abc", "so it is 4\n</think>\n\nabcd"],
                         ground_truths=["r"] * 3,
                         extra_infos=np.array([{"raw_prompt": "p"}, {"raw_prompt": [{"role": "user", "content": "p"}]},
                                               {"raw_prompt": "p"}], dtype=object))
    assert got == [2.0, 3.0, 4.0]
    assert [it["prompt"] for it in srv.bodies[0]["items"]] == ["p", [{"role": "user", "content": "p"}], "p"]


def test_verl_per_item_function_as_the_reward_loop_calls_it():
    # verl's reward loop (use_reward_loop, on by default) runs per-item managers only (naive, dapo, ...):
    # compute_score(data_source=, solution_str=, ground_truth=, extra_info=) -> a float, from threads
    import concurrent.futures

    prompt = np.array([{"role": "user", "content": "q"}], dtype=object)
    with RewardsServer() as srv:
        def one(n):
            return _verl_call(reward.compute_score, {"url": srv.url}, data_source="d", solution_str="x" * n,
                              ground_truth=np.array([{"role": "assistant", "content": "r"}], dtype=object),
                              extra_info={"prompt": prompt, "num_turns": None, "rollout_reward_scores": {}})

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(one, [1, 2, 3, 4]))
        # with verl's own reward model configured, it adds these two keywords
        extra = reward.compute_score("d", "xy", "r", {"prompt": "q"}, url=srv.url, reward_router_address=None,
                                     reward_model_tokenizer=None)
    assert got == [1.0, 2.0, 3.0, 4.0] and all(type(g) is float for g in got)
    assert extra == 2.0
    assert srv.bodies[0]["items"][0]["reference"] == [{"role": "assistant", "content": "r"}]


def test_chunks_keep_under_the_clients_body_budget_in_order():
    items = [{"prompt": "p", "reference": "r" * 300, "output": "x" * n} for n in range(1, 41)]
    with RewardsServer() as srv, reward.RewardClient(srv.url, max_body_bytes=2_000) as client:
        assert client.score(items) == [float(n) for n in range(1, 41)]
    assert len(srv.sizes) > 5 and max(srv.sizes) <= 2_000, srv.sizes
    assert [it["output"] for b in srv.bodies for it in b["items"]] == [it["output"] for it in items]


def test_an_item_that_is_not_text_is_named_before_sending():
    with pytest.raises(ValueError, match="item 1 holds a lone surrogate"):
        reward.RewardClient("http://127.0.0.1:9").score([ITEMS[0], {"prompt": "p", "reference": "r",
                                                                    "output": "\ud800"}])
    with pytest.raises(ValueError, match="max_body_bytes must be a positive integer"):
        reward.RewardClient("http://127.0.0.1:9", max_body_bytes=0)


def test_a_bad_item_is_named_by_its_index_in_the_call_not_in_its_chunk():
    # the server numbers the items of the request it got: sent in chunks of 2, item 5 was "items[1]"
    items = ITEMS + [{"prompt": "p", "reference": "r", "output": 7}]
    with RewardsServer() as srv:
        with reward.RewardClient(srv.url, chunk_size=2) as client:
            with pytest.raises(reward.RewardServerError, match=r"answered 400: items\[5\]\.output must be") as err:
                client.score(items)
        # the server named by its URL; Ray (verl's reward functions) pickles a worker's exception to the
        # driver, which failed (TypeError: __init__() missing 'message') and lost the error
        # and kept only the arguments: a note added on the way (add_note) and an attribute set were lost
        err.value.add_note("step 12")
        err.value.step = 12
        e = pickle.loads(pickle.dumps(err.value))
        assert type(e) is reward.RewardServerError and str(e) == str(err.value)
        assert (e.status, e.url) == (400, f"{srv.url}/v1/rewards") and str(e).startswith(f"reward server at {e.url} ")
        assert (e.__notes__, e.step, e.message) == (["step 12"], 12, err.value.message)

        async def go():
            async with reward.AsyncRewardClient(srv.url, chunk_size=4) as client:
                return await client.score(items)

        with pytest.raises(reward.RewardServerError, match=r"answered 400: items\[5\]\.output must be"):
            asyncio.run(go())


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_an_item_over_the_servers_body_limit_by_itself_is_named(client_class):
    """A chunk over the server's --max-body-bytes is halved down to the item too long alone, whose
    413 ("the body is N bytes ...") named no item: which of a batch of rollouts was too long?"""
    items = ITEMS[:2] + [{"prompt": "p", "reference": "r", "output": "x" * 3000}] + ITEMS[2:]
    with RewardsServer(max_body=2000) as srv:
        with pytest.raises(reward.RewardServerError,
                           match=r"answered 413: the body is \d+ bytes, .*\(--max-body-bytes\) \(items\[2\], sent "
                                 r"alone: this item alone is over the limit\)$"):
            _score(client_class, srv.url, items=items)


def _score_in_a_fork(client, items):
    """client.score(items) in a process forked from this one (as a fork-started process pool
    runs verl's reward functions): its rewards, or its error's text."""
    return _in_a_fork(lambda: client.score(items))


def _in_a_fork(fn):
    """fn() in a process forked from this one: what it returned, or its error's text."""
    import multiprocessing

    def child(conn):
        try:
            conn.send(fn())
        except Exception as e:
            conn.send(f"{type(e).__name__}: {e}")

    parent_end, child_end = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=child, args=(child_end,))
    proc.start()
    try:
        if not parent_end.poll(60):
            raise AssertionError("the forked process sent nothing in 60 s")
        return parent_end.recv()
    finally:
        proc.join(10)


def test_a_forked_process_does_not_send_down_its_parents_connections():
    """A process forked after the client had sent held the parent's kept-alive socket: parent and
    children sent down one TCP connection, interleaving their bodies (polar serve answered 400 to
    garbled JSON, calls hung) and reading each other's answers. Each process now has its own."""
    with RewardsServer(keep_alive=True) as srv, reward.RewardClient(srv.url) as client:
        assert client.score(ITEMS[:1]) == [1.0]
        assert _score_in_a_fork(client, ITEMS[1:3]) == [2.0, 3.0]
        assert client.score(ITEMS[3:]) == [4.0, 5.0]
    parent, child, parent_again = srv.ports
    assert parent_again == parent, "the parent's connection was not kept alive: the test shows nothing"
    assert child != parent


def test_an_async_client_serves_one_event_loop_after_another():
    """A reward function that runs each step's calls under asyncio.run holds one client across
    loops: the connection the first loop kept alive belonged to it, and the second call failed at
    once with a bare 'RuntimeError: Event loop is closed'."""
    async def twice(client):
        return [await client.score(ITEMS[:2]), await client.score(ITEMS[2:])]

    with RewardsServer(keep_alive=True) as srv:
        client = reward.AsyncRewardClient(srv.url)
        for _ in range(2):
            assert asyncio.run(twice(client)) == [[1.0, 2.0], [3.0, 4.0, 5.0]]
        asyncio.run(client.aclose())
    assert srv.ports[0] == srv.ports[1], "no connection was kept alive: the test shows nothing"


def test_a_408_is_retried():
    """`polar serve` answers 408 to a body that came slower than its --read-timeout-s; the same body
    sent again may come in time."""
    with RewardsServer("408-once") as srv, reward.RewardClient(srv.url, backoff_s=0.01) as client:
        assert client.score(ITEMS) == [1.0, 2.0, 3.0, 4.0, 5.0] and len(srv.bodies) == 2


def test_an_async_call_that_failed_stops_its_other_chunks():
    """One chunk refused (400): the call raises, and its other chunk, retrying a busy server (503),
    is cancelled with it instead of retrying on in the caller's event loop."""
    items = [{"prompt": "p", "reference": "r", "output": 3}, {"prompt": "p", "reference": "r", "output": "busy"}]

    async def go(srv):
        async with reward.AsyncRewardClient(srv.url, chunk_size=1, backoff_s=0.05, max_backoff_s=0.05,
                                            max_retries=100) as client:
            with pytest.raises(reward.RewardServerError, match=r"items\[0\]"):
                await client.score(items)
            await asyncio.sleep(0.2)  # a request already on its way when the call failed arrives
            sent = len(srv.bodies)
            await asyncio.sleep(0.5)  # the loop runs on, as an RL trainer's does
            return sent, len(srv.bodies)

    with RewardsServer() as srv:
        sent, later = asyncio.run(go(srv))
    # retrying every 0.05 s, the busy chunk sent about ten in 0.5 s; one more may have been in flight
    assert later - sent <= 1, f"{later - sent} requests after the call had failed"


@pytest.mark.parametrize("status", [429, 503])
def test_an_overload_outlasting_max_retries_is_waited_out_for_max_wait_s(status):
    """48 threads of 8 items against `polar serve --max-queue 16`: every attempt was refused at once
    (429, Retry-After 1) and the client gave up after its 6 retries, ~10 s, failing the RL step. A
    429 or 503 is now retried for max_wait_s in all, however many attempts that takes."""
    with RewardsServer(overloaded=10, overload_status=status) as srv:
        with reward.RewardClient(srv.url, max_retries=2, backoff_s=0.001) as client:
            assert client.score(ITEMS) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert len(srv.bodies) == 11

    async def go(url, **kw):
        async with reward.AsyncRewardClient(url, max_retries=2, backoff_s=0.001, **kw) as client:
            return await client.score(ITEMS)

    with RewardsServer(overloaded=10, overload_status=status) as srv:
        assert asyncio.run(go(srv.url)) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert len(srv.bodies) == 11
    # no time to wait: max_retries alone, and the error says which limit gave out
    message = (rf"answered {status}: the server's queue is full \(gave up after 3 attempts in [\d.]+ s: "
               r"max_retries=2, and max_wait_s=0 for a 429, a 503 or a refused connection\)")
    with RewardsServer(overloaded=10, overload_status=status) as srv:
        with reward.RewardClient(srv.url, max_retries=2, backoff_s=0.001, max_wait_s=0) as client:
            with pytest.raises(reward.RewardServerError, match=message):
                client.score(ITEMS)
        assert len(srv.bodies) == 3
        with pytest.raises(reward.RewardServerError, match=message):
            asyncio.run(go(srv.url, max_wait_s=0))
        assert len(srv.bodies) == 6


def test_other_retryable_answers_keep_to_max_retries():
    """max_wait_s is for an overloaded server; a 502 (a proxy whose backend is down) is not waited
    out for minutes."""
    with RewardsServer(overloaded=10, overload_status=502) as srv:
        with reward.RewardClient(srv.url, max_retries=2, backoff_s=0.001) as client:
            with pytest.raises(reward.RewardServerError, match=r"answered 502: .*gave up after 3 attempts"):
                client.score(ITEMS)
        assert len(srv.bodies) == 3


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "60", True])
def test_a_max_wait_s_that_is_not_a_wait_is_refused(value):
    with pytest.raises(ValueError, match="max_wait_s must be a finite number of seconds >= 0"):
        reward.RewardClient("http://127.0.0.1:9", max_wait_s=value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _score(client_class, url: str, items=ITEMS, **kw) -> list[float]:
    if client_class is reward.RewardClient:
        with reward.RewardClient(url, **kw) as client:
            return client.score(items)

    async def go():
        async with reward.AsyncRewardClient(url, **kw) as client:
            return await client.score(items)

    return asyncio.run(go())


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_a_server_still_loading_its_model_is_waited_for(client_class):
    """`polar serve` refuses connections until its model has loaded (seconds for a tiny model,
    minutes for a 7B): a refused connection was retried max_retries times, ~20 s, and the RL step
    failed with a bare ConnectError. It is now waited for max_wait_s, as a 503 is."""
    port = _free_port()
    started: list = []
    later = threading.Timer(3.0, lambda: started.append(RewardsServer(port=port).__enter__()))
    later.start()
    try:
        got = _score(client_class, f"http://127.0.0.1:{port}", max_retries=1, backoff_s=0.05, max_backoff_s=0.2)
    finally:
        later.join()
        for srv in started:
            srv.__exit__()
    assert got == [1.0, 2.0, 3.0, 4.0, 5.0] and len(started[0].bodies) == 1


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_a_refused_connection_past_max_wait_s_names_the_url_and_the_limits(client_class):
    url = f"http://127.0.0.1:{_free_port()}"
    message = (rf"cannot connect to the reward server at {url}/v1/rewards: connection refused \(gave up after 2 "
               r"attempts in [\d.]+ s: max_retries=1, and max_wait_s=0 for a 429, a 503 or a refused connection\)")
    with pytest.raises(ConnectionError, match=message) as raised:
        _score(client_class, url, max_retries=1, backoff_s=0.01, max_wait_s=0)
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert type(raised.value) is reward.RewardConnectionError and raised.value.attempts == 2


class SilentServer:
    """Accepts connections and reads each request in full, never answering: a reward server whose
    batch takes longer than the client's timeout_s. `requests`: the requests read so far."""

    def __init__(self):
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.requests = 0
        self._lock = threading.Lock()
        self._conns: list = []
        self._readers: list = []
        self._closed = threading.Event()
        self._accepting = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while not self._closed.is_set():
            if not select.select([self._sock], [], [], 0.05)[0]:  # a blocked accept() outlives close()
                continue
            conn, _ = self._sock.accept()
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
            with self._lock:
                self._conns.append(conn)
                self._readers.append(reader)
            reader.start()

    def _read(self, conn):
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < self._length(data):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        with self._lock:
            self.requests += 1

    @staticmethod
    def _length(data: bytes) -> int:
        return int(re.search(rb"content-length: *(\d+)", data.partition(b"\r\n\r\n")[0], re.I).group(1))

    def settled_requests(self) -> int:
        """The requests sent by a client that has finished: every connection it made accepted, and
        read to its end (the client sent each in full before it timed out)."""
        while select.select([self._sock], [], [], 0.05)[0]:  # a connection still waits to be accepted
            pass
        with self._lock:
            readers = list(self._readers)
        for r in readers:
            r.join(10)
        with self._lock:
            if len(self._readers) > len(readers):  # one more was accepted meanwhile
                return self.settled_requests()
            return self.requests

    def __enter__(self):
        self._accepting.start()
        return self

    def __exit__(self, *exc):
        self._closed.set()
        self._accepting.join(10)
        self._sock.close()
        with self._lock:
            for c in self._conns:
                c.close()


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_a_read_timeout_is_not_sent_again_and_names_the_url_and_the_wait(client_class):
    """A batch the server took longer than timeout_s over was sent again max_retries times (each
    waiting timeout_s again, while the server still held the first), then failed with a bare
    httpx.ReadTimeout naming neither the server nor the wait. It now fails at once, sent once, with
    a RewardTimeoutError (a TimeoutError and a ConnectionError) saying so."""
    with SilentServer() as srv:
        with pytest.raises(TimeoutError) as raised:
            _score(client_class, srv.url, timeout_s=0.3, max_retries=3, backoff_s=0.01)
        assert srv.settled_requests() == 1
    e = raised.value
    assert isinstance(e, reward.RewardTimeoutError) and isinstance(e, ConnectionError)
    assert re.fullmatch(rf"the reward server at {srv.url}/v1/rewards sent no answer within timeout_s=0.3 s \(1 "
                        r"attempt in [\d.]+ s; not sent again: the server may still be scoring it, .* raise "
                        r"timeout_s, or send fewer items per request by lowering chunk_size=512\)", str(e)), str(e)
    assert (e.url, e.attempts) == (f"{srv.url}/v1/rewards", 1) and e.waited_s >= 0.3
    assert isinstance(e.__cause__, httpx.ReadTimeout)


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_a_host_name_that_does_not_resolve_names_the_host_and_what_was_tried(client_class):
    """It ended in a bare httpx.ConnectError "[Errno -2] Name or service not known", which an RL
    trainer's user could not tell from a bug."""
    url = "http://polar-no-such-host.invalid:1"
    with pytest.raises(ConnectionError) as raised:
        _score(client_class, url, max_retries=1, backoff_s=0.01)
    e = raised.value
    assert type(e) is reward.RewardConnectionError, repr(e)
    assert re.fullmatch(rf"cannot connect to the reward server at {url}/v1/rewards: host name "
                        r"'polar-no-such-host.invalid' not found \(.+\) \(gave up after 2 attempts in [\d.]+ s: "
                        r"max_retries=1, and max_wait_s=300 for a 429, a 503 or a refused connection\)", str(e)), str(e)
    # Ray (verl's reward functions run in its workers) pickles a worker's exception to the driver
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is reward.RewardConnectionError and str(again) == str(e) and again.attempts == 2


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_a_connect_timeout_is_retried_then_names_the_url_and_the_wait(client_class):
    """A server whose accept queue is full drops new connections' SYNs (Linux): no connection
    within timeout_s, nothing sent, so it is retried max_retries times; it ended in a bare
    httpx.ConnectTimeout "timed out"."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        address, held = full.getsockname(), []
        try:
            while True:  # fill the accept queue, never accepted, until a connection times out
                assert len(held) < 16, "the accept queue of a listen(0) socket did not fill"
                held.append(socket.create_connection(address, timeout=0.2))
        except TimeoutError:
            pass
        url = f"http://127.0.0.1:{address[1]}"
        try:
            with pytest.raises(TimeoutError) as raised:
                _score(client_class, url, timeout_s=0.2, max_retries=1, backoff_s=0.01)
        finally:
            for c in held:
                c.close()
    e = raised.value
    assert type(e) is reward.RewardTimeoutError, repr(e)
    assert re.fullmatch(rf"cannot connect to the reward server at {url}/v1/rewards: no connection within "
                        r"timeout_s=0.2 s \(gave up after 2 attempts in [\d.]+ s: max_retries=1, .*\)", str(e)), str(e)


def test_health_of_a_server_not_there_names_the_url():
    """health() let httpx's ConnectError out; it asks once (whether the server is up now)."""
    url = f"http://127.0.0.1:{_free_port()}"
    with reward.RewardClient(url) as client:
        with pytest.raises(reward.RewardConnectionError,
                           match=rf"cannot connect to the reward server at {url}/health: connection refused "
                                 r"\(1 attempt in [\d.]+ s\)"):
            client.health()


def test_health_of_a_server_answering_no_json_names_the_url():
    """A server that is not `polar serve` (the stand-in has no GET: http.server's HTML 501 page) let
    json's JSONDecodeError out, naming neither the server nor the answer."""
    with RewardsServer() as srv, reward.RewardClient(srv.url) as client:
        with pytest.raises(reward.RewardServerError,
                           match=rf"^reward server at {srv.url}/health answered 501: an answer that is not JSON: "):
            client.health()


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
@pytest.mark.parametrize("url", ["ftp://127.0.0.1:9/", "htp://rm:8000"])
def test_a_url_of_another_scheme_is_refused_when_the_client_is_made(client_class, url):
    """httpx refuses such a URL only when a request is sent (UnsupportedProtocol), which the client then
    retried max_retries times before a connection error that did not say the scheme was the fault."""
    with pytest.raises(ValueError, match=r"the scheme must be http or https, got '(ftp|htp)'"):
        client_class(url)


def test_the_in_process_scorer_is_still_imported_from_polar_reward():
    """Its import was `from polar.reward import InProcessScorer` until it moved to polar/in_process_scorer.py."""
    from polar.reward import InProcessScorer as old_path

    assert old_path is InProcessScorer
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        reward.NoSuchName


def test_the_clients_keep_their_polar_reward_names_and_pickles_naming_them_there_load():
    """The clients moved from polar/reward.py to polar/reward_client.py, leaving the trainers' hooks (loaded by
    path) there: `from polar.reward import RewardClient` (the README's) names the same classes, and a client or
    an error pickled before the move, whose pickle names its class polar.reward.X, loads as that class."""
    from polar import reward_client

    names = ("RewardClient", "AsyncRewardClient", "RewardServerError", "RewardConnectionError",
             "RewardTimeoutError", "URL_ENV", "API_KEY_ENV", "DEFAULT_MAX_BODY_BYTES")
    assert all(getattr(reward, name) is getattr(reward_client, name) for name in names)
    assert set(names) | {"compute_score", "compute_score_batch", "reward_func", "strip_thinking"} == set(reward.__all__)
    # as verl loads custom_reward_function.path: the file under a name of verl's
    spec = importlib.util.spec_from_file_location("custom_module", reward.__file__)
    by_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(by_path)
    assert by_path.RewardClient is reward_client.RewardClient and by_path.strip_thinking("<think>a</think> b") == "b"

    def pickled_before(obj) -> bytes:
        # protocol 2 names a class as text, "c<module>\n<name>\n": the module as the old code's was
        data = pickle.dumps(obj, protocol=2)
        assert b"cpolar.reward_client\n" in data
        return data.replace(b"cpolar.reward_client\n", b"cpolar.reward\n")

    error = pickle.loads(pickled_before(reward.RewardServerError(503, "busy", "http://h/v1/rewards")))
    assert type(error) is reward_client.RewardServerError and (error.status, error.url) == (503, "http://h/v1/rewards")
    timeout = pickle.loads(pickled_before(reward.RewardTimeoutError("no answer", url="http://h", attempts=2)))
    assert type(timeout) is reward_client.RewardTimeoutError and (str(timeout), timeout.attempts) == ("no answer", 2)
    client = pickle.loads(pickled_before(reward.RewardClient("http://h:1", chunk_size=3)))
    assert type(client) is reward_client.RewardClient and (client.base_url, client.chunk_size) == ("http://h:1", 3)



BUSY = {"prompt": "p", "reference": "r", "output": "busy"}  # answered 503 by RewardsServer, every time


@pytest.mark.parametrize("client_class,done", [(reward.RewardClient, 2), (reward.AsyncRewardClient, 3)])
def test_a_deadline_bounds_a_whole_call_against_a_server_that_stays_overloaded(client_class, done):
    """max_wait_s counts from each request's first attempt: a call sent in k chunks to a server that
    keeps answering 503 took about k x max_wait_s, and an RL step had no bound. deadline_s bounds the
    call: a RewardTimeoutError naming the URL, the chunks done and left and the seconds, the chunks
    still retrying cancelled (the async client's run together: all but the two busy ones are done)."""
    items = ITEMS[:2] + [BUSY, BUSY] + ITEMS[4:]
    with RewardsServer() as srv:
        with pytest.raises(reward.RewardTimeoutError) as raised:
            _score(client_class, srv.url, items=items, chunk_size=1, backoff_s=0.01, max_backoff_s=0.02,
                   max_wait_s=120, deadline_s=0.5)
        sent = len(srv.bodies)
        threading.Event().wait(0.3)  # a chunk left retrying would go on sending every 0.02 s
        assert len(srv.bodies) - sent <= 1, "the call's chunks went on retrying after its deadline"
    e = raised.value
    assert isinstance(e, TimeoutError) and isinstance(e, ConnectionError)
    assert re.fullmatch(rf"no rewards from the reward server at {srv.url}/v1/rewards within deadline_s=0.5 s "
                        rf"\({done} of 5 chunks done, {5 - done} left, in [\d.]+ s; raise deadline_s, or make "
                        r"the server keep up\)", str(e)), str(e)
    assert e.url == f"{srv.url}/v1/rewards" and e.waited_s >= 0.5


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_a_deadline_ends_a_request_in_flight(client_class):
    """A request sent in full and unanswered waits timeout_s (300 s by default): the deadline ends it
    sooner, with the deadline's error, not the timeout's."""
    with SilentServer() as srv:
        with pytest.raises(reward.RewardTimeoutError, match=r"within deadline_s=0.4 s \(0 of 1 chunks done"):
            _score(client_class, srv.url, deadline_s=0.4)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "60", True])
def test_a_deadline_that_is_not_a_time_is_refused(value):
    with pytest.raises(ValueError, match="deadline_s must be None or a finite number of seconds > 0"):
        reward.RewardClient("http://127.0.0.1:9", deadline_s=value)


@pytest.mark.parametrize("queries,prompts,message", [
    (["Q: a", 5], ["Q:", "Q:"], r"queries\[1\] must be a string .*, got int"),
    (["Q: a", None], ["Q:", "Q:"], r"queries\[1\] must be a string .*, got NoneType"),
    (["Q: a", "Q: b"], ["Q:", [{"role": "user", "content": "Q:"}]], r"prompts\[1\] must be a string .*, got list"),
    ([b"Q: a"], ["Q:"], r"queries\[0\] must be a string .*, got bytes"),
])
def test_reward_func_names_a_query_or_prompt_that_is_not_text(queries, prompts, message):
    """OpenRLHF hands decoded texts; anything else failed with an AttributeError ('int' object has no
    attribute 'startswith') or a TypeError from str.startswith, naming neither the argument nor the item."""
    with pytest.raises(TypeError, match=message):
        reward.reward_func(queries, prompts, ["ref"] * len(queries), url="http://127.0.0.1:9")


def _at_once(fn, n: int = 6) -> list:
    """fn() from n threads released together: what each got."""
    import concurrent.futures

    start = threading.Barrier(n)

    def one(_):
        start.wait()
        return fn()

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_threads_making_the_first_call_at_once_share_one_client():
    """verl's reward loop calls compute_score for each response at once from worker threads: each
    thread found no client for the URL and made one (an httpx client and its pool of connections,
    ~0.1 s to make), one was kept and the others were dropped unclosed, their connections leaked."""
    url = f"http://127.0.0.1:{_free_port()}"  # a URL no other test used: no client for it yet
    got = _at_once(lambda: reward._client_for(url, chunk_size=3))
    try:
        assert len({id(c) for c in got}) == 1, f"{len({id(c) for c in got})} clients made for one URL"
    finally:
        for key in [k for k, c in reward._clients.items() if c in got]:
            reward._clients.pop(key)
        for c in {id(c): c for c in got}.values():
            c.close()


def test_threads_of_a_forked_process_share_its_one_new_connection_pool():
    """A forked process makes an httpx client of its own (2803df7); its threads' first calls made
    one each, all but one dropped unclosed. The parent's is untouched."""
    client = reward.RewardClient(f"http://127.0.0.1:{_free_port()}")
    parents = client._connections()

    def made():
        made = _at_once(client._connections)
        return len({id(h) for h in made}), any(h is parents for h in made)

    try:
        assert _in_a_fork(made) == (1, False)
    finally:
        client.close()
    assert client._connections() is parents


_UNPICKLE_AND_SCORE = """
import asyncio, json, pickle, sys
client = pickle.load(sys.stdin.buffer)
items = [{"prompt": "p", "reference": "r", "output": "xyz"}]
got = client.score(items) if hasattr(client, "close") else asyncio.run(client.score(items))
print(json.dumps(got))
"""


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_a_client_is_pickled_into_another_process(client_class):
    """Ray pickles a reward function by value with what it refers to (verl loads the custom reward
    file by its path, so cloudpickle cannot name its module), and a 'spawn' or 'forkserver' process
    pool pickles its arguments: a RewardClient failed to pickle (TypeError: cannot pickle
    '_thread.RLock' object, its httpx client's). The copy keeps its settings and makes its own
    connections in the process that unpickles it; the original keeps its own."""
    import subprocess
    import sys

    with RewardsServer(keep_alive=True) as srv:
        client = client_class(srv.url, chunk_size=3, max_retries=2, deadline_s=60)
        assert _score_with(client, ITEMS[:1]) == [1.0]  # used first: a kept-alive connection open
        copy = pickle.loads(pickle.dumps(client))
        assert (copy.base_url, copy.chunk_size, copy.max_retries, copy.deadline_s) == (srv.url, 3, 2, 60)
        done = subprocess.run([sys.executable, "-c", _UNPICKLE_AND_SCORE], input=pickle.dumps(client),
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout) == [3.0]
        assert _score_with(client, ITEMS[1:2]) == [2.0]
        _score_with(copy, ITEMS[:1])
        _close(client), _close(copy)
        _close(pickle.loads(pickle.dumps(client)))  # a copy never used holds nothing of its own to close
    original, other_process, original_again, copy = srv.ports
    assert other_process != original and copy != original
    if client_class is reward.RewardClient:  # asyncio.run's loop took the async client's connection with it
        assert original_again == original, "the original's connection was not kept: the test shows less"


def _score_with(client, items):
    return client.score(items) if isinstance(client, reward.RewardClient) else asyncio.run(client.score(items))


def _close(client):
    return client.close() if isinstance(client, reward.RewardClient) else asyncio.run(client.aclose())


def test_closing_an_async_client_makes_nothing_to_close():
    """aclose() took this loop's httpx client through the getter that makes one where the loop had none, so
    closing a client never used from this loop (or a copy unpickled in this process) made a connection pool
    to close it. Nothing is made now; a loop's pool that did send is closed."""
    with RewardsServer() as srv:
        client = reward.AsyncRewardClient(srv.url)

        async def closed_and_made():
            await client.aclose()
            return asyncio.get_running_loop() in client._http

        assert not asyncio.run(closed_and_made())  # never used

        async def score_then_close():
            await client.score(ITEMS[:1])
            http = client._http[asyncio.get_running_loop()]
            await client.aclose()
            return http.is_closed

        assert asyncio.run(score_then_close())
        assert not asyncio.run(closed_and_made())  # used from another loop, not from this one
        copy = pickle.loads(pickle.dumps(client))
        asyncio.run(copy.aclose())
        assert copy._http is None


@pytest.mark.parametrize("client_class", [reward.RewardClient, reward.AsyncRewardClient])
def test_no_timeout_per_request_is_still_taken_and_other_timeouts_are_refused(client_class):
    """timeout_s=None (httpx's "no timeout") worked until deadline_s capped each request's timeout with
    min(timeout_s, time left): a TypeError on every call of the blocking client; 0, a negative,
    NaN, a string or an httpx.Timeout went to httpx unchecked, and its error messages' format."""
    with RewardsServer() as srv:
        assert _score(client_class, srv.url, timeout_s=None) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert _score(client_class, srv.url, timeout_s=None, deadline_s=30) == [1.0, 2.0, 3.0, 4.0, 5.0]
    for value in (0, -1, float("nan"), float("inf"), "300", True, httpx.Timeout(5.0)):
        with pytest.raises(ValueError, match=r"timeout_s must be None or a finite number of seconds > 0, got "):
            client_class("http://127.0.0.1:9", timeout_s=value)


class _LoopThread:
    """An event loop running in a thread of its own, as a trainer's or an actor's runs on."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def test_an_async_client_keeps_one_pool_per_live_event_loop():
    """A client called from two event loops that both live on (each thread of a reward worker with
    its own loop) made a new httpx client at every switch of loop (2224874), dropping the last one
    with its kept-alive connection unclosed: one new connection per call, the dropped ones left open
    until garbage collected ('unclosed transport'). Each loop now keeps its own."""
    with RewardsServer(keep_alive=True) as srv:
        client = reward.AsyncRewardClient(srv.url)
        loops = [_LoopThread(), _LoopThread()]
        try:
            for i in range(6):
                assert loops[i % 2].run(client.score(ITEMS[:1])) == [1.0]
            for lt in loops:
                lt.run(client.aclose())
        finally:
            for lt in loops:
                lt.close()
    assert len(set(srv.ports)) == 2, f"{len(set(srv.ports))} connections for 6 calls from 2 loops"
