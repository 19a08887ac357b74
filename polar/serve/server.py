"""`polar serve`: a reward server for RL trainers (see polar/serve/app.py for the endpoints).

    polar serve --checkpoint runs/default --port 8000
    torchrun --nproc_per_node 2 -m polar.serve --checkpoint RUN --tp 2     # tensor parallel, rank 0 serves HTTP
    torchrun --nproc_per_node 4 -m polar.serve --checkpoint RUN --tp 2 --pp 2   # and pipeline stages

Requests wait at most --max-wait-ms for others to batch with; items sharing a prefix (n rollouts
of one prompt against one reference, within and across requests) compute it once. SIGTERM or SIGINT
to torchrun or to any rank (a follower hands it to rank 0 on its host) finishes the requests in
flight, then every rank exits 0. Rank 0 binds --host/--port before the model loads (one it cannot
bind: exit 2 at once; the other ranks stop too, by torchrun or, launched without it as a bare `srun`
launches them, told by rank 0 through the process group's store) and listens only once the model has
loaded and the service is built.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
from http import HTTPStatus
from typing import Optional


def parse_args(argv=None):
    from engine.config import ATTENTION_BACKENDS

    class Formatter(argparse.RawDescriptionHelpFormatter):
        """The module docstring as written, and each option's default after its help where the help
        does not already say it."""

        def _get_help_string(self, action):
            text = action.help or ""
            if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
                return text
            return f"{text} (default: %(default)s)"

    ap = argparse.ArgumentParser(prog="polar serve", description=__doc__, formatter_class=Formatter)
    ap.add_argument("--checkpoint", required=True,
                    help="engine checkpoint: a run directory, its checkpoints/ directory or one step_N directory")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (0.0.0.0 for every interface; set --api-key-env then)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on")
    ap.add_argument("--tokenizer", default=None,
                    help="'byte' or a directory holding tokenizer.json (default: the one the run trained with)")
    ap.add_argument("--model-name", default="polar", help="the name answers report")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="longest a request waits for others to batch with")
    ap.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    ap.add_argument("--row-tokens", type=int, default=4096,
                    help="packed row length, and the most tokens one shared-prefix group may hold "
                         "(a longer item gets a row of its own); at most the model's max_position_embeddings")
    ap.add_argument("--pack-rows", choices=("auto", "on", "off"), default="auto",
                    help="several groups per packed row (auto: on with the triton attention kernel, off "
                         "otherwise: with blocks, the CPU default, and with the torch reference, whose dense mask "
                         "costs row_length^2)")
    ap.add_argument("--max-queue", type=int, default=8192, help="items waiting before requests get 429")
    ap.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024,
                    help="largest request body; a longer one gets 413")
    ap.add_argument("--max-items", type=int, default=4096, help="items per request")
    ap.add_argument("--max-preparing", type=int, default=32,
                    help="requests parsed and tokenized at once, their body read; more wait for a slot, in arrival "
                         "order (reading a body takes none: it waits on the client's network)")
    ap.add_argument("--max-reading-bytes", type=int, default=None,
                    help="body bytes held at once for the requests being read, parsed and tokenized, each charged "
                         "its Content-Length (--max-body-bytes when chunked), at least 64 KiB; a request that does "
                         "not fit waits (default: --max-preparing x --max-body-bytes)")
    ap.add_argument("--max-preparing-wait-s", type=float, default=5.0,
                    help="how long a request waits for room to be read in (--max-reading-bytes) before it gets "
                         "429, its body unread")
    ap.add_argument("--max-waiting", type=int, default=None,
                    help="requests waiting for room to be read in at once; more get 429 at once, their body "
                         "unread (default: --max-queue, as many one-item requests as the queue holds)")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per-request limit on scoring; 504 after it")
    ap.add_argument("--read-timeout-s", type=float, default=60.0,
                    help="the whole body must arrive within this many seconds of the request being admitted; "
                         "a client that stalls gets 408 and its room (--max-reading-bytes) is freed. A request's "
                         "head must arrive within it of the connection opening (or of the answer before it), "
                         "else 408 and the connection is closed: an idle kept-alive connection is closed after it")
    ap.add_argument("--api-key-env", default=None,
                    help="name of an environment variable holding a bearer token every request must carry")
    ap.add_argument("--max-length", type=int, default=None,
                    help="POLAR truncation of structured items (default 16384, or less where the model's positions "
                         "hold no item of that length: the largest that fits, said at start-up)")
    # --max-response-length is the name `polar score`, `polar eval` and `polar format` use (the client's)
    ap.add_argument("--max-response", "--max-response-length", type=int, default=None,
                    help="POLAR truncation of reference and output (default: min(4096, (L - 6) // 2) for the "
                         "--max-length L in use, given or its default: the largest that leaves L a prompt budget; "
                         "said at start-up when below 4096)")
    ap.add_argument("--max-item-tokens", type=int, default=0,
                    help="longest already-formatted text (/classify, /pooling) accepted, in tokens (default: the "
                         "longest the client's truncation at --max-length leaves: max-length + 15 for the byte "
                         "tokenizer); never more than the model's max_position_embeddings. Structured "
                         "items (/v1/rewards, /get_reward) are bounded by --max-length and the model's positions")
    ap.add_argument("--pooling-format", choices=("vllm", "lmdeploy"), default="vllm",
                    help="the answer of POST /pooling (both are always at /vllm/pooling and /lmdeploy/pooling)")
    ap.add_argument("--no-share-prefixes", action="store_true", help="score every item as its own sequence")
    ap.add_argument("--tp", type=int, default=0,
                    help="tensor-parallel size (default: the torchrun processes divided by --pp)")
    ap.add_argument("--pp", type=int, default=1,
                    help="pipeline stages (tp x pp = the torchrun processes: one replica)")
    ap.add_argument("--attention-backend", default="auto", choices=("auto", *ATTENTION_BACKENDS),
                    help="auto: triton on a GPU, blocks (per-group SDPA) on the CPU; torch is the dense-mask reference")
    ap.add_argument("--graceful-timeout-s", type=float, default=60.0,
                    help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    args = ap.parse_args(argv)
    if not args.read_timeout_s > 0:
        ap.error("--read-timeout-s must be positive")
    if not args.max_preparing_wait_s >= 0:
        ap.error("--max-preparing-wait-s must be 0 or more")
    if args.max_waiting is not None and args.max_waiting < 0:
        ap.error("--max-waiting must be 0 or more")
    if args.max_preparing < 1:
        ap.error("--max-preparing must be 1 or more")
    from polar.serve.admission import reading_bytes_bound

    try:
        reading_bytes_bound(args.max_reading_bytes, args.max_preparing, args.max_body_bytes)
    except ValueError as e:
        ap.error(str(e))
    if not 0 <= args.port <= 65535:
        ap.error("--port must be 0-65535")
    if args.pp < 1 or args.tp < 0:
        ap.error("--tp and --pp must be positive")
    if not args.tp:
        args.tp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // args.pp)
    from polar.client_limits import usage_check

    usage_check(ap, args.max_length, args.max_response)
    return args


# The engine's settings that `polar serve` flags set: the engine names the setting in its messages,
# which the serve user knows by its flag. No vpp flag: a serve replica never interleaves its stages.
FLAG_OF_SETTING = {"train.attention_backend": "--attention-backend", "parallel.tp": "--tp", "parallel.pp": "--pp"}
_SETTING = re.compile(r"\b(parallel\.pp x parallel\.vpp = |(?:%s)(?!\w)(?:=('?)([\w.-]+)\2)?)"
                      % "|".join(map(re.escape, FLAG_OF_SETTING)))


def as_flags(message: str) -> str:
    """An engine message with `polar serve`'s flags for the settings they set: `train.attention_backend=triton`
    reads `--attention-backend triton`."""
    def flag(m):
        if m[1].startswith("parallel.pp x"):
            return "--pp "
        name = m[1].split("=", 1)[0]
        return FLAG_OF_SETTING[name] + (f" {m[3]}" if m[3] is not None else "")
    return _SETTING.sub(flag, message)


def settled_tokenizer(args, step_dir: str, positions: int):
    """The tokenizer (--tokenizer, else the checkpoint's), with args.max_length and args.max_response
    settled for the model's positions (polar/client_limits.py: a default lowered to what fits them,
    said on stderr; a given --max-length whose items pass them is a ValueError naming the largest
    that fits). Needs only the
    checkpoint's model settings: main runs it before the weights are loaded."""
    from polar.checkpoint_tokenizer import choose
    from polar.client_limits import settle_lengths
    from polar.tokenizer import load_tokenizer

    # a tokenizer given that is not the checkpoint's is refused (TokenizerMismatch, a ValueError)
    tokenizer = load_tokenizer(choose(args.tokenizer, step_dir, "--tokenizer"))
    args.max_length, args.max_response, note = settle_lengths(args.max_length, args.max_response, tokenizer,
                                                              positions, ("--max-length", "--max-response"))
    if note:
        print(f"polar serve: {note}", file=sys.stderr, flush=True)
    return tokenizer


