"""The live server on loopback against clients that are slow or leave: bodies sent slowly hold no
--max-preparing slot (reading waits on the network; --max-reading-bytes bounds what is held), and a
client that leaves while its request is parsed or tokenized is not scored."""
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from .conftest import live_server
from .test_app_failures import _answer_of, _part_of_a_body, _until, held_rounds

TEXT = "<|reward|>a[UNUSED_TOKEN_130]"


def _health(url) -> dict:
    return httpx.get(f"{url}/health").json()


def _sample(url, line_start: str) -> float:
    """The value of the /metrics line starting with `line_start` (0 when absent)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_slow_bodies_leave_the_preparing_slots_to_fast_requests(scorer, tokenizer, alone):
    """--max-preparing clients sending their bodies slowly (a slow network, a slowloris) held every
    slot while their bodies trickled in, for up to --read-timeout-s, and a fast client got 429. Now
    reading a body takes no slot: the fast request is scored while the slow ones are still open."""
    with live_server(scorer, tokenizer, max_preparing=2, preparing_wait_s=1) as (url, service):
        with _part_of_a_body(url) as (a, rest_a), _part_of_a_body(url) as (b, rest_b):
            assert _until(lambda: _health(url)["reading"] == 2)
            fast = httpx.post(f"{url}/classify", json={"text": [TEXT]}, timeout=60)
            assert fast.status_code == 200, fast.text
            assert fast.json()[0]["embedding"][0] == pytest.approx(
                float(alone(tokenizer.encode_served_batch([TEXT]))[0]), abs=1e-5)
            assert _health(url)["reading"] == 2  # both slow bodies still being read
            for conn, rest in ((a, rest_a), (b, rest_b)):
                conn.sendall(rest)
            for conn in (a, b):
                answer = _answer_of(conn)
                assert answer.startswith(b"HTTP/1.1 200"), answer
        health = _health(url)
        assert (health["reading"], health["preparing"], health["waiting"]) == (0, 0, 0)
        assert service.batcher.totals.items == 3


def _trickled_head(conn) -> bytes:
    """A request head sent a byte every 50 ms (a slowloris), until the server answers or closes (20
    s at most): -> what the server sent."""
    conn.settimeout(0.05)
    for byte in b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 400:
        try:
            conn.sendall(bytes([byte]))
            got = conn.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return b""
        conn.settimeout(30)
        return got + _answer_of(conn) if got else got
    return b""


def test_a_request_head_must_arrive_within_the_read_timeout(scorer, tokenizer):
    """uvicorn bounds no request head: a connection that sent nothing, or its head a byte at a time
    (a slowloris, 400 bytes here for 20 s), was held for ever, each one a file descriptor, until the
    server could accept no one. The head must now arrive within --read-timeout-s of the connection
    opening or of the answer before it (408 naming the flag, then the connection closes); a request
    whose scoring takes longer is still answered."""
    gate, rounds, held = held_rounds(scorer)
    gate.set()
    with live_server(scorer, tokenizer, score=held, read_timeout_s=1) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            answer = _trickled_head(conn)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"] == (
                "the request head did not arrive within 1 s (--read-timeout-s)")
            assert conn.recv(1) == b""  # closed
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            assert conn.recv(1) == b""  # sent nothing: closed without an answer
        with socket.create_connection((host, int(port)), timeout=30) as conn:  # kept alive after an answer
            body = json.dumps({"text": TEXT}).encode()  # one text: one object, the whole answer once its '}' is in
            conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            assert _answer_of(conn).startswith(b"HTTP/1.1 200 ")
            assert _trickled_head(conn).startswith(b"HTTP/1.1 408 ")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            # answered 415 before its body came, its client still sending a chunk header past the
            # deadline: closed, where a second answer, a 408 for a head, followed the 415
            conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1")
            assert _answer_of(conn).startswith(b"HTTP/1.1 415 ")
            after = b""
            while got := conn.recv(65536):
                after += got
            assert after == b"", after
        gate.clear()
        answers = {}
        slow = threading.Thread(target=lambda: answers.update(r=httpx.post(f"{url}/classify", json={"text": [TEXT]},
                                                                             timeout=60)))
        slow.start()
        assert _until(lambda: len(rounds) == 2)  # held in its round
        time.sleep(2)  # past the deadline, in flight
        gate.set()
        slow.join(60)
        assert answers["r"].status_code == 200, answers["r"].text


@contextlib.contextmanager
def _whole_request(url, payload):
    """A /classify request sent whole on a connection of its own, closed on leaving: the client gone."""
    body = json.dumps(payload).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        yield


class _HeldTokenizer:
    """The real byte tokenizer, holding a batch of texts holding HOLD until released."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode_served_batch(self, texts):
        if any("HOLD" in t for t in texts):
            self.entered.set()
            self.release.wait(60)
        return self._tokenizer.encode_served_batch(texts)


