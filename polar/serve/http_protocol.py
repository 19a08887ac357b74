"""uvicorn's HTTP/1.1 protocol as `polar serve` runs it (http_protocol): a deadline on each request's head,
HTTP errors in the JSON error shape, a lingering close, and an answer for a client that ends its stream
after its request. It subclasses uvicorn's H11Protocol and builds on attributes of it, of its
RequestResponseCycle and of h11's connection that are not documented: tested with uvicorn 0.22 to 0.55
(UVICORN_TESTED), and a release outside them is warned of at start-up (uvicorn_untested).
"""
from __future__ import annotations

import re
import sys
from http import HTTPStatus
from typing import Optional


# RFC 9112 section 9.6: a server that closes its connection while the client is still sending makes
# the kernel answer the client's data with a reset, which may discard the answer before the client
# reads it. So the server closes its sending side after the answer, reads and discards what still
# comes until the client closes, and closes in full after at most this long.
LINGER_S = 5.0
# A client whose request is complete and that then ends its stream may have closed fully (it gave
# up) or shut down its sending side only (`nc -N`, some HTTP clients), and both look the same. Its
# request, unless a GET or HEAD (answered at once, no work to skip), is sent a 100 Continue then (a
# 1xx may precede any HTTP/1.1 answer, RFC 9110 section 15.2), which a closed socket answers with a
# reset, seen as the socket's error within a round trip: checked this long after the 100, then
# after each of the next delays.
PROBE_CHECKS_S = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 4.0)
# h11 words the bytes it found as a Python repr: b'zz\r\n', bytearray(b'zz\r\n')
_LITERAL = r"""b('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_BYTES_REPR = re.compile(rf"bytearray\({_LITERAL}\)|(?<!\w){_LITERAL}")


def _as_text(message: str) -> str:
    """An h11 message with the bytes it quotes as text (UTF-8, control characters escaped)."""
    import ast

    return _BYTES_REPR.sub(lambda m: repr(ast.literal_eval("b" + (m[1] or m[2])).decode("utf-8", "replace")),
                           message)


class _Transport:
    """A connection's transport as uvicorn's request cycle sees it: close() is the protocol's, a
    lingering close where the client may still be sending (LINGER_S); nothing is written after it."""

    def __init__(self, transport, protocol):
        self.raw, self._protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def close(self) -> None:
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self.raw.is_closing()

    def write(self, data) -> None:
        if not self._protocol.lingering:
            self.raw.write(data)


# The uvicorn releases http_protocol was run against (tests/polar/serve: test_http_edges, test_app,
# test_app_failures, test_reading_room, test_slow_and_gone_clients): it subclasses H11Protocol and
# reads and sets attributes of it and of its RequestResponseCycle, none of them documented, so a
# release that renamed one would change how connections are handled without an error.
UVICORN_TESTED = ("0.22", "0.55")


def uvicorn_untested(version: str) -> Optional[str]:
    """A warning for a uvicorn release outside UVICORN_TESTED, None for one inside."""
    def release(v):
        return tuple(int(p) for p in re.findall(r"\d+", v)[:2])

    if release(UVICORN_TESTED[0]) <= release(version) <= release(UVICORN_TESTED[1]):
        return None
    return (f"uvicorn {version} is not among the releases polar serve's connection handling was tested with "
            f"({UVICORN_TESTED[0]} to {UVICORN_TESTED[1]}; requirements.txt pins one): it builds on uvicorn's "
            "internals, so idle, half-closed and early-answered connections may be handled otherwise, silently")


def http_protocol(timeout_s: float):
    """uvicorn's HTTP/1.1 protocol with, for an RL trainer's clients, load balancers and probes:

    - a deadline on each request's head: it must arrive within `timeout_s` (--read-timeout-s) of the
      connection opening, or of the answer before it on a kept-alive connection. uvicorn has none
      (its keep-alive timeout restarts with every byte and does not run before a first request), so a
      client that opened a connection and sent nothing, or sent its head a byte at a time (a
      slowloris), held the connection and its file descriptor for ever, and enough of them would
      leave the server unable to accept anyone. A head cut off is answered 408 naming the flag; a
      connection that sent nothing is closed as uvicorn closes an idle one. The deadline is the idle
      timeout of a kept-alive connection too (uvicorn's was 5 s).
    - a request that is not HTTP/1.1 (a Content-Length "abc" or "-5", a bad request line or header)
      answered in the JSON error shape, naming what h11 found, where uvicorn answered plain text
      "Invalid HTTP request received.".
    - a lingering close (LINGER_S) where the client may still be sending: an answer given before a
      body far over --max-body-bytes had arrived was lost to the reset of a plain close.
    - a client that ends its stream after a whole request is answered, then the connection closed:
      uvicorn took it for a client gone and answered nobody, and `nc -N` got nothing. A request of
      a client that closed fully is still treated as gone once a 100 Continue sent at that end finds
      it so (PROBE_CHECKS_S); an HTTP/1.0 client may be sent no 1xx, so it is always answered."""
    import asyncio
    import socket

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from polar.serve.app import error_body

    def answer(status: int, message: str) -> bytes:
        body = error_body(status, message)
        return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n" % (status, HTTPStatus(status).phrase.encode(), len(body)) + body)

    late = answer(408, f"the request head did not arrive within {timeout_s:g} s (--read-timeout-s)")
    probe = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")

    class ServeProtocol(H11Protocol):
        _head_timer = _linger = _probe = None
        _lost = _ended = False  # the connection; the client's stream

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # uvicorn's own idle timeout (5 s by default) closed a kept-alive connection well before the
            # head deadline: load balancers and client pools keep idle connections longer (AWS ALB 60
            # s, aiohttp 15 s), and one reused as the server closed it lost its request
            self.timeout_keep_alive = timeout_s

        @property
        def lingering(self) -> bool:
            return self._linger is not None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(_Transport(transport, self))
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # which may start the next pipelined request at once
            if self._ended and not self.transport.is_closing() and not self._answer_last():
                self.transport.close()  # its stream ended with no whole request left to answer
            self._await_head()

        def connection_lost(self, exc) -> None:
            self._lost = True
            for timer in (self._head_timer, self._linger, self._probe):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self.lingering:  # else discarded: what the client still sends after its answer
                super().data_received(data)

        def close_connection(self) -> None:
            raw = self.transport.raw
            state = self.conn.their_state
            # a body not read to its end, a protocol error inside one, or part of a next head
            sending = state in (h11.SEND_BODY, h11.ERROR) or (state is h11.IDLE and bool(self.conn.trailing_data[0]))
            if self._lost or self._ended or not sending:
                raw.close()
            elif not self.lingering:
                self._linger = self.loop.call_later(LINGER_S, raw.close)
                raw.write_eof()  # once what was written has gone
                raw.resume_reading()

        def eof_received(self):
            self._ended = True
            if self.lingering or not self._answer_last():
                return None  # closed: no answer is owed, or its request was cut off
            return True  # open for the answer

        def _answer_last(self) -> bool:
            """After the client's stream ended: whether the current request is whole and unanswered,
            and so answered. The connection closes after it, unless the client pipelined requests
            behind it before its end: those wait whole or in part in h11's buffer, and each is
            answered in turn (on_response_complete starts it), the stream's end read long before."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete or self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
                return False
            if self.conn.their_state is h11.MUST_CLOSE or not self.conn.trailing_data[0]:
                cycle.keep_alive = False  # nothing more can come: closed once answered
            if cycle.scope["http_version"] == "1.1" and cycle.scope["method"] not in ("GET", "HEAD"):
                self._ask_client(cycle)
            return True

        def _ask_client(self, cycle) -> None:
            if cycle.response_started:
                return
            cycle.waiting_for_100_continue = False  # this 100 is the one it asked for, if it did
            self.transport.write(self.conn.send(probe))
            self._check_client(cycle, 0)

        def _check_client(self, cycle, k: int) -> None:
            if self.cycle is not cycle or cycle.response_complete or self._lost:
                return
            if self.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.transport.raw.close()  # reset: gone, and its request is skipped as on any client gone
            elif k < len(PROBE_CHECKS_S):
                self._probe = self.loop.call_later(PROBE_CHECKS_S[k], self._check_client, cycle, k + 1)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(timeout_s, self._head_late, self.cycle)

        def _head_late(self, cycle) -> None:
            # a head that arrived since made a new cycle; one in flight is answered in its own time
            if (self.transport.is_closing() or self.cycle is not cycle
                    or (cycle is not None and not cycle.response_complete)):
                return
            # part of a head; not part of a body its client is still sending after an early answer
            # (a 401, 413 or 415 given before the body came): that request has had its one answer
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.transport.write(late)
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls it while it handles h11's RemoteProtocolError, which says what is wrong
            # (or for an upgrade it does not take, with no error)
            error, status = sys.exc_info()[1], 400
            if isinstance(error, h11.RemoteProtocolError):
                status, msg = error.error_status_hint, f"the request is not valid HTTP/1.1: {_as_text(str(error))}"
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # not after an answer begun (a 429 or
                self.transport.write(answer(status, msg))  # 413 given before the body came)
            self.transport.close()

    return ServeProtocol