def build_service(args, scorer):
    from polar.serve.app import ServeSettings, Service
    from polar.serve.batcher import Batcher
    from polar.client_limits import overrun
    from polar.serve.metrics import Metrics

    tokenizer = settled_tokenizer(args, str(scorer.info.step_dir), scorer.max_positions)
    if tokenizer.vocab_size > scorer.model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary only "
                         f"{scorer.model_config.vocab_size}: wrong --tokenizer?")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    metrics = Metrics()
    pack_rows = args.pack_rows == "on" or (args.pack_rows == "auto" and scorer.attention_backend == "triton")
    batcher = Batcher(scorer.score, tokenizer.pad_id, max_wait_s=args.max_wait_ms / 1000,
                      max_batch_tokens=args.max_batch_tokens, row_tokens=args.row_tokens,
                      max_queue_items=args.max_queue, share_prefixes=not args.no_share_prefixes, pack_rows=pack_rows,
                      max_positions=scorer.max_positions, metrics=metrics)
    if batcher.row_tokens < args.row_tokens:
        print(f"polar serve: --row-tokens {args.row_tokens} lowered to the model's max_position_embeddings "
              f"{batcher.row_tokens}", file=sys.stderr)
    settings = ServeSettings(model_name=args.model_name, max_body_bytes=args.max_body_bytes,
                             max_items=args.max_items, timeout_s=args.timeout_s,
                             read_timeout_s=args.read_timeout_s, api_key=api_key,
                             max_length=args.max_length, max_response=args.max_response,
                             max_item_tokens=args.max_item_tokens or args.max_length + overrun(tokenizer),
                             pooling_format=args.pooling_format, max_preparing=args.max_preparing,
                             max_reading_bytes=args.max_reading_bytes, preparing_wait_s=args.max_preparing_wait_s,
                             max_waiting=args.max_waiting)
    return Service(tokenizer, batcher, settings, metrics)


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


