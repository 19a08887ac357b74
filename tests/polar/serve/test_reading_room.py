"""--max-reading-bytes is given back exactly once by every request, whatever ends it (408, 413, 400,
429, a client gone while waiting or mid-body), and a request is charged what its body can really
hold: the live server on loopback, and the admission itself where two of its events must meet in
one turn of the event loop."""
import asyncio
import contextlib
import socket
import threading

import httpx
from starlette.requests import Request

from polar.serve.admission import MIN_BODY_CHARGE
from polar.serve.app import ServeSettings, Service
from polar.serve.batcher import Batcher
from polar.serve.metrics import Metrics

from .conftest import live_server
from .test_app_failures import _answer_of, _until
from .test_slow_and_gone_clients import TEXT, _HeldTokenizer, _health, _sample, _whole_request

BODY = b'{"text": ["' + TEXT.encode() + b'"]}'


@contextlib.contextmanager
def _connection(url, head: bytes, body: bytes = b""):
    """A /classify connection that sent `head`'s headers and `body`, then nothing more until told."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head + b"\r\n"
                     + body)
        yield conn


def _length(n: int) -> bytes:
    return b"Content-Length: %d\r\n" % n


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _nothing_held(url, service) -> bool:
    health = _health(url)
    return ((health["reading"], health["preparing"], health["waiting"]) == (0, 0, 0)
            and service._room.held == 0 and service.preparing == 0
            and _sample(url, "polar_serve_reading_bytes ") == 0)


def test_every_way_a_request_ends_gives_its_reading_room_back(scorer, tokenizer):
    """Room for one largest body: after each failure the whole room is free again (a leak of any
    size would refuse the next largest body for ever), and the server still answers."""
    big = 2 * MIN_BODY_CHARGE
    with live_server(scorer, tokenizer, max_body_bytes=big, max_reading_bytes=big, read_timeout_s=1.0,
                     preparing_wait_s=0.3) as (url, service):
        def ends(conn, status: bytes):
            answer = _answer_of(conn)
            assert answer.startswith(b"HTTP/1.1 " + status), answer
            assert _until(lambda: _nothing_held(url, service)), (status, _health(url), service._room.held)

        with _connection(url, _length(len(BODY)), BODY[:5]) as conn:  # stalls mid-body
            ends(conn, b"408")
        with _connection(url, b"Transfer-Encoding: chunked\r\n", _chunk(b" " * (big + 1)) + b"0\r\n\r\n") as conn:
            ends(conn, b"413")
        with _connection(url, _length(5), b"{nope") as conn:
            ends(conn, b"400")
        with _connection(url, _length(big), b"{"):  # holds the whole room
            assert _until(lambda: _health(url)["reading"] == 1)
            with _connection(url, _length(len(BODY)), BODY) as waiting:
                ends_busy = _answer_of(waiting)
                assert ends_busy.startswith(b"HTTP/1.1 429"), ends_busy
            with _connection(url, _length(len(BODY)), BODY):  # leaves while waiting
                assert _until(lambda: _health(url)["waiting"] == 1)
            assert _until(lambda: _sample(url, 'polar_serve_client_gone_total{stage="waiting"}') == 1)
        assert _until(lambda: _sample(url, 'polar_serve_client_gone_total{stage="reading"}') == 1)  # the holder
        assert _until(lambda: _nothing_held(url, service))
        with _connection(url, _length(len(BODY)), BODY[:5]):  # leaves mid-body
            assert _until(lambda: _health(url)["reading"] == 1)
        assert _until(lambda: _sample(url, 'polar_serve_client_gone_total{stage="reading"}') == 2)
        assert _until(lambda: _nothing_held(url, service))
        ok = httpx.post(f"{url}/classify", json={"text": [TEXT]}, timeout=60)
        assert ok.status_code == 200, ok.text
        assert _until(lambda: _nothing_held(url, service))


def test_a_body_framed_chunked_despite_its_content_length_is_charged_as_chunked(scorer, tokenizer):
    """With both Transfer-Encoding: chunked and a Content-Length, the HTTP server reads the body
    chunked (up to --max-body-bytes): charged its Content-Length, each such request held up to
    --max-body-bytes on a charge of 64 KiB, so --max-reading-bytes bounded nothing, and one waiting
    for room (a small Content-Length is watched by reading its body) took any size unchecked."""
    big = 4 * MIN_BODY_CHARGE
    with live_server(scorer, tokenizer, max_body_bytes=big, max_reading_bytes=big,
                     preparing_wait_s=5) as (url, service):
        head = _length(10) + b"Transfer-Encoding: chunked\r\n"
        with _connection(url, head, _chunk(BODY[:5])) as first:
            assert _until(lambda: _health(url)["reading"] == 1)
            assert service._room.held == big
            with _connection(url, head, _chunk(BODY[:5])):
                assert _until(lambda: _health(url)["waiting"] == 1)  # no room left for a second one
                assert _health(url)["reading"] == 1
            first.sendall(_chunk(BODY[5:]) + b"0\r\n\r\n")
            answer = _answer_of(first)
            assert answer.startswith(b"HTTP/1.1 200"), answer
        assert _until(lambda: _nothing_held(url, service))


def _request(declared: int) -> Request:
    """A request whose client sent its headers and nothing more."""
    async def receive():
        await asyncio.Event().wait()

    headers = [(b"content-length", str(declared).encode())]
    return Request({"type": "http", "method": "POST", "path": "/classify", "query_string": b"", "headers": headers},
                   receive)


def test_room_granted_to_a_request_cancelled_in_the_same_turn_leaves_the_gauge_at_what_is_held(tokenizer):
    """A waiting request granted room in the same turn of the event loop as it is cancelled (the
    server shutting down) or gives up gives that room back; polar_serve_reading_bytes, set only
    when a request was admitted or finished, kept counting it."""
    metrics = Metrics()
    settings = ServeSettings(max_body_bytes=MIN_BODY_CHARGE, max_reading_bytes=MIN_BODY_CHARGE,
                             preparing_wait_s=30)
    service = Service(tokenizer, Batcher(lambda b: None, tokenizer.pad_id), settings, metrics)

    async def scenario():
        first = _request(10)
        await service.admit(first)  # the whole room
        second = asyncio.ensure_future(service.admit(_request(10)))
        while service.waiting == 0:
            await asyncio.sleep(0)
        service.prepared(first)  # the room goes to the waiting one ...
        second.cancel()  # ... cancelled before it runs again
        await asyncio.gather(second, return_exceptions=True)
        return second.cancelled()

    assert asyncio.run(scenario())
    assert (service._room.held, service.reading, service.waiting) == (0, 0, 0)
    assert metrics.registry.get_sample_value("polar_serve_reading_bytes") == 0


class _RecordingTokenizer(_HeldTokenizer):
    """The held tokenizer, noting every batch of texts it is given."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.batches = []

    def encode_served_batch(self, texts):
        self.batches.append(list(texts))
        return super().encode_served_batch(texts)


