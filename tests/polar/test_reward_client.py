"""polar/reward_client.py (RewardClient, AsyncRewardClient and their errors) against small stand-ins for
`polar serve` on loopback (real HTTP, no mocks of the client): chunks and their order, answers that are not one
reward per item, retries, waits for an overloaded or loading server, timeouts, deadlines, forks, pickling,
event loops and their connection pools."""
from __future__ import annotations

import asyncio
import json
import pickle
import re
import select
import socket
import threading

import httpx
import pytest

from polar import reward_client
from tests.polar.rewards_server import RewardsServer, at_once, free_port


ITEMS = [{"prompt": "p", "reference": "r", "output": "x" * n} for n in (1, 2, 3, 4, 5)]


def test_rewards_follow_the_answers_indices_in_every_chunk():
    with RewardsServer("reversed") as srv:
        with reward_client.RewardClient(srv.url, chunk_size=2) as client:
            assert client.score(ITEMS) == [1.0, 2.0, 3.0, 4.0, 5.0]

        async def go():
            async with reward_client.AsyncRewardClient(srv.url, chunk_size=2) as client:
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
    with RewardsServer(mode) as srv, reward_client.RewardClient(srv.url, chunk_size=2) as client:
        with pytest.raises(reward_client.RewardServerError,
                           match=rf"^reward server at {srv.url}/v1/rewards answered 200: .*{message}"):
            client.score(ITEMS)


@pytest.mark.parametrize("kw,message", [({"chunk_size": 0}, "chunk_size"), ({"max_retries": -1}, "max_retries")])
def test_client_settings_that_could_never_send_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        reward_client.RewardClient("http://127.0.0.1:9", **kw)


def test_chunks_keep_under_the_clients_body_budget_in_order():
    items = [{"prompt": "p", "reference": "r" * 300, "output": "x" * n} for n in range(1, 41)]
    with RewardsServer() as srv, reward_client.RewardClient(srv.url, max_body_bytes=2_000) as client:
        assert client.score(items) == [float(n) for n in range(1, 41)]
    assert len(srv.sizes) > 5 and max(srv.sizes) <= 2_000, srv.sizes
    assert [it["output"] for b in srv.bodies for it in b["items"]] == [it["output"] for it in items]


def test_an_item_that_is_not_text_is_named_before_sending():
    with pytest.raises(ValueError, match="item 1 holds a lone surrogate"):
        reward_client.RewardClient("http://127.0.0.1:9").score([ITEMS[0], {"prompt": "p", "reference": "r",
                                                                    "output": "\ud800"}])
    with pytest.raises(ValueError, match="max_body_bytes must be a positive integer"):
        reward_client.RewardClient("http://127.0.0.1:9", max_body_bytes=0)