@contextlib.contextmanager
def serve_in_thread(service, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
    """The app on uvicorn in a background thread (a trainer's own process, tests, benchmarks);
    port 0 picks a free one. Yields the base URL; on exit shuts down gracefully."""
    import threading
    import time

    import uvicorn

    from polar.serve.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                           http=http_protocol(service.settings.read_timeout_s)))
    thread = threading.Thread(target=server.run, name="polar-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"polar serve: the HTTP server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)


class AddressError(OSError):
    """--host/--port cannot be bound or listened on; the message names the flag."""


def _address_error(e: OSError, host: str, port: int) -> AddressError:
    import errno
    import socket

    if isinstance(e, socket.gaierror):
        return AddressError(f"--host {host}: {e.strerror.lower()}")
    if e.errno == errno.EADDRINUSE:
        return AddressError(f"--port {port}: address already in use (--host {host}): another process listens "
                            "there; stop it or choose another --port")
    if e.errno == errno.EADDRNOTAVAIL:
        return AddressError(f"--host {host}: cannot assign requested address (not an address of this machine)")
    if e.errno == errno.EACCES and 0 < port < 1024:
        return AddressError(f"--port {port}: permission denied (a port below 1024 needs privileges)")
    return AddressError(f"--host {host} --port {port}: {(e.strerror or str(e)).lower()}")