def test_a_client_gone_while_waiting_for_a_slot_is_not_tokenized(scorer, tokenizer):
    """A request whose body is read waits for a --max-preparing slot; its client leaving meanwhile
    (timed out under load, when the slots are contended) was seen, but the request still took a
    slot when one came and was parsed and tokenized for nobody, ahead of requests still wanted."""
    held = _RecordingTokenizer(tokenizer)
    with live_server(scorer, held, max_preparing=1) as (url, service):
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(
            f"{url}/classify", json={"text": ["<|reward|>HOLD[UNUSED_TOKEN_130]"]}, timeout=60)))
        t.start()
        assert held.entered.wait(30)  # the one slot is taken
        with _whole_request(url, {"text": ["<|reward|>GONE[UNUSED_TOKEN_130]"]}):
            assert _until(lambda: _health(url)["reading"] == 1)  # read, waiting for the slot
        assert _until(lambda: _sample(url, 'polar_serve_client_gone_total{stage="preparing"}') == 1)
        held.release.set()
        t.join(60)
        assert first["r"].status_code == 200, first["r"].text
        assert _until(lambda: _sample(url, 'polar_serve_requests_total{endpoint="classify",status="499"}') == 1)
        assert not [b for b in held.batches if any("GONE" in text for text in b)]
        assert _until(lambda: _nothing_held(url, service))