def test_a_bad_item_is_named_by_its_index_in_the_call_not_in_its_chunk():
    # the server numbers the items of the request it got: sent in chunks of 2, item 5 was "items[1]"
    items = ITEMS + [{"prompt": "p", "reference": "r", "output": 7}]
    with RewardsServer() as srv:
        with reward_client.RewardClient(srv.url, chunk_size=2) as client:
            with pytest.raises(reward_client.RewardServerError,
                               match=r"answered 400: items\[5\]\.output must be") as err:
                client.score(items)
        # the server named by its URL; Ray (verl's reward functions) pickles a worker's exception to the
        # driver, which failed (TypeError: __init__() missing 'message') and lost the error
        # and kept only the arguments: a note added on the way (add_note) and an attribute set were lost
        err.value.add_note("step 12")
        err.value.step = 12
        e = pickle.loads(pickle.dumps(err.value))
        assert type(e) is reward_client.RewardServerError and str(e) == str(err.value)
        assert (e.status, e.url) == (400, f"{srv.url}/v1/rewards") and str(e).startswith(f"reward server at {e.url} ")
        assert (e.__notes__, e.step, e.message) == (["step 12"], 12, err.value.message)

        async def go():
            async with reward_client.AsyncRewardClient(srv.url, chunk_size=4) as client:
                return await client.score(items)

        with pytest.raises(reward_client.RewardServerError, match=r"answered 400: items\[5\]\.output must be"):
            asyncio.run(go())


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
def test_an_item_over_the_servers_body_limit_by_itself_is_named(client_class):
    """A chunk over the server's --max-body-bytes is halved down to the item too long alone, whose
    413 ("the body is N bytes ...") named no item: which of a batch of rollouts was too long?"""
    items = ITEMS[:2] + [{"prompt": "p", "reference": "r", "output": "x" * 3000}] + ITEMS[2:]
    with RewardsServer(max_body=2000) as srv:
        with pytest.raises(reward_client.RewardServerError,
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
    with RewardsServer(keep_alive=True) as srv, reward_client.RewardClient(srv.url) as client:
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
        client = reward_client.AsyncRewardClient(srv.url)
        for _ in range(2):
            assert asyncio.run(twice(client)) == [[1.0, 2.0], [3.0, 4.0, 5.0]]
        asyncio.run(client.aclose())
    assert srv.ports[0] == srv.ports[1], "no connection was kept alive: the test shows nothing"


def test_a_408_is_retried():
    """`polar serve` answers 408 to a body that came slower than its --read-timeout-s; the same body
    sent again may come in time."""
    with RewardsServer("408-once") as srv, reward_client.RewardClient(srv.url, backoff_s=0.01) as client:
        assert client.score(ITEMS) == [1.0, 2.0, 3.0, 4.0, 5.0] and len(srv.bodies) == 2


def test_an_async_call_that_failed_stops_its_other_chunks():
    """One chunk refused (400): the call raises, and its other chunk, retrying a busy server (503),
    is cancelled with it instead of retrying on in the caller's event loop."""
    items = [{"prompt": "p", "reference": "r", "output": 3}, {"prompt": "p", "reference": "r", "output": "busy"}]

    async def go(srv):
        async with reward_client.AsyncRewardClient(srv.url, chunk_size=1, backoff_s=0.05, max_backoff_s=0.05,
                                            max_retries=100) as client:
            with pytest.raises(reward_client.RewardServerError, match=r"items\[0\]"):
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
        with reward_client.RewardClient(srv.url, max_retries=2, backoff_s=0.001) as client:
            assert client.score(ITEMS) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert len(srv.bodies) == 11

    async def go(url, **kw):
        async with reward_client.AsyncRewardClient(url, max_retries=2, backoff_s=0.001, **kw) as client:
            return await client.score(ITEMS)

    with RewardsServer(overloaded=10, overload_status=status) as srv:
        assert asyncio.run(go(srv.url)) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert len(srv.bodies) == 11
    # no time to wait: max_retries alone, and the error says which limit gave out
    message = (rf"answered {status}: the server's queue is full \(gave up after 3 attempts in [\d.]+ s: "
               r"max_retries=2, and max_wait_s=0 for a 429, a 503 or a refused connection\)")
    with RewardsServer(overloaded=10, overload_status=status) as srv:
        with reward_client.RewardClient(srv.url, max_retries=2, backoff_s=0.001, max_wait_s=0) as client:
            with pytest.raises(reward_client.RewardServerError, match=message):
                client.score(ITEMS)
        assert len(srv.bodies) == 3
        with pytest.raises(reward_client.RewardServerError, match=message):
            asyncio.run(go(srv.url, max_wait_s=0))
        assert len(srv.bodies) == 6


def test_other_retryable_answers_keep_to_max_retries():
    """max_wait_s is for an overloaded server; a 502 (a proxy whose backend is down) is not waited
    out for minutes."""
    with RewardsServer(overloaded=10, overload_status=502) as srv:
        with reward_client.RewardClient(srv.url, max_retries=2, backoff_s=0.001) as client:
            with pytest.raises(reward_client.RewardServerError, match=r"answered 502: .*gave up after 3 attempts"):
                client.score(ITEMS)
        assert len(srv.bodies) == 3


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "60", True])
def test_a_max_wait_s_that_is_not_a_wait_is_refused(value):
    with pytest.raises(ValueError, match="max_wait_s must be a finite number of seconds >= 0"):
        reward_client.RewardClient("http://127.0.0.1:9", max_wait_s=value)


