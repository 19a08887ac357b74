"""The live server's connection handling on loopback, with raw sockets: an early answer to a body
far over --max-body-bytes (read before the connection closes), a client that half-closes after its
request (answered; one that closed fully is still not scored), an Expect: 100-continue request
answered before its body (the connection closed), and h11's errors worded as text."""
import json
import socket
import threading

import httpx
import pytest

from .conftest import live_server, served
from .test_app_failures import _answer_of, _until, held_rounds

BODY = json.dumps({"text": served("a")}).encode()
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _connect(url) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _to_end(conn) -> bytes:
    """Everything the server sends until it closes (a reset raises)."""
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    return got


def _head_and_body(answer: bytes) -> tuple[bytes, dict]:
    head, body = answer.split(b"\r\n\r\n", 1)
    return head, json.loads(body)


@pytest.fixture(scope="module")
def server(scorer, tokenizer):
    with live_server(scorer, tokenizer, max_body_bytes=1000, max_reading_bytes=1 << 20) as s:
        yield s


@pytest.mark.parametrize("framing", [b"Transfer-Encoding: chunked", b"Content-Length: 67108864"])
def test_a_body_far_over_the_limit_is_answered_before_the_connection_closes(server, framing):
    """A client that asks for the connection to close (Connection: close; urllib sends it) and sends a
    body far over --max-body-bytes got its 413, then the server closed at once with the rest of the
    body unread, which makes the kernel reset the connection: the client's send failed (ECONNRESET or
    EPIPE) and the reset may discard the 413 before the client reads it (RFC 9112 section 9.6). The
    server now closes its side after the answer and reads and discards what still comes, for a
    while, before it closes: the client sends its whole body (64 MiB here, quickly), reads the 413,
    then the end of the connection."""
    url, _ = server
    with _connect(url) as conn:
        conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + framing + b"\r\n\r\n")
        piece = b" " * 65536
        chunked = framing.startswith(b"Transfer")
        for _ in range(1024):
            conn.sendall(b"10000\r\n" + piece + b"\r\n" if chunked else piece)
        if chunked:
            conn.sendall(b"0\r\n\r\n")
        head, body = _head_and_body(_to_end(conn))
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower(), head
    assert "(--max-body-bytes)" in body["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_an_expect_100_continue_request_answered_before_its_body_is_closed(server):
    """A client that sent Expect: 100-continue waits for the 100 before it sends its body; one
    answered without it (a 413 from its Content-Length, a 401, a 404) may send that body or not, so
    the connection cannot be read further. It was kept open: the client's next request on it was
    read as the body it never sent, and waited for ever. The answer now says Connection: close, and
    the connection closes."""
    url, _ = server
    for head in (b"POST /classify HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
                 b"POST /nowhere HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"):
        with _connect(url) as conn:
            conn.settimeout(10)
            conn.sendall(head)
            answer = _to_end(conn)
            status, _ = _head_and_body(answer)
            assert status.startswith((b"HTTP/1.1 413 ", b"HTTP/1.1 404 ")), status
            assert b"connection: close" in status.lower(), status
    with _connect(url) as conn:  # one whose body is wanted: 100 Continue, then its answer, kept alive
        conn.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                     % len(BODY))
        assert conn.recv(len(CONTINUE)) == CONTINUE
        conn.sendall(BODY)
        assert _answer_of(conn).startswith(b"HTTP/1.1 200 ")
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer_of(conn).startswith(b"HTTP/1.1 200 ")


def _half_closed(url, request: bytes) -> socket.socket:
    conn = _connect(url)
    conn.sendall(request)
    conn.shutdown(socket.SHUT_WR)  # as `nc -N` and some HTTP clients do once the request is sent
    return conn


