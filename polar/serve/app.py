"""The HTTP endpoints (FastAPI on uvicorn).

    POST /classify        SGLang:   {"model", "text": [str]}  -> [{"embedding": [r]}, ...]
    POST /pooling         vLLM:     {"input": [str]}          -> {"data": [{"data": [[r]]}, ...]}
                          (lmdeploy's answer, {"data": [{"data": r}]}, with --pooling-format lmdeploy,
                          ?format=lmdeploy, or at /lmdeploy/pooling; /vllm/pooling is always vLLM's)
    POST /get_reward      OpenRLHF: {"query", "prompts", "labels"} -> {"rewards", "scores", "extra_logs"}
    POST /v1/rewards      native:   {"items": [{"prompt", "reference", "output"|"outputs", "wrapper"}]}
    GET  /health          200 {"status": "ok", ...}, 503 while shutting down
    GET  /metrics         Prometheus text format

vLLM returns one row per token and its clients read the last; only the reward token's row is
computed here, so the answer holds that one row ([[r]]), which is what `data[-1][0]` reads.
Errors are JSON {"error": {"message", "type", "code"}} with a 4xx status saying what is wrong.
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

from polar.serve import validation
from polar.serve.batcher import Batcher, Closed, QueueFull
from polar.serve.items import format_structured, tokenize_served_text
from polar.serve.metrics import Metrics
from polar.serve.validation import RequestError
from polar.tokenizer import Tokenizer

POOLING_FORMATS = ("vllm", "lmdeploy")


@dataclass
class ServeSettings:
    model_name: str = "polar"
    max_body_bytes: int = 64 * 1024 * 1024
    max_items: int = 4096
    timeout_s: float = 300.0
    api_key: Optional[str] = None
    max_length: int = 16384  # POLAR's truncation of structured items (polar.format)
    max_response: int = 4096
    max_item_tokens: int = 16385  # a longer already-formatted text is refused
    pooling_format: str = "vllm"


class Service:
    """What the endpoints share: tokenizer, batcher, metrics, settings."""

    def __init__(self, tokenizer: Tokenizer, batcher: Batcher, settings: ServeSettings, metrics: Metrics):
        if settings.pooling_format not in POOLING_FORMATS:
            raise ValueError(f"--pooling-format must be one of {POOLING_FORMATS}, got {settings.pooling_format!r}")
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.settings = settings
        self.metrics = metrics

    def texts_to_ids(self, texts: list[str]) -> list[np.ndarray]:
        ids = tokenize_served_text(self.tokenizer, texts)
        limit = self.settings.max_item_tokens
        for i, a in enumerate(ids):
            if len(a) > limit:
                raise RequestError(f"item {i} is {len(a)} tokens long, more than this server's limit of {limit} "
                                   "(--max-item-tokens); truncate it as POLAR's format does (max_length)", 413)
        return ids

    def items_to_ids(self, items) -> list[np.ndarray]:
        s = self.settings
        try:
            return [ids for _, ids in format_structured(self.tokenizer, items, s.max_length, s.max_response)]
        except (TypeError, ValueError) as e:
            raise RequestError(f"cannot format the items: {e}") from None

    async def rewards(self, ids: list[np.ndarray]) -> np.ndarray:
        try:
            fut = self.batcher.submit(ids)
        except QueueFull as e:
            raise _TooBusy(e) from None
        except Closed as e:
            raise RequestError(str(e), 503) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"not scored within {self.settings.timeout_s:g} s (--timeout-s); the server is "
                               "overloaded or the batch too large", 504) from None


class _TooBusy(Exception):
    def __init__(self, e: QueueFull):
        super().__init__(str(e))
        self.retry_after_s = e.retry_after_s


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 413: "request_too_large",
            429: "rate_limit_error", 503: "unavailable", 504: "timeout"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RequestError(f"the body is {int(declared)} bytes, more than this server's limit of {limit} "
                                   "(--max-body-bytes)", 413)
        except ValueError:
            raise RequestError("the Content-Length header is not a number") from None
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise RequestError(f"the body is more than this server's limit of {limit} bytes (--max-body-bytes)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


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

    async def handle(request: Request, endpoint: str, work):
        """Auth, body, JSON, then `work(body) -> response`; every failure becomes a 4xx/5xx answer
        for this request alone."""
        t0 = time.monotonic()
        status = 200
        try:
            if not authorized(request):
                status = 401
                return _error(401, "missing or wrong bearer token (Authorization: Bearer <key>)",
                              {"WWW-Authenticate": "Bearer"})
            body = validation.parse_json(await _read_body(request, s.max_body_bytes))
            return JSONResponse(await work(body, request))
        except RequestError as e:
            status = e.status
            return _error(e.status, e.message)
        except _TooBusy as e:
            status = 429
            return _error(429, str(e), {"Retry-After": str(e.retry_after_s)})
        except Exception as e:  # a bug: say so, keep serving others
            status = 500
            return _error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            m.requests.labels(endpoint, str(status)).inc()
            m.latency.labels(endpoint).observe(time.monotonic() - t0)

    async def text_ids(texts):
        return await asyncio.to_thread(service.texts_to_ids, texts)

    async def item_ids(items):
        return await asyncio.to_thread(service.items_to_ids, items)

    @app.post("/classify")
    async def classify(request: Request):
        async def work(body, _):
            r = await service.rewards(await text_ids(validation.classify(body, s.max_items)))
            return [{"index": i, "embedding": [float(x)]} for i, x in enumerate(r)]
        return await handle(request, "classify", work)

    def pooling_route(fixed: Optional[str]):
        async def pooling(request: Request):
            async def work(body, req):
                fmt = fixed or req.query_params.get("format", s.pooling_format)
                if fmt not in POOLING_FORMATS:
                    raise RequestError(f"format must be one of {', '.join(POOLING_FORMATS)}, got {fmt!r}")
                r = await service.rewards(await text_ids(validation.pooling(body, s.max_items)))
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
        async def work(body, _):
            r = [float(x) for x in await service.rewards(await item_ids(validation.get_reward(body, s.max_items)))]
            return {"rewards": r, "scores": r, "extra_logs": {}}
        return await handle(request, "get_reward", work)

    @app.post("/v1/rewards")
    async def rewards(request: Request):
        async def work(body, _):
            req = validation.native(body, s.max_items)
            ids = await item_ids(req.items)
            r = await service.rewards(ids)
            data, k = [], 0
            for i, (n, single) in enumerate(zip(req.counts, req.single)):
                vals = [float(x) for x in r[k:k + n]]
                k += n
                data.append({"index": i, "reward": vals[0]} if single else {"index": i, "rewards": vals})
            return {"object": "list", "model": body.get("model") or s.model_name, "data": data,
                    "usage": {"items": len(ids), "tokens": int(sum(len(a) for a in ids))}}
        return await handle(request, "v1_rewards", work)

    @app.get("/health")
    async def health():
        ok = service.batcher.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": s.model_name,
                             "queue_items": service.batcher.queued_items}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        if not authorized(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <key>)")
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    return app