def _score(client_class, url: str, items=ITEMS, **kw) -> list[float]:
    if client_class is reward_client.RewardClient:
        with reward_client.RewardClient(url, **kw) as client:
            return client.score(items)

    async def go():
        async with reward_client.AsyncRewardClient(url, **kw) as client:
            return await client.score(items)

    return asyncio.run(go())


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
def test_a_server_still_loading_its_model_is_waited_for(client_class):
    """`polar serve` refuses connections until its model has loaded (seconds for a tiny model,
    minutes for a 7B): a refused connection was retried max_retries times, ~20 s, and the RL step
    failed with a bare ConnectError. It is now waited for max_wait_s, as a 503 is."""
    port = free_port()
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


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
def test_a_refused_connection_past_max_wait_s_names_the_url_and_the_limits(client_class):
    url = f"http://127.0.0.1:{free_port()}"
    message = (rf"cannot connect to the reward server at {url}/v1/rewards: connection refused \(gave up after 2 "
               r"attempts in [\d.]+ s: max_retries=1, and max_wait_s=0 for a 429, a 503 or a refused connection\)")
    with pytest.raises(ConnectionError, match=message) as raised:
        _score(client_class, url, max_retries=1, backoff_s=0.01, max_wait_s=0)
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert type(raised.value) is reward_client.RewardConnectionError and raised.value.attempts == 2


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


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
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
    assert isinstance(e, reward_client.RewardTimeoutError) and isinstance(e, ConnectionError)
    assert re.fullmatch(rf"the reward server at {srv.url}/v1/rewards sent no answer within timeout_s=0.3 s \(1 "
                        r"attempt in [\d.]+ s; not sent again: the server may still be scoring it, .* raise "
                        r"timeout_s, or send fewer items per request by lowering chunk_size=512\)", str(e)), str(e)
    assert (e.url, e.attempts) == (f"{srv.url}/v1/rewards", 1) and e.waited_s >= 0.3
    assert isinstance(e.__cause__, httpx.ReadTimeout)


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
def test_a_host_name_that_does_not_resolve_names_the_host_and_what_was_tried(client_class):
    """It ended in a bare httpx.ConnectError "[Errno -2] Name or service not known", which an RL
    trainer's user could not tell from a bug."""
    url = "http://polar-no-such-host.invalid:1"
    with pytest.raises(ConnectionError) as raised:
        _score(client_class, url, max_retries=1, backoff_s=0.01)
    e = raised.value
    assert type(e) is reward_client.RewardConnectionError, repr(e)
    assert re.fullmatch(rf"cannot connect to the reward server at {url}/v1/rewards: host name "
                        r"'polar-no-such-host.invalid' not found \(.+\) \(gave up after 2 attempts in [\d.]+ s: "
                        r"max_retries=1, and max_wait_s=300 for a 429, a 503 or a refused connection\)", str(e)), str(e)
    # Ray (verl's reward functions run in its workers) pickles a worker's exception to the driver
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is reward_client.RewardConnectionError and str(again) == str(e) and again.attempts == 2


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
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
    assert type(e) is reward_client.RewardTimeoutError, repr(e)
    assert re.fullmatch(rf"cannot connect to the reward server at {url}/v1/rewards: no connection within "
                        r"timeout_s=0.2 s \(gave up after 2 attempts in [\d.]+ s: max_retries=1, .*\)", str(e)), str(e)


def test_health_of_a_server_not_there_names_the_url():
    """health() let httpx's ConnectError out; it asks once (whether the server is up now)."""
    url = f"http://127.0.0.1:{free_port()}"
    with reward_client.RewardClient(url) as client:
        with pytest.raises(reward_client.RewardConnectionError,
                           match=rf"cannot connect to the reward server at {url}/health: connection refused "
                                 r"\(1 attempt in [\d.]+ s\)"):
            client.health()