def _post(version: bytes = b"1.1") -> bytes:
    return (b"POST /classify HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (version, len(BODY)) + BODY)


def test_a_client_that_half_closes_after_its_request_gets_its_answer(scorer, tokenizer):
    """A client that sent its whole request and then shut down its sending side (shutdown(SHUT_WR):
    `nc -N`, some HTTP clients) got no answer: the end of its stream was taken for a client gone.
    It is answered now, then the connection closes. A client that closed fully looks the same
    (both send a FIN), and its work must still be skipped: an HTTP/1.1 request other than a GET or
    HEAD gets a 100 Continue at that end, which a client gone answers with a reset; one that reset is
    treated as gone, as before, and a half-closed one reads the 100, then its answer."""
    gate, rounds, held = held_rounds(scorer)
    gate.set()
    with live_server(scorer, tokenizer, score=held) as (url, service):
        # an HTTP/1.0 client may be sent no 1xx (RFC 9110 section 15.2)
        for request, first in ((_post(), CONTINUE), (_post(b"1.0"), b""),
                               (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"")):
            with _half_closed(url, request) as conn:
                answer = _to_end(conn)
            assert answer.startswith(first + b"HTTP/1.1 200 "), (request, answer)
            assert _head_and_body(answer.removeprefix(first))[1], answer
        assert service.batcher.totals.items == 2
        gate.clear()
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(f"{url}/classify", json={"text": [served("b")]},
                                                                       timeout=60)))
        t.start()
        assert _until(lambda: len(rounds) == 3)  # held in its round: the next requests wait in the queue
        waiting = _half_closed(url, _post())
        with _connect(url) as gone:
            gone.sendall(_post())
            assert _until(lambda: service.batcher.queued_items == 2)
        gone_queued = 'polar_serve_client_gone_total{stage="queued"} 1.0'
        assert _until(lambda: gone_queued in httpx.get(f"{url}/metrics").text, 10)
        with waiting:
            assert waiting.recv(len(CONTINUE)) == CONTINUE  # asked while it waits: still there
            gate.set()
            answer = _to_end(waiting)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        t.join(60)
        assert first["r"].status_code == 200
        assert service.batcher.totals.items == 4  # the two held and waiting; not the one gone


@pytest.mark.parametrize("request_bytes, says", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad\x01: \xff\r\n\r\n", "illegal header line: 'X-Bad\\x01: \ufffd'"),
    (b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     "illegal chunk header: 'zz\\r\\n'"),
])
def test_h11_errors_name_the_bytes_as_text(server, request_bytes, says):
    """h11 words what it found as a Python bytes repr (bytearray(b'zz\\r\\n')), which read as code in
    the error message; it is quoted as text now, control characters escaped."""
    url, _ = server
    with _connect(url) as conn:
        conn.sendall(request_bytes)
        head, body = _head_and_body(_to_end(conn))
    assert head.startswith(b"HTTP/1.1 400 ")
    assert body["error"]["message"] == f"the request is not valid HTTP/1.1: {says}"


def test_an_idle_kept_alive_connection_lasts_the_read_timeout(server):
    """uvicorn closed a kept-alive connection after 5 s without a request (its timeout_keep_alive),
    though the head deadline gives the next head --read-timeout-s (60 s here). Load balancers and
    clients pool connections for longer (AWS ALB 60 s, aiohttp 15 s) and one that reused a connection
    as the server closed it lost that request (a 502, a ServerDisconnectedError). Idle connections
    now close at the head deadline."""
    import time

    url, _ = server
    with _connect(url) as conn:
        for _ in range(2):
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer_of(conn).startswith(b"HTTP/1.1 200 ")
            time.sleep(5.5)  # past uvicorn's 5 s


@pytest.mark.parametrize("behind, answers", [(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 2), (_post(), 2),
                                             (b"GET /health HTTP/1.1\r\nHo", 1)])
def test_requests_pipelined_before_a_half_close_are_answered_in_turn(server, behind, answers):
    """A client that pipelined a request behind a POST and then shut down its sending side got the
    POST's answer only: the end of its stream, read while the POST was read, closed the connection
    after that answer with the next request whole in the buffer. Each whole request is answered now,
    then the connection closes; a head cut off by the end is not waited for (--read-timeout-s)."""
    url, _ = server
    with _half_closed(url, _post() + behind) as conn:
        conn.settimeout(10)
        answer = _to_end(conn)
    assert answer.count(b"HTTP/1.1 200 ") == answers, answer
    assert answer.startswith(CONTINUE + b"HTTP/1.1 200 "), answer


def test_a_uvicorn_release_outside_the_tested_ones_is_warned_of():
    """http_protocol subclasses uvicorn's H11Protocol and uses its undocumented attributes: a release
    it was not run against could handle connections otherwise with no error, so start-up says so."""
    import uvicorn

    from polar.serve.http_protocol import uvicorn_untested

    assert uvicorn_untested(uvicorn.__version__) is None  # requirements.txt's
    assert uvicorn_untested("0.22.0") is None and uvicorn_untested("0.55.1") is None
    for version in ("0.21.1", "0.56.0", "1.0.0", "0.60.0.dev1"):
        assert f"uvicorn {version} is not among the releases" in uvicorn_untested(version)