def test_a_client_gone_while_its_request_is_tokenized_is_not_scored(scorer, tokenizer):
    """A client that closed its connection while its request was tokenized was not watched until
    its items were queued, and the batcher could take them first: scored for nobody. Made certain
    here by holding the event loop in submit() until the batcher has formed its round, as a busy
    loop does, for as long as the GIL lets the worker run first."""
    held = _HeldTokenizer(tokenizer)
    with live_server(scorer, held, batcher_kw=dict(max_wait_s=0.0)) as (url, service):
        batcher = service.batcher
        submit = batcher.submit

        def submit_then_hold_the_loop(ids):
            fut = submit(ids)
            _until(lambda: fut.running() or fut.done(), 10)
            return fut

        batcher.submit = submit_then_hold_the_loop
        with _whole_request(url, {"text": ["<|reward|>HOLD[UNUSED_TOKEN_130]"]}):
            assert held.entered.wait(30)  # being tokenized: the client leaves now
        gone = 'polar_serve_client_gone_total{stage="preparing"}'
        noticed = _until(lambda: _sample(url, gone) == 1, 10)
        held.release.set()
        answered = 'polar_serve_requests_total{endpoint="classify",'
        assert _until(lambda: sum(_sample(url, answered + f'status="{s}"}}') for s in (200, 499)) == 1)
        assert batcher.totals.items == 0  # not scored
        assert _sample(url, answered + 'status="499"}') == 1 and noticed
        ok = httpx.post(f"{url}/classify", json={"text": [TEXT]}, timeout=60)
        assert ok.status_code == 200 and batcher.totals.items == 1


def test_bodies_being_read_are_bounded_by_max_reading_bytes(scorer, tokenizer):
    """Reading takes no slot, so the memory of the bodies being read is bounded by bytes: each
    request is charged its Content-Length (at least MIN_BODY_CHARGE), and one that does not fit
    waits for room (then 429), its body unread. Two slow bodies fill room for two here."""
    from polar.serve.admission import MIN_BODY_CHARGE

    room = 2 * MIN_BODY_CHARGE
    with live_server(scorer, tokenizer, max_body_bytes=MIN_BODY_CHARGE, max_reading_bytes=room,
                     preparing_wait_s=0.5) as (url, service):
        assert service.charge(10) == service.charge(MIN_BODY_CHARGE) == MIN_BODY_CHARGE
        assert service.charge(None) == MIN_BODY_CHARGE  # chunked: up to --max-body-bytes
        with _part_of_a_body(url) as (a, rest_a), _part_of_a_body(url) as (b, rest_b):
            assert _until(lambda: _health(url)["reading"] == 2)
            assert _sample(url, "polar_serve_reading_bytes ") == room
            busy = httpx.post(f"{url}/classify", json={"text": [TEXT]}, timeout=60)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
            assert f"holding {room} of the {room} bytes" in busy.json()["error"]["message"]
            a.sendall(rest_a)
            assert _answer_of(a).startswith(b"HTTP/1.1 200")
            assert httpx.post(f"{url}/classify", json={"text": [TEXT]}, timeout=60).status_code == 200
            b.sendall(rest_b)
            assert _answer_of(b).startswith(b"HTTP/1.1 200")
        assert _sample(url, "polar_serve_reading_bytes ") == 0


def test_max_reading_bytes_default_and_refusals(tokenizer):
    """By default room for --max-preparing bodies of --max-body-bytes (what the slots held when a
    body was read in one); less than one such body (or one request's least charge) could never be
    read, so it is refused at start-up, as --max-preparing 0 is (no request could be tokenized)."""
    from polar.serve.admission import MIN_BODY_CHARGE
    from polar.serve.app import ServeSettings, Service
    from polar.serve.batcher import Batcher
    from polar.serve.metrics import Metrics
    from polar.serve.server import parse_args

    def service(**settings):
        return Service(tokenizer, Batcher(lambda b: None, tokenizer.pad_id), ServeSettings(**settings), Metrics())

    assert service(max_preparing=3, max_body_bytes=10**6).max_reading_bytes == 3 * 10**6
    assert service(max_body_bytes=1000, max_reading_bytes=MIN_BODY_CHARGE).max_reading_bytes == MIN_BODY_CHARGE
    for settings, names in ((dict(max_body_bytes=10**6, max_reading_bytes=10**6 - 1), "--max-body-bytes 1000000"),
                            (dict(max_body_bytes=1000, max_reading_bytes=1000), f"at least {MIN_BODY_CHARGE} bytes"),
                            (dict(max_preparing=0), "--max-preparing must be 1 or more")):
        with pytest.raises(ValueError, match=names):
            service(**settings)
    assert parse_args(["--checkpoint", "c", "--max-reading-bytes", str(2**26)]).max_reading_bytes == 2**26
    for flags in (["--max-reading-bytes", str(2**26 - 1)], ["--max-preparing", "0"], ["--max-queue", "0"],
                  ["--max-items", "0"], ["--max-queue", "100"]):  # --max-items' 4096 > 100: only into an empty queue
        with pytest.raises(SystemExit):
            parse_args(["--checkpoint", "c", *flags])
    assert parse_args(["--checkpoint", "c", "--max-queue", "100", "--max-items", "100"]).max_items == 100


def test_where_clients_leave_is_counted(scorer, tokenizer):
    """polar_serve_client_gone_total tells an operator whether clients that give up cost model time:
    one gone while its body is read costs none; one gone while its batch runs was scored for nobody."""
    gate, rounds, held = held_rounds(scorer)
    with live_server(scorer, tokenizer, score=held) as (url, service):
        with _part_of_a_body(url):
            assert _until(lambda: _health(url)["reading"] == 1)
        assert _until(lambda: _sample(url, 'polar_serve_client_gone_total{stage="reading"}') == 1)
        with _whole_request(url, {"text": [TEXT]}):
            assert _until(lambda: rounds)  # its round has started: the client leaves now
        assert _until(lambda: _sample(url, 'polar_serve_client_gone_total{stage="scoring"}') == 1)
        gate.set()
        assert _until(lambda: service.batcher.totals.items == 1)
        for stage in ("waiting", "preparing", "queued"):
            assert _sample(url, f'polar_serve_client_gone_total{{stage="{stage}"}}') == 0