def bind(host: str, port: int):
    """A TCP socket bound to (host, port), not yet listening: bound before the model loads (minutes
    for a 7B model) so that a taken port or a foreign address is reported at once, listening only
    once the service is built, since Kubernetes' startupProbe and load balancers read an open port
    as a server that answers. SO_REUSEADDR as uvicorn sets it: a restart binds while the previous
    server's connections sit in TIME_WAIT. Raises AddressError."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise _address_error(e, host, port) from None
    return sock


def listen(sock, host: str, port: int, backlog: int) -> None:
    """Opens the port. Two sockets with SO_REUSEADDR may both bind an address nobody listens on yet
    (two servers started at once on one port), and the second learns it only here."""
    try:
        sock.listen(backlog)
    except OSError as e:
        raise _address_error(e, host, port) from None


def _url(host: str, sock) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"


# Files this process holds besides its connections: shared libraries, the checkpoint's shards and
# tokenizer as they load, the event loop's and torch's own descriptors.
OWN_FILES = 256


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit: each connection holds a file
    descriptor, and past the soft limit (often 1024) accept() fails with EMFILE, on which asyncio
    stops accepting for a second at a time ('socket.accept() out of system resource'), refusing
    everyone while the connections already open (idle kept-alive ones included) stay.
    -> (soft limit before, soft limit now, hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux bounds the hard limit (fs.nr_open); macOS may say unlimited yet refuse such a soft limit
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard


def open_files_shortfall(args, limit: int, hard: int) -> Optional[str]:
    """A warning when the open files limit is under the connections the settings let wait at once:
    each request waiting for room (--max-waiting) or queued (--max-queue items, one a request at
    most) holds its connection, and so does each being prepared; idle kept-alive ones come on top."""
    import resource

    waiting = args.max_queue if args.max_waiting is None else args.max_waiting
    need = waiting + args.max_queue + args.max_preparing + OWN_FILES
    if limit == resource.RLIM_INFINITY or limit >= need:
        return None
    return (f"the open files limit is {limit} (hard limit "
            f"{'unlimited' if hard == resource.RLIM_INFINITY else hard}), under the {need} this server may hold: "
            f"a connection for each of --max-waiting {waiting} requests waiting for room, --max-queue "
            f"{args.max_queue} one-item requests queued and --max-preparing {args.max_preparing} being prepared, "
            f"{OWN_FILES} for its own files, and idle kept-alive connections stay open --read-timeout-s "
            f"{args.read_timeout_s:g} s. Past the limit no connection is accepted (asyncio: 'socket.accept() out of "
            "system resource'): raise the hard limit (ulimit -Hn, systemd's LimitNOFILE, docker run --ulimit "
            "nofile=N:N) or lower --max-waiting and --max-queue")


def main(argv=None) -> int:
    args = parse_args(argv)
    # the HTTP stack before the model loads: where it is not installed, that is said in a second, not after
    # minutes of loading (polar.cli names the extra that installs it)
    for module in ("uvicorn", "polar.serve.app"):
        importlib.import_module(module)
    from engine.cuda_env import order_tp_launches

    order_tp_launches(args.tp)  # before the first CUDA call
    # RewardScorer.load refuses a world other than tp x pp processes, so global rank 0 is the
    # replica's rank 0, the one that serves HTTP. Bound before the model loads: a taken port fails
    # in a second or two, not minutes later; torchrun then stops the other ranks, which are still
    # starting (init_process_group), when this one exits; without torchrun, _bind_said tells them.
    sock = files = refused = None
    if int(os.environ.get("RANK", "0")) == 0:
        files = raise_open_files_limit()
        try:
            sock = bind(args.host, args.port)
        except AddressError as e:
            refused = str(e)
            print(f"polar serve: {refused}", file=sys.stderr, flush=True)
    # held until _run returns: on rank 0 its server is the process group's store (see _bind_said)
    store, refused = _bind_said(refused) if _without_torchrun() else (None, refused)
    if refused is not None:
        if files is None:  # a rank > 0
            print(f"polar serve rank {os.environ['RANK']}: rank 0 cannot serve ({refused}); stopping",
                  file=sys.stderr)
        return 2
    try:
        return _run(args, sock, files)
    finally:
        if sock is not None:
            sock.close()


def _without_torchrun() -> bool:
    """Ranks started one by one (a bare `srun`, or by hand: RANK, WORLD_SIZE, MASTER_ADDR/PORT set), with
    no torchrun to stop the others when rank 0 exits."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" not in os.environ
            and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ)


