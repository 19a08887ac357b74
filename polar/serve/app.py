"""The HTTP endpoints (FastAPI on uvicorn).

    POST /classify        SGLang:   {"model", "text": [str]}  -> [{"embedding": [r]}, ...] (one str: one object)
    POST /pooling         vLLM:     {"input": [str]}          -> {"data": [{"data": [[r]]}, ...]}
                          (lmdeploy's answer, {"data": [{"data": r}]}, with --pooling-format lmdeploy,
                          ?format=lmdeploy, or at /lmdeploy/pooling; /vllm/pooling is always vLLM's)
    POST /get_reward      OpenRLHF: {"query", "prompts", "labels"} -> {"rewards", "scores", "extra_logs"}
    POST /v1/rewards      native:   {"items": [{"prompt", "reference", "output"|"outputs", "wrapper"}]}
    GET  /health          200 {"status": "ok", ...}, 503 while shutting down; never needs the bearer token
    GET  /metrics         Prometheus text format

vLLM returns one row per token and its clients read the last; only the reward token's row is
computed here, so the answer holds that one row ([[r]]), which is what `data[-1][0]` reads.
Errors are JSON {"error": {"message", "type", "code"}} with a 4xx status saying what is wrong.
A request whose client has gone (timed out, retrying) leaves the queue unscored, and the wait
for room to be read in too when its body is small; one gone while its body is parsed or tokenized
is never queued. A body is read without a --max-preparing slot (reading waits on the client's
network); --max-reading-bytes bounds the bodies being read. A request still in flight when
uvicorn's graceful timeout runs out is answered 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from polar.client_format import Cuts
from polar.serve import validation
from polar.serve.batcher import Batcher, Closed, QueueFull, non_finite
from polar.serve.items import check_truncation, format_structured, tokenize_served_text
from polar.serve.metrics import Metrics
from polar.serve.validation import NO_RETRY_HEADER, RequestError
from polar.tokenizer import Tokenizer

POOLING_FORMATS = ("vllm", "lmdeploy")


@dataclass
class ServeSettings:
    model_name: str = "polar"
    max_body_bytes: int = 64 * 1024 * 1024
    max_items: int = 4096
    timeout_s: float = 300.0
    read_timeout_s: float = 60.0  # the body must arrive within it, or 408 frees its room (--max-reading-bytes)
    api_key: Optional[str] = None
    max_length: int = 16384  # POLAR's truncation of structured items (polar.format)
    max_response: int = 4096
    max_item_tokens: int = 16385  # a longer already-formatted text is refused
    pooling_format: str = "vllm"
    max_preparing: int = 32  # requests parsed and tokenized at once (their body read); more wait for a slot
    # body bytes held for requests being read, parsed and tokenized, each charged its Content-Length
    # (at least MIN_BODY_CHARGE); None: max_preparing x max_body_bytes
    max_reading_bytes: Optional[int] = None
    preparing_wait_s: float = 5.0  # the longest a request waits for that room, in arrival order; then 429
    max_waiting: Optional[int] = None  # requests waiting for it at once, more get 429 (None: the --max-queue items)


class Service:
    """What the endpoints share: tokenizer, batcher, metrics, settings."""

    def __init__(self, tokenizer: Tokenizer, batcher: Batcher, settings: ServeSettings, metrics: Metrics):
        if settings.pooling_format not in POOLING_FORMATS:
            raise ValueError(f"--pooling-format must be one of {POOLING_FORMATS}, got {settings.pooling_format!r}")
        check_truncation(settings.max_length, settings.max_response)
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.settings = settings
        self.metrics = metrics
        self.max_item_tokens = settings.max_item_tokens
        self._limit = f"this server's limit of {settings.max_item_tokens} (--max-item-tokens)"
        positions = getattr(batcher, "max_positions", None)
        if positions and positions < self.max_item_tokens:
            self.max_item_tokens = positions
            self._limit = f"the model's {positions} positions (max_position_embeddings)"
        # Structured items are bounded by POLAR's own truncation (--max-length), not by
        # --max-item-tokens: that truncation can end longer than max_length + 1 (a cut inside a
        # character decodes to U+FFFD, 3 bytes per orphaned byte; a BPE may re-tokenize a cut text
        # into more tokens), and `polar score` scores such items, so only the model's positions,
        # which no item may pass, bound them here.
        self.max_structured_tokens = positions or None
        if settings.max_preparing < 1:
            raise ValueError(f"--max-preparing must be 1 or more, got {settings.max_preparing}")
        self.max_reading_bytes = reading_bytes_bound(settings.max_reading_bytes, settings.max_preparing,
                                                     settings.max_body_bytes)
        self._slots = _Allowance(settings.max_preparing)  # parsing and tokenizing
        self._room = _Allowance(self.max_reading_bytes)  # body bytes of the requests admitted
        self.waiting = 0  # requests waiting for room
        self.reading = 0  # requests admitted, not yet holding a slot: reading their body or waiting for a slot
        # each waiting request becomes at least one queued item: more than --max-queue could never all be queued
        self.max_waiting = batcher.max_queue_items if settings.max_waiting is None else settings.max_waiting
        if self.max_waiting < 0:
            raise ValueError(f"--max-waiting must be 0 or more, got {self.max_waiting}")

    def texts_to_ids(self, texts: list[str], field: str) -> list[np.ndarray]:
        ids = tokenize_served_text(self.tokenizer, texts)
        for i, a in enumerate(ids):
            if len(a) > self.max_item_tokens:
                raise RequestError(f"{field}[{i}] is {len(a)} tokens long, more than {self._limit}; truncate it "
                                   "as POLAR's format does (max_length)", 413)
        return ids

    def items_to_ids(self, items, names: Optional[list[str]] = None) -> list[np.ndarray]:
        """`names[i]`: where item i is in the request, for errors."""
        s = self.settings
        cuts = Cuts()
        try:
            ids = [a for _, a in format_structured(self.tokenizer, items, s.max_length, s.max_response, cuts)]
        except (TypeError, ValueError) as e:
            raise RequestError(f"cannot format the items: {e}") from None
        limit = self.max_structured_tokens
        for name, a in zip(names or [f"items[{i}]" for i in range(len(ids))], ids):
            if limit and len(a) > limit:
                raise RequestError(f"{name} is {len(a)} tokens long after POLAR's truncation (--max-length "
                                   f"{s.max_length}), more than the model's {limit} positions "
                                   "(max_position_embeddings); shorten its prompt, reference or output, or run "
                                   "the server with a smaller --max-length", 413)
        for field in ("outputs", "references", "prompts"):
            self.metrics.cut.labels(field=field[:-1]).inc(getattr(cuts, field))
        return ids

    def charge(self, declared: Optional[int]) -> int:
        """The bytes of --max-reading-bytes a request holds: its Content-Length (--max-body-bytes for a
        chunked body, which may grow to it), at least MIN_BODY_CHARGE."""
        return max(self.settings.max_body_bytes if declared is None else declared, MIN_BODY_CHARGE)

    async def admit(self, request: Request) -> list[dict]:
        """Before the body is read: under load, reading, parsing and tokenizing a request that the
        queue then refuses is the work that slows everyone else down. A request is admitted once its
        body fits in --max-reading-bytes with the bodies of those admitted before it, which bounds
        the memory they hold however slowly they arrive; reading takes no --max-preparing slot, so
        slow clients (a slow network, a slowloris) hold bytes, not the slots fast requests are
        parsed in. A request that does not fit waits, in arrival order, for at most
        --max-preparing-wait-s (refusing at once answered 429 to bursts the queue had room for). At
        most --max-waiting requests wait: each holds its connection, its task and what the HTTP
        server has buffered of its body (35-150 KB, benchmarks/serve_load.py --burst), so a burst of
        any size holds a bounded amount of memory. Returns the body's messages received while waiting."""
        try:
            self.batcher.check_room()
        except QueueFull as e:
            raise _TooBusy(str(e), e.retry_after_s) from None
        declared = _declared_length(request)
        charge = self.charge(declared)
        if self._room.take_now(charge):
            self._admitted(request, charge)
            return []
        if self.waiting >= self.max_waiting:
            raise _TooBusy(f"{self.waiting} requests are waiting for room to be read in (--max-reading-bytes "
                           f"{self.max_reading_bytes}), this server's limit of waiting requests "
                           f"(--max-waiting {self.max_waiting}); retry after 1 s", 1)
        loop = asyncio.get_running_loop()
        room = self._room.ask(charge)
        self.waiting += 1
        taken: list[dict] = []
        # A client that leaves while waiting (its own timeout, then a retry) must not keep its place:
        # seen by taking its body, when that is small enough that holding it costs nothing more.
        watched = declared is not None and declared <= _WATCHED_BODY_BYTES
        gone = asyncio.ensure_future(_gone(request, taken)) if watched else loop.create_future()
        try:
            done, _ = await asyncio.wait((room, gone), timeout=self.settings.preparing_wait_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._room.withdraw(room, charge)  # cancelled (the server shutting down)
            raise
        finally:
            self.waiting -= 1
            gone.cancel()
        if gone in done or not room.done():
            self._room.withdraw(room, charge)
            if gone in done:
                self.metrics.gone.labels(stage="waiting").inc()
                raise _ClientGone()
            raise _TooBusy(f"{self.reading + self.preparing} requests are being read and tokenized, holding "
                           f"{self._room.held} of the {self.max_reading_bytes} bytes this server reads at once "
                           f"(--max-reading-bytes), and not enough was freed within "
                           f"{self.settings.preparing_wait_s:g} s (--max-preparing-wait-s); retry after 1 s", 1)
        self._admitted(request, charge)
        return taken

    def _admitted(self, request: Request, charge: int) -> None:
        request.state.charge = charge
        self.reading += 1
        self.metrics.reading_bytes.set(self._room.held)

    async def start_preparing(self, request: Request) -> None:
        """A --max-preparing slot for a request whose body has been read, in arrival order: what is
        ahead is parsing and tokenizing the bodies already read, bounded work, so there is no limit
        on the wait."""
        await self._slots.take(1)
        request.state.preparing = True
        self.reading -= 1

    @property
    def preparing(self) -> int:
        return self._slots.held

    def prepared(self, request: Request) -> None:
        """The request's slot and room go back (its items queued, or it failed)."""
        state = request.state
        if getattr(state, "preparing", False):
            state.preparing = False
            self._slots.give_back(1)
        elif getattr(state, "charge", 0):
            self.reading -= 1
        if getattr(state, "charge", 0):
            self._room.give_back(state.charge)
            state.charge = 0
            self.metrics.reading_bytes.set(self._room.held)

    async def rewards(self, ids: list[np.ndarray], request: Request, names: list[str]) -> np.ndarray:
        """`names[i]`: where item i is in the request (`items[1]`, `text[0]`), for errors."""
        # A client that timed out (POLAR's client: after 30 s, then it retries) is not waiting for
        # this answer: its items are not queued, or leave the queue, instead of being scored once
        # per attempt (request.state.departure has watched since its body was read).
        departure: _Departure = request.state.departure
        try:
            if departure.left:
                raise _ClientGone()
            fut = self.batcher.submit(ids)
        except QueueFull as e:
            raise _TooBusy(str(e), e.retry_after_s) from None
        except Closed as e:
            raise RequestError(str(e), 503) from None
        finally:
            self.prepared(request)
        departure.queued(fut)
        scored = asyncio.wrap_future(fut)
        try:
            done, _ = await asyncio.wait((scored, departure.task), timeout=self.settings.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # uvicorn cancels what is still in flight when --graceful-timeout-s runs out: nobody
            # will read these rewards, and the batcher's close() would score them while the
            # process should be exiting
            scored.cancel()
            raise
        if departure.left or departure.task in done:
            scored.cancel()
            raise _ClientGone()
        if scored in done:
            rewards = scored.result()
            # named as the request names them (not by their place among /v1/rewards' flattened
            # outputs), and `items[i]` as POLAR's client renumbers it for a call sent in chunks
            bad = non_finite(rewards, names)
            if bad:
                raise RequestError(bad, 500, retryable=False)
            return rewards
        scored.cancel()  # the batcher's future too: skipped unless its round has started
        raise RequestError(f"not scored within {self.settings.timeout_s:g} s (--timeout-s); the server is "
                           "overloaded or the batch too large", 504)


# A body of at most this many bytes is received while its request waits for room to be read in,
# which lets the wait see its client leave; it costs no memory that the HTTP server has not spent
# already (uvicorn buffers 64 KiB of a body before it stops reading the connection). A larger body
# stays unread until its room comes.
_WATCHED_BODY_BYTES = 64 * 1024
# The least a request is charged of --max-reading-bytes, however small its body: the HTTP server
# buffers up to 64 KiB of a connection's body, and a request in flight holds 25-47 KB of heap besides
# (benchmarks/serve_load.py --burst), so the bytes bound how many requests are read at once too.
MIN_BODY_CHARGE = 64 * 1024


def reading_bytes_bound(max_reading_bytes: Optional[int], max_preparing: int, max_body_bytes: int) -> int:
    """--max-reading-bytes as given, or its default, --max-preparing x --max-body-bytes: what the
    slots could hold when reading a body took one. ValueError when one largest body cannot fit."""
    if max_reading_bytes is None:
        max_reading_bytes = max_preparing * max_body_bytes
    least = max(max_body_bytes, MIN_BODY_CHARGE)
    if max_reading_bytes < least:
        raise ValueError(f"--max-reading-bytes {max_reading_bytes} is less than one request can hold "
                         f"(--max-body-bytes {max_body_bytes}, and at least {MIN_BODY_CHARGE} bytes per request): "
                         f"use at least {least}")
    return max_reading_bytes


class _Allowance:
    """`capacity` units handed out in arrival order: an ask for n units is granted once they fit
    and every earlier ask has been (a large ask at the head holds back the smaller ones behind it,
    which would otherwise pass it for ever)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0
        self._asks: deque[tuple[asyncio.Future, int]] = deque()

    def take_now(self, n: int) -> bool:
        while self._asks and self._asks[0][0].done():  # gave up waiting
            self._asks.popleft()
        if self._asks or self.held + n > self.capacity:
            return False
        self.held += n
        return True

    def ask(self, n: int) -> asyncio.Future:
        """A future done once the n units are held for the caller."""
        granted = asyncio.get_running_loop().create_future()
        self._asks.append((granted, n))
        return granted

    def withdraw(self, granted: asyncio.Future, n: int) -> None:
        """An ask given up: the units handed to it meanwhile go back, and the asks behind it may fit."""
        if granted.done() and not granted.cancelled():
            self.give_back(n)
        else:
            granted.cancel()
            self._grant()

    async def take(self, n: int) -> None:
        if self.take_now(n):
            return
        granted = self.ask(n)
        try:
            await granted
        except BaseException:
            self.withdraw(granted, n)
            raise

    def give_back(self, n: int) -> None:
        self.held -= n
        self._grant()

    def _grant(self) -> None:
        while self._asks:
            granted, n = self._asks[0]
            if not granted.done():
                if self.held + n > self.capacity:
                    return
                self.held += n
                granted.set_result(None)
            self._asks.popleft()


class _Departure:
    """Whether a request's client has closed its connection, watched from the moment its body has
    been read (the next message is then http.disconnect), so that a client gone while its request
    is parsed or tokenized is known before its items are queued: watched only from then on, the
    batcher could take them first whenever the event loop was busy (scored for nobody, in a batch
    others wait on). Once queued, its future is cancelled here at once (not a few loop steps later
    through asyncio's wrapper), and the batcher checks that as it forms a round
    (set_running_or_notify_cancel)."""

    def __init__(self, request: Request, metrics: Metrics):
        self.left = False
        self._future: Optional[concurrent.futures.Future] = None
        self._metrics = metrics
        self.task = asyncio.ensure_future(self._watch(request))

    def queued(self, future: concurrent.futures.Future) -> None:
        self._future = future

    async def _watch(self, request: Request) -> None:
        await _gone(request)
        self.left = True
        if self._future is None:
            stage = "preparing"  # never queued
        elif self._future.cancel():
            stage = "queued"  # left the queue, or skipped by the round being formed
        else:
            stage = "scoring"  # its round had started: scored for nobody
        self._metrics.gone.labels(stage=stage).inc()

    def close(self) -> None:
        self.task.cancel()


async def _gone(request: Request, taken: Optional[list] = None) -> None:
    """Returns when the client closes the connection; the body's messages received meanwhile are
    appended to `taken`. Once the body has been read, the next message is http.disconnect."""
    while (message := await request.receive())["type"] != "http.disconnect":
        if taken is not None:
            taken.append(message)


class _TooBusy(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _ClientGone(Exception):
    pass


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 408: "timeout", 413: "request_too_large",
            404: "not_found_error", 405: "method_not_allowed",
            415: "unsupported_media_type", 429: "rate_limit_error", 499: "client_closed_request", 503: "unavailable",
            504: "timeout"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def _declared_length(request: Request) -> Optional[int]:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        return int(declared)
    except ValueError:
        raise RequestError("the Content-Length header is not a number") from None


async def _read_body(request: Request, limit: int, taken: list[dict]) -> list[bytes]:
    """The body's chunks, as they arrived (`taken`: those received already): the thread that parses
    them decodes them one by one (joining them here would hold the event loop for a copy of up to
    --max-body-bytes)."""
    chunks, n, more = [], 0, True
    taken = iter(taken)
    while more:
        message = next(taken, None) or await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        n += len(chunk)
        if n > limit:
            raise RequestError(f"the body is more than this server's limit of {limit} bytes (--max-body-bytes)", 413)
        if chunk:
            chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks


def create_app(service: Service, on_shutdown=None) -> FastAPI:
    s, m = service.settings, service.metrics

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        # uvicorn has finished the in-flight requests by now; the batcher's queue is empty or
        # holds only abandoned work, which close() still completes.
        await asyncio.to_thread(service.batcher.close)
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="polar serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorized(request: Request) -> bool:
        if not s.api_key:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {s.api_key}".encode())

    def unauthorized() -> JSONResponse:
        return _error(401, "missing or wrong bearer token (Authorization: Bearer <key>)",
                      {"WWW-Authenticate": "Bearer"})

    async def handle(request: Request, endpoint: str, work):
        """Auth, body, JSON, then `work(body) -> response`; every failure becomes a 4xx/5xx answer
        for this request alone."""
        t0 = time.monotonic()
        status = 200
        departure = None
        try:
            if not authorized(request):
                status = 401
                return unauthorized()
            # a compressed body would otherwise be refused as text that is not UTF-8, naming a byte
            encoding = request.headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                raise RequestError(f"the body is sent with Content-Encoding {encoding}, which this server does not "
                                   "decode; send the JSON uncompressed", 415)
            # before waiting for a slot: a body that can never be taken is not told to retry
            declared = _declared_length(request)
            if declared is not None and declared > s.max_body_bytes:
                raise RequestError(f"the body is {declared} bytes, more than this server's limit of "
                                   f"{s.max_body_bytes} (--max-body-bytes)", 413)
            taken = await service.admit(request)
            try:
                # A client that stalls mid-body (a hung worker, a stuck proxy) would otherwise hold
                # its room forever, and enough of them refuse everyone with 429.
                chunks = await asyncio.wait_for(_read_body(request, s.max_body_bytes, taken), s.read_timeout_s)
            except asyncio.TimeoutError:
                status = 408
                return _error(408, f"the request body did not arrive within {s.read_timeout_s:g} s "
                                   "(--read-timeout-s)", {"Connection": "close"})
            except ClientDisconnect:
                m.gone.labels(stage="reading").inc()
                raise
            departure = request.state.departure = _Departure(request, m)
            await service.start_preparing(request)
            body = await asyncio.to_thread(validation.parse_json, chunks)
            return JSONResponse(await work(body, request))
        except RequestError as e:
            status = e.status
            return _error(e.status, e.message, None if e.retryable else {NO_RETRY_HEADER: "false"})
        except _TooBusy as e:
            status = 429
            return _error(429, str(e), {"Retry-After": str(e.retry_after_s)})
        except (_ClientGone, ClientDisconnect):
            status = 499  # nginx's "client closed request": nobody reads this answer
            return _error(499, "the client closed the connection")
        except asyncio.CancelledError:
            # uvicorn cancels what is still in flight when --graceful-timeout-s runs out (rewards()
            # has taken its items off the queue): its client is told to retry, where uvicorn's own
            # answer was a plain-text 500
            asyncio.current_task().uncancel()
            status = 503
            return _error(503, "the server is shutting down and this request was not answered within its "
                          "--graceful-timeout-s; retry", {"Retry-After": "1", "Connection": "close"})
        except Exception as e:  # a bug: say so, keep serving others
            status = 500
            return _error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            service.prepared(request)
            if departure is not None:
                departure.close()
            m.requests.labels(endpoint, str(status)).inc()
            m.latency.labels(endpoint).observe(time.monotonic() - t0)

    async def text_ids(texts, field):
        return await asyncio.to_thread(service.texts_to_ids, texts, field)

    async def item_ids(items, names):
        return await asyncio.to_thread(service.items_to_ids, items, names)

    @app.post("/classify")
    async def classify(request: Request):
        async def work(body, req):
            texts = validation.classify(body, s.max_items)
            field = validation.classify_field(body)
            r = await service.rewards(await text_ids(texts, field), req, [f"{field}[{i}]" for i in range(len(texts))])
            out = [{"index": i, "embedding": [float(x)]} for i, x in enumerate(r)]
            # as SGLang answers: one text, one object; a list of texts (POLAR's client), a list
            return out[0] if isinstance(body.get(field), str) else out
        return await handle(request, "classify", work)

    def pooling_route(fixed: Optional[str]):
        async def pooling(request: Request):
            async def work(body, req):
                fmt = fixed or req.query_params.get("format", s.pooling_format)
                if fmt not in POOLING_FORMATS:
                    raise RequestError(f"format must be one of {', '.join(POOLING_FORMATS)}, got {fmt!r}")
                texts = validation.pooling(body, s.max_items)
                names = [f"input[{i}]" for i in range(len(texts))]
                r = await service.rewards(await text_ids(texts, "input"), req, names)
                if fmt == "lmdeploy":
                    data = [{"index": i, "object": "pooling", "data": float(x)} for i, x in enumerate(r)]
                else:
                    data = [{"index": i, "object": "pooling", "data": [[float(x)]]} for i, x in enumerate(r)]
                return {"object": "list", "model": body.get("model") or s.model_name, "data": data}
            return await handle(request, "pooling", work)
        return pooling

    app.post("/pooling")(pooling_route(None))
    app.post("/vllm/pooling")(pooling_route("vllm"))
    app.post("/lmdeploy/pooling")(pooling_route("lmdeploy"))

    @app.post("/get_reward")
    async def get_reward(request: Request):
        async def work(body, req):
            items = validation.get_reward(body, s.max_items)
            names = [f"query[{i}]" for i in range(len(items))]
            r = [float(x) for x in await service.rewards(await item_ids(items, names), req, names)]
            return {"rewards": r, "scores": r, "extra_logs": {}}
        return await handle(request, "get_reward", work)

    @app.post("/v1/rewards")
    async def rewards(request: Request):
        async def work(body, request):
            req = validation.native(body, s.max_items)
            ids = await item_ids(req.items, req.names)
            r = await service.rewards(ids, request, req.names)
            data, k = [], 0
            for i, (n, single) in enumerate(zip(req.counts, req.single)):
                vals = [float(x) for x in r[k:k + n]]
                k += n
                data.append({"index": i, "reward": vals[0]} if single else {"index": i, "rewards": vals})
            return {"object": "list", "model": body.get("model") or s.model_name, "data": data,
                    "usage": {"items": len(ids), "tokens": int(sum(len(a) for a in ids))}}
        return await handle(request, "v1_rewards", work)

    # Open with --api-key-env too, on purpose: load balancers and Kubernetes probes call it without
    # credentials, and it tells only whether this replica takes work (and how much waits), no rewards.
    @app.get("/health")
    async def health():
        ok = service.batcher.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": s.model_name,
                             "queue_items": service.batcher.queued_items, "reading": service.reading,
                             "preparing": service.preparing, "waiting": service.waiting},
                            200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        if not authorized(request):
            return unauthorized()
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    routes = sorted({f"{method} {r.path}" for r in app.routes for method in getattr(r, "methods", ())
                     if method != "HEAD"})

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, exc: StarletteHTTPException):
        # an unknown path or method answered FastAPI's {"detail": ...}: a client reading the
        # documented error.message (the RL trainers' OpenAI-style clients) found no reason
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; this server answers "
                      f"{', '.join(routes)}", exc.headers)

    return app
