"""The HTTP endpoints (FastAPI on uvicorn).

    POST /classify        SGLang:   {"model", "text": [str]}  -> [{"embedding": [r]}, ...] (one str: one object)
    POST /pooling         vLLM:     {"input": [str]}          -> {"data": [{"data": [[r]]}, ...]}
                          (lmdeploy's answer, {"data": [{"data": r}]}, with --pooling-format lmdeploy,
                          ?format=lmdeploy, or at /lmdeploy/pooling; /vllm/pooling is always vLLM's)
    POST /get_reward      OpenRLHF: {"query", "prompts", "labels"} -> {"rewards", "scores", "extra_logs"}
    POST /v1/rewards      native:   {"items": [{"prompt", "reference", "output"|"outputs", "wrapper"}]}
    GET  /health          200 {"status": "ok", ...}, 503 while shutting down; never needs the bearer token
    GET  /metrics         Prometheus text format
    (HEAD on either: the GET's status and headers, no body)

vLLM returns one row per token and its clients read the last; only the reward token's row is
computed here, so the answer holds that one row ([[r]]), which is what `data[-1][0]` reads. A
/classify or /pooling text must end with the reward token, as POLAR's client ends each (400 otherwise):
the reward is read at the last token.
Errors are JSON {"error": {"message", "type", "code"}} with a 4xx status saying what is wrong.
A request whose client has gone (timed out, retrying) leaves the queue unscored, and the wait
for room to be read in too when its body is small; one gone while its body is parsed or tokenized
is never queued, and one gone while it waits for a --max-preparing slot is not parsed. A body is
read without a --max-preparing slot (reading waits on the client's network); --max-reading-bytes
bounds the bodies being read. A request still in flight when uvicorn's graceful timeout runs out
is answered 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import hmac
import time
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
from polar.serve.admission import Admission, TooBusy, declared_length
from polar.serve.batcher import Batcher, Closed, QueueFull, non_finite
from polar.serve.client_watch import ClientGone, Departure
from polar.serve.items import NoRewardToken, check_truncation, format_structured, tokenize_served_text
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


class Service(Admission):
    """What the endpoints share: tokenizer, batcher, metrics, settings, and the admission of requests."""

    def __init__(self, tokenizer: Tokenizer, batcher: Batcher, settings: ServeSettings, metrics: Metrics):
        if settings.pooling_format not in POOLING_FORMATS:
            raise ValueError(f"--pooling-format must be one of {POOLING_FORMATS}, got {settings.pooling_format!r}")
        check_truncation(settings.max_length, settings.max_response)
        super().__init__(settings, batcher, metrics)
        self.tokenizer = tokenizer
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

    def texts_to_ids(self, texts: list[str], field: str) -> list[np.ndarray]:
        try:
            ids = tokenize_served_text(self.tokenizer, texts, [f"{field}[{i}]" for i in range(len(texts))])
        except NoRewardToken as e:
            raise RequestError(str(e)) from None
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

    async def rewards(self, ids: list[np.ndarray], request: Request, names: list[str]) -> np.ndarray:
        """`names[i]`: where item i is in the request (`items[1]`, `text[0]`), for errors."""
        # A client that timed out (POLAR's client: after 30 s, then it retries) is not waiting for
        # this answer: its items are not queued, or leave the queue, instead of being scored once
        # per attempt (request.state.departure has watched since its body was read).
        departure: Departure = request.state.departure
        try:
            if departure.left:
                raise ClientGone()
            fut = self.batcher.submit(ids)
        except QueueFull as e:
            raise TooBusy(str(e), e.retry_after_s) from None
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
            raise ClientGone()
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


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 408: "timeout", 413: "request_too_large",
            431: "request_too_large",
            404: "not_found_error", 405: "method_not_allowed",
            415: "unsupported_media_type", 429: "rate_limit_error", 499: "client_closed_request", 503: "unavailable",
            504: "timeout"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def error_body(status: int, message: str) -> bytes:
    """The JSON of an error answer, for one written below the app (http_protocol.http_protocol)."""
    return bytes(_error(status, message).body)


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


class _CloseAfterUnreadExpect:
    """An answer given to a request with Expect: 100-continue before its body was asked for (a 413
    from its Content-Length, a 401, a 404) says Connection: close: its client may send the body or
    not (RFC 9110 section 10.1.1), so nothing after the answer can be read as a next request. Kept
    alive, the client's next request was read as the body it never sent, and waited for ever. A
    body asked for is read to its end by uvicorn (its first receive() sends the 100 Continue)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (b"expect", b"100-continue") not in (
                (k, v.strip().lower()) for k, v in scope["headers"]):
            return await self.app(scope, receive, send)
        asked = False

        async def receiving():
            nonlocal asked
            asked = True
            return await receive()

        async def sending(message):
            if message["type"] == "http.response.start" and not asked:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receiving, sending)


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
    app.add_middleware(_CloseAfterUnreadExpect)

    def authorized(request: Request) -> bool:
        if not s.api_key:
            return True
        # RFC 7235 (2.1): the scheme is case-insensitive ("bearer" is "Bearer"), one or more spaces
        # before the credentials; the token itself is compared exactly, in constant time
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.lstrip(" ").encode(), s.api_key.encode())

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
            declared = declared_length(request)
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
            departure = request.state.departure = Departure(request, m)
            await service.start_preparing(request)
            if departure.left:  # while waiting for the slot: parsed and tokenized for nobody otherwise
                raise ClientGone()
            body = await asyncio.to_thread(validation.parse_json, chunks, endpoint)
            return JSONResponse(await work(body, request))
        except RequestError as e:
            status = e.status
            return _error(e.status, e.message, None if e.retryable else {NO_RETRY_HEADER: "false"})
        except TooBusy as e:
            status = 429
            return _error(429, str(e), {"Retry-After": str(e.retry_after_s)})
        except (ClientGone, ClientDisconnect):
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

    async def checked(check, body):
        # in a worker thread as the parse is: a body of millions of short elements took seconds to
        # check element by element (before the count is refused), holding every other request and /health
        return await asyncio.to_thread(check, body, s.max_items)

    async def text_ids(texts, field):
        return await asyncio.to_thread(service.texts_to_ids, texts, field)

    async def item_ids(items, names):
        return await asyncio.to_thread(service.items_to_ids, items, names)

    @app.post("/classify")
    async def classify(request: Request):
        async def work(body, req):
            texts = await checked(validation.classify, body)
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
                texts = await checked(validation.pooling, body)
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
            items = await checked(validation.get_reward, body)
            names = [f"query[{i}]" for i in range(len(items))]
            r = [float(x) for x in await service.rewards(await item_ids(items, names), req, names)]
            return {"rewards": r, "scores": r, "extra_logs": {}}
        return await handle(request, "get_reward", work)

    @app.post("/v1/rewards")
    async def rewards(request: Request):
        async def work(body, request):
            req = await checked(validation.native, body)
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
    # HEAD as GET without the body (uvicorn drops it), as a GET route of Starlette's own answers
    # it; FastAPI's answered 405, and some load balancers' and monitors' checks send HEAD
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        ok = service.batcher.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": s.model_name,
                             "queue_items": service.batcher.queued_items, "reading": service.reading,
                             "preparing": service.preparing, "waiting": service.waiting},
                            200 if ok else 503)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
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