def _bind_said(refused: Optional[str]):
    """-> (store, refused) on every rank: rank 0's refusal of --host/--port (None: bound), as rank 0 says it.

    A rank 0 that exited alone left the others in init_process_group, waiting for its store up to the
    c10d timeout (parallel.timeout_minutes, 30): a SLURM step hung instead of failing. So rank 0 hosts the
    store at MASTER_ADDR:MASTER_PORT first and puts its answer there; the others read it before they start
    their process group. Refused, rank 0 waits (as long as they would have) until every other rank has
    read it, since the store leaves with it. Bound, it keeps `store`: init_process_group's store on
    rank 0 (env://, multi-tenant) then shares its server, which would close when the last store on it
    goes."""
    from datetime import timedelta

    import torch.distributed as dist

    from engine.config import ParallelConfig

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=ParallelConfig().timeout_minutes)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=rank == 0,
                          timeout=timeout, multi_tenant=True)
    if rank == 0:
        store.set("polar_serve/refused", refused or "")
        if refused is not None:
            with contextlib.suppress(dist.DistError):  # one that never came: this rank still exits 2
                store.wait(["polar_serve/all_read"])
        return store, refused
    refused = store.get("polar_serve/refused").decode() or None
    if refused is not None and store.add("polar_serve/read", 1) == world - 1:
        store.set("polar_serve/all_read", "")
    return store, refused


