"""polar/reward_client.py's clients when the server is slow, overloaded, loading, silent or not there, against
small stand-ins for `polar serve` on loopback (real HTTP): which answers are retried and how often, waits bounded
by max_wait_s, read and connect timeouts, a call's deadline, and the errors naming the URL and the wait."""
from __future__ import annotations

import asyncio
import pickle
import re
import select
import socket
import threading

import httpx
import pytest

from polar import reward_client
from tests.polar.rewards_server import RewardsServer, free_port
from tests.polar.test_reward_client import ITEMS, _score


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


def _score_and_listen(late: list, client_class, srv, items, **kw) -> None:
    """Score and, once the call has ended, append to `late` what reached the server in the next 0.3 s:
    for the async client inside the same event loop, since asyncio.run cancels every task left when
    it returns, which would hide a chunk still retrying. The call's error propagates."""
    def count_then(sent: int) -> None:
        late.append(len(srv.bodies) - sent)

    if client_class is reward_client.RewardClient:
        with reward_client.RewardClient(srv.url, **kw) as client:
            try:
                client.score(items)
            finally:
                sent = len(srv.bodies)
                threading.Event().wait(0.3)
                count_then(sent)
        return

    async def go():
        async with reward_client.AsyncRewardClient(srv.url, **kw) as client:
            try:
                await client.score(items)
            finally:
                sent = len(srv.bodies)
                await asyncio.sleep(0.3)
                count_then(sent)

    asyncio.run(go())


@pytest.mark.parametrize("client_class,done", [(reward_client.RewardClient, 2), (reward_client.AsyncRewardClient, 3)])
def test_a_deadline_bounds_a_whole_call_against_a_server_that_stays_overloaded(client_class, done):
    """max_wait_s counts from each request's first attempt: a call sent in k chunks to a server that
    keeps answering 503 took about k x max_wait_s, and an RL step had no bound. deadline_s bounds the
    call: a RewardTimeoutError naming the URL, the chunks done and left and the seconds, the chunks
    still retrying cancelled (the async client's run together: all but the two busy ones are done)."""
    items = ITEMS[:2] + [BUSY, BUSY] + ITEMS[4:]
    # long enough for the good chunks on a loaded machine (0.5 s once saw none of them done at a load of 19)
    deadline = 1.5
    with RewardsServer() as srv:
        late = []
        with pytest.raises(reward_client.RewardTimeoutError) as raised:
            _score_and_listen(late, client_class, srv, items, chunk_size=1, backoff_s=0.01, max_backoff_s=0.02,
                              max_wait_s=120, deadline_s=deadline)
    # a chunk left retrying would send every 0.02 s (about 15 more each in the 0.3 s listened), but a
    # request already on the wire at the deadline may reach the server's handler after the count: one
    # per busy chunk (the async client's two run together; seen at a load of 16)
    assert late[0] <= items.count(BUSY), f"the call's chunks went on retrying after its deadline ({late[0]} more)"
    e = raised.value
    assert isinstance(e, TimeoutError) and isinstance(e, ConnectionError)
    assert re.fullmatch(rf"no rewards from the reward server at {srv.url}/v1/rewards within deadline_s={deadline} s "
                        rf"\({done} of 5 chunks done, {5 - done} left, in [\d.]+ s; raise deadline_s, or make "
                        r"the server keep up\)", str(e)), str(e)
    assert e.url == f"{srv.url}/v1/rewards" and e.waited_s >= deadline


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