def test_health_of_a_server_answering_no_json_names_the_url():
    """A server that is not `polar serve` (the stand-in has no GET: http.server's HTML 501 page) let
    json's JSONDecodeError out, naming neither the server nor the answer."""
    with RewardsServer() as srv, reward_client.RewardClient(srv.url) as client:
        with pytest.raises(reward_client.RewardServerError,
                           match=rf"^reward server at {srv.url}/health answered 501: an answer that is not JSON: "):
            client.health()


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
@pytest.mark.parametrize("url", ["ftp://127.0.0.1:9/", "htp://rm:8000"])
def test_a_url_of_another_scheme_is_refused_when_the_client_is_made(client_class, url):
    """httpx refuses such a URL only when a request is sent (UnsupportedProtocol), which the client then
    retried max_retries times before a connection error that did not say the scheme was the fault."""
    with pytest.raises(ValueError, match=r"the scheme must be http or https, got '(ftp|htp)'"):
        client_class(url)


BUSY = {"prompt": "p", "reference": "r", "output": "busy"}  # answered 503 by RewardsServer, every time


@pytest.mark.parametrize("client_class,done", [(reward_client.RewardClient, 2), (reward_client.AsyncRewardClient, 3)])
def test_a_deadline_bounds_a_whole_call_against_a_server_that_stays_overloaded(client_class, done):
    """max_wait_s counts from each request's first attempt: a call sent in k chunks to a server that
    keeps answering 503 took about k x max_wait_s, and an RL step had no bound. deadline_s bounds the
    call: a RewardTimeoutError naming the URL, the chunks done and left and the seconds, the chunks
    still retrying cancelled (the async client's run together: all but the two busy ones are done)."""
    items = ITEMS[:2] + [BUSY, BUSY] + ITEMS[4:]
    with RewardsServer() as srv:
        with pytest.raises(reward_client.RewardTimeoutError) as raised:
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


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
def test_a_deadline_ends_a_request_in_flight(client_class):
    """A request sent in full and unanswered waits timeout_s (300 s by default): the deadline ends it
    sooner, with the deadline's error, not the timeout's."""
    with SilentServer() as srv:
        with pytest.raises(reward_client.RewardTimeoutError, match=r"within deadline_s=0.4 s \(0 of 1 chunks done"):
            _score(client_class, srv.url, deadline_s=0.4)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "60", True])
def test_a_deadline_that_is_not_a_time_is_refused(value):
    with pytest.raises(ValueError, match="deadline_s must be None or a finite number of seconds > 0"):
        reward_client.RewardClient("http://127.0.0.1:9", deadline_s=value)


def test_threads_of_a_forked_process_share_its_one_new_connection_pool():
    """A forked process makes an httpx client of its own (2803df7); its threads' first calls made
    one each, all but one dropped unclosed. The parent's is untouched."""
    client = reward_client.RewardClient(f"http://127.0.0.1:{free_port()}")
    parents = client._connections()

    def made():
        made = at_once(client._connections)
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


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
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
    if client_class is reward_client.RewardClient:  # asyncio.run's loop took the async client's connection with it
        assert original_again == original, "the original's connection was not kept: the test shows less"


def _score_with(client, items):
    return client.score(items) if isinstance(client, reward_client.RewardClient) else asyncio.run(client.score(items))


def _close(client):
    return client.close() if isinstance(client, reward_client.RewardClient) else asyncio.run(client.aclose())


def test_closing_an_async_client_makes_nothing_to_close():
    """aclose() took this loop's httpx client through the getter that makes one where the loop had none, so
    closing a client never used from this loop (or a copy unpickled in this process) made a connection pool
    to close it. Nothing is made now; a loop's pool that did send is closed."""
    with RewardsServer() as srv:
        client = reward_client.AsyncRewardClient(srv.url)

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


@pytest.mark.parametrize("client_class", [reward_client.RewardClient, reward_client.AsyncRewardClient])
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
        client = reward_client.AsyncRewardClient(srv.url)
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