def _run(args, sock, files) -> int:
    """main's model load and service on every rank; `sock`: rank 0's, bound, not yet listening;
    `files`: rank 0's open files limits (raise_open_files_limit)."""
    from engine.inference import RewardScorer, resolve_checkpoint

    try:  # the model's settings only: a --max-length its positions cannot hold stops before the weights load
        info = resolve_checkpoint(args.checkpoint)
        settled_tokenizer(args, str(info.step_dir), info.model.max_position_embeddings)
        scorer = RewardScorer.load(args.checkpoint, tp=args.tp, pp=args.pp, attention_backend=args.attention_backend)
    except (FileNotFoundError, ValueError) as e:
        print(f"polar serve: {as_flags(str(e))}", file=sys.stderr)
        return 2
    if not scorer.is_leader:
        _follow(scorer, _leader(scorer))
        scorer.close()
        return 0
    stop = _StopRequest()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    _leader(scorer)  # a collective: the followers learn where to forward their signals
    import uvicorn

    from polar.serve.app import create_app

    try:
        service = build_service(args, scorer)
        config = uvicorn.Config(create_app(service, on_shutdown=scorer.stop_followers), host=args.host,
                                port=args.port, log_level="warning", timeout_graceful_shutdown=args.graceful_timeout_s,
                                http=http_protocol(args.read_timeout_s))
        listen(sock, args.host, args.port, config.backlog)
    except (ValueError, AddressError) as e:
        print(f"polar serve: {e}", file=sys.stderr)
        scorer.stop_followers()
        scorer.close()  # the followers wait at its barrier: leaving without it fails theirs
        return 2
    server = uvicorn.Server(config)
    stop.attach(server)
    before, limit, hard = files
    for warning in (open_files_shortfall(args, limit, hard), uvicorn_untested(uvicorn.__version__)):
        if warning:
            print(f"polar serve: warning: {warning}", file=sys.stderr, flush=True)
    raised = f" (open files limit raised from {before} to {limit})" if limit != before else ""
    print(f"polar serve: {scorer.info.step_dir} ({scorer.dtype}, tp={args.tp} pp={args.pp}) on "
          f"{_url(args.host, sock)}{raised}", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal under the handlers it
    # found: `stop`'s let this process close the runtime (the replica's ranks meet at its barrier) and exit 0.
    server.run(sockets=[sock])
    scorer.close()
    return 0


class _StopRequest:
    """Rank 0's SIGINT/SIGTERM handler outside uvicorn's (which it installs only while serving): a
    signal that arrives while the service is built, from the operator or forwarded by a follower,
    stops the server right after it starts, through the same graceful shutdown."""

    def __init__(self):
        self.requested = False
        self.server = None

    def __call__(self, *_):
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True

    def attach(self, server) -> None:
        self.server = server  # first: a signal from here on reaches the server itself
        server.should_exit = self.requested


def _leader(scorer) -> tuple[str, int]:
    """(host name, pid) of the replica's rank 0, on every rank (a collective: all must call it)."""
    import socket

    import torch.distributed as dist

    if scorer.rt.tp * scorer.rt.pp == 1:
        return socket.gethostname(), os.getpid()
    mp = scorer.rt.groups.mp
    box = [(socket.gethostname(), os.getpid())]
    dist.broadcast_object_list(box, src=dist.get_global_rank(mp, 0), group=mp, device=scorer.device)
    return box[0]


def _follow(scorer, leader: tuple[str, int]) -> None:
    """A rank > 0: forward passes until rank 0 broadcasts stop.

    torchrun and SLURM send SIGTERM to every rank at once. A follower that died of it would leave
    rank 0 without the ranks it needs to finish the requests in flight and to hear its stop (gloo:
    "Connection closed by peer" tracebacks; NCCL: a hang). So a follower's SIGINT/SIGTERM goes to
    rank 0 as SIGTERM (a second SIGINT would make uvicorn drop the requests in flight), and the
    follower stops when rank 0 says so: one sent to a follower alone stops the replica the same way.
    The loop runs in a thread because Python runs a signal handler in the main thread between
    bytecodes, never while it waits inside a broadcast, and a follower waits there between batches.
    """
    import socket
    import threading

    import torch

    host, pid = leader

    def to_leader(*_):
        if host != socket.gethostname():
            print(f"polar serve rank {os.environ.get('RANK', '?')}: signalled; rank 0 (pid {pid} on {host}) "
                  "stops this replica: signal it there", file=sys.stderr, flush=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    failed = []

    def follow():
        try:
            # the current CUDA device is per thread (rank 0's batcher thread sets it the same way)
            with torch.cuda.device(scorer.device) if scorer.rt.is_cuda else contextlib.nullcontext():
                scorer.follow()
        except BaseException as e:  # re-raised in the main thread: a real failure, traceback and all
            failed.append(e)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, to_leader)
    thread = threading.Thread(target=follow, name="polar-serve-follow", daemon=True)
    thread.start()
    thread.join()  # interruptible: the handler runs while the main thread waits here
    if failed:
        raise failed[0]


if __name__ == "__main__":
    sys.exit(main())
