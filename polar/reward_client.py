"""The Python clients of `polar serve` (polar.reward re-exports them beside the RL trainers' hooks).

    RewardClient / AsyncRewardClient   HTTP, retries with backoff (429 honours Retry-After; a 429, a
                                       503 or a refused connection is retried for max_wait_s, past
                                       max_retries; a request sent in full and unanswered within
                                       timeout_s is not sent again), large batches split into chunks
                                       (sent concurrently by the async one, so the server batches
                                       them together). A call that ends without an answer raises
                                       RewardConnectionError (a ConnectionError; RewardTimeoutError,
                                       also a TimeoutError, when it timed out) naming the URL, what
                                       happened and what was tried; an answer refused, a
                                       RewardServerError. deadline_s (off by default) bounds a whole
                                       call, its chunks and their retries together

An item is {"prompt", "reference", "output", "wrapper" (optional, "sft" by default)}, each text a
string or a list of {"role", "content"} messages (paper Sec. 3: the reward compares the output
with the reference trajectory for the same prompt).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import re
import socket
import threading
import time
import weakref
from typing import Optional, Sequence

try:
    import httpx
except ModuleNotFoundError as e:  # a wheel without [client], imported by verl or OpenRLHF: no polar command names it
    if e.name != "httpx":
        raise
    raise ModuleNotFoundError("polar.reward's clients need the module 'httpx', which is not installed: "
                              "pip install 'polar-rm[client]'", name="httpx") from e

from polar.openai_client import retry_after

URL_ENV = "POLAR_REWARD_URL"
API_KEY_ENV = "POLAR_REWARD_API_KEY"
# 408: `polar serve` gave up reading a body that came too slowly (--read-timeout-s); it may come faster
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# `polar serve` answers "false" in it where the same request meets the same error (non-finite rewards);
# the name is polar.serve.validation.NO_RETRY_HEADER, spelled out so this client imports no server code
_NO_RETRY_HEADER = "x-polar-retryable"
# half of `polar serve`'s default --max-body-bytes (64 MiB): 512 long rollouts, each with its prompt
# and reference, can pass the server's limit
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# in the 413 of a request over `polar serve`'s limits on the body and the item count (not an item's length)
_REQUEST_LIMIT_HINTS = ("--max-body-bytes", "--max-items")


class RewardServerError(RuntimeError):
    """An answer refused, or one that is not one finite reward per item; the message names the
    server's URL (`url`) and the status (`status`, 200 for an unusable answer)."""

    def __init__(self, status: int, message: str, url: Optional[str] = None):
        super().__init__(f"reward server{f' at {url}' if url else ''} answered {status}: {message}")
        self.status = status
        self.message = message
        self.url = url

    def __reduce__(self):
        # pickled from its arguments: the default rebuilds it from the message alone, which this
        # __init__ cannot take, and Ray (verl's reward functions) pickles a worker's exception; and
        # with its attributes, as the default keeps them (add_note's __notes__, any set since)
        return type(self), (self.status, self.message, self.url), self.__dict__


class RewardConnectionError(ConnectionError):
    """A call to the reward server that ended without an answer: a refused connection, a host name
    that does not resolve, a timeout, a connection closed before the answer. The message names the
    URL, what happened and what was tried (attempts, seconds); `url`, `attempts` and `waited_s` hold
    them, and `__cause__` is httpx's exception. A ConnectionError, so code catching that (as for a
    refused connection before this type) keeps working."""

    def __init__(self, message: str, *, url: Optional[str] = None, attempts: Optional[int] = None,
                 waited_s: Optional[float] = None):
        # keywords with defaults: an exception is rebuilt from its message alone when it is pickled
        # (Ray, which runs verl's reward functions, sends a worker's exception to the driver this way)
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.waited_s = waited_s


class RewardTimeoutError(RewardConnectionError, TimeoutError):
    """A RewardConnectionError that timed out (no connection, or no answer, within timeout_s)."""


_ITEM_INDEX = re.compile(r"\bitems\[(\d+)\]")


def _in_call(e: RewardServerError, offset: int, n: int) -> RewardServerError:
    """The server names an item by its index in the request it got; a call sent in chunks names it
    by its index in the caller's list (the chunk of `n` items starting at `offset`). A request of
    one item refused as over the server's request limits names none: that item is named."""
    message = _ITEM_INDEX.sub(lambda m: f"items[{int(m.group(1)) + offset}]", e.message)
    if n == 1 and _request_limit(e):
        message += f" (items[{offset}], sent alone: this item alone is over the limit)"
    return e if message == e.message else RewardServerError(e.status, message, e.url)


def _message(resp: httpx.Response) -> str:
    try:
        return resp.json()["error"]["message"]
    except Exception:
        return resp.text[:500]


def _json(resp: httpx.Response):
    try:
        return resp.json()
    except ValueError:
        raise RewardServerError(resp.status_code, f"an answer that is not JSON: {resp.text[:200]!r}",
                                str(resp.request.url)) from None


def _entries(items: Sequence[dict]) -> list[bytes]:
    """Each item as the JSON of its request entry, encoded once: the bodies are joined from these,
    so their sizes are known before sending."""
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise TypeError(f"item {i} must be a dict with prompt, reference and output, got {type(it).__name__}")
        entry = {k: it[k] for k in ("prompt", "reference", "output", "wrapper") if k in it}
        try:
            out.append(json.dumps(entry, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        except UnicodeEncodeError as e:
            found = e.object[e.start:e.end]
            raise ValueError(f"item {i} holds a lone surrogate ({found!r}), which is not text") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"item {i} is not JSON: {e}") from None
    return out


def _spans(entries: list[bytes], chunk_size: int, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive runs of entries, each at most chunk_size entries and max_bytes of body (an entry
    larger than that alone is sent alone: the server judges it)."""
    spans, start, size = [], 0, 0
    for i, e in enumerate(entries):
        if i > start and (i - start == chunk_size or size + len(e) + 1 > max_bytes):
            spans.append((start, i))
            start, size = i, 0
        size += len(e) + 1
    if start < len(entries):
        spans.append((start, len(entries)))
    return spans


def _body(entries: list[bytes], model: Optional[str]) -> bytes:
    tail = b',"model":' + json.dumps(model).encode() if model else b""
    return b'{"items":[' + b",".join(entries) + b"]" + tail + b"}"


_JSON = {"Content-Type": "application/json"}


def _request_limit(e: Exception) -> bool:
    """A 413 for the request's size or item count (not for one item's length): a server run with limits
    below this client's chunk_size and max_body_bytes."""
    return (isinstance(e, RewardServerError) and e.status == 413
            and any(hint in str(e) for hint in _REQUEST_LIMIT_HINTS))


def _over_request_limit(e: Exception, n: int) -> bool:
    """_request_limit, on a request that can be halved."""
    return n > 1 and _request_limit(e)


async def _gather(*coros):
    """asyncio.gather whose first failure cancels the others: a call that has failed stops sending
    (and retrying) its other chunks, instead of leaving them running in the caller's event loop."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        # wait for them to end, retrieving what each raised (asyncio logs an exception never retrieved)
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _root(e: BaseException, kind: type) -> Optional[BaseException]:
    """The exception of type `kind` in `e`'s chain (httpx wraps the OSError that a refused
    connection or an unresolvable host name raised), or None."""
    for _ in range(16):  # a chain is a few links; bounded, as a chain may loop
        if e is None or isinstance(e, kind):
            return e
        e = e.__cause__ or e.__context__
    return None


def _seconds(waited: float) -> str:
    return f"{waited:.{1 if waited < 100 else 0}f} s"


def _tried(attempt: int, started: float) -> str:
    """The words "N attempts in S s": `attempt` counted from 0, `started` the time.monotonic() of the first."""
    return f"{attempt + 1} attempt{'s' * bool(attempt)} in {_seconds(time.monotonic() - started)}"


class _Call:
    """One score() call: its deadline (deadline_s, None for none) and its progress, `done` of its
    `chunks` requests answered. max_wait_s and timeout_s count per request, so a call of k chunks
    against a server that keeps answering 503 could last k x (max_wait_s + timeout_s); an RL step
    wants one bound on its rewards."""

    def __init__(self, deadline_s: Optional[float], url: str, chunks: int):
        self.started = time.monotonic()
        self.deadline_s, self.url, self.chunks, self.done = deadline_s, url, chunks, 0

    def left(self) -> float:
        """Seconds left before the deadline (math.inf without one)."""
        return math.inf if self.deadline_s is None else self.deadline_s - (time.monotonic() - self.started)

    def error(self) -> RewardTimeoutError:
        waited = time.monotonic() - self.started
        return RewardTimeoutError(
            f"no rewards from the reward server at {self.url} within deadline_s={self.deadline_s:g} s ({self.done} "
            f"of {self.chunks} chunks done, {self.chunks - self.done} left, in {_seconds(waited)}; raise "
            f"deadline_s, or make the server keep up)", url=self.url, waited_s=waited)


def _what_happened(e: httpx.TransportError, url: str, timeout_s: float) -> str:
    """What `e` says of the server at `url`, in words (httpx's own messages are the OS's: "[Errno -2]
    Name or service not known", "timed out")."""
    if _root(e, ConnectionRefusedError) is not None:
        return f"cannot connect to the reward server at {url}: connection refused"
    if _root(e, socket.gaierror) is not None:
        return (f"cannot connect to the reward server at {url}: host name {httpx.URL(url).host!r} not found "
                f"({e})")
    if isinstance(e, httpx.ConnectTimeout):
        return f"cannot connect to the reward server at {url}: no connection within timeout_s={timeout_s:g} s"
    if isinstance(e, httpx.PoolTimeout):
        return (f"cannot connect to the reward server at {url}: no free connection in this client's pool "
                f"within timeout_s={timeout_s:g} s")
    if isinstance(e, httpx.WriteTimeout):
        return f"cannot send to the reward server at {url}: the request was not sent within timeout_s={timeout_s:g} s"
    if isinstance(e, httpx.ReadTimeout):
        return f"the reward server at {url} sent no answer within timeout_s={timeout_s:g} s"
    return f"no answer from the reward server at {url}: {type(e).__name__}: {e}"


# held while an httpx client or a RewardClient is made for a process or a URL: threads making their
# first calls at once (verl's reward loop calls compute_score from worker threads) each made one, kept
# one and dropped the others unclosed with their connection pools. A new lock in a forked child: a
# thread of the parent may have held it at the fork, and no thread of the child would release it.
_making = threading.Lock()


def _new_making_lock() -> None:
    global _making
    _making = threading.Lock()


os.register_at_fork(after_in_child=_new_making_lock)


class _Base:
    def __init__(self, base_url: Optional[str] = None, *, api_key: Optional[str] = None, timeout_s: float = 300.0,
                 max_retries: int = 6, backoff_s: float = 0.5, max_backoff_s: float = 30.0, chunk_size: int = 512,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model: Optional[str] = None,
                 max_wait_s: float = 300.0, deadline_s: Optional[float] = None):
        base_url = base_url or os.environ.get(URL_ENV)
        if not base_url:
            raise ValueError(f"no reward server URL: pass base_url or set {URL_ENV}")
        if "://" not in base_url:
            base_url = "http://" + base_url
        scheme = base_url.split("://", 1)[0]
        if scheme.lower() not in ("http", "https"):
            # httpx refuses it only when a request is sent, which the retries then repeated
            raise ValueError(f"reward server URL {base_url!r}: the scheme must be http or https, got {scheme!r}")
        self.base_url = base_url.rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer (items per request), got {chunk_size!r}")
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or not 0 <= max_wait_s < math.inf:
            raise ValueError(f"max_wait_s must be a finite number of seconds >= 0, got {max_wait_s!r}")
        for name, value in (("timeout_s", timeout_s), ("deadline_s", deadline_s)):
            # None: no bound (httpx's None for timeout_s); an httpx.Timeout is refused too: each
            # request's timeout is capped at what is left of deadline_s, and the errors name the seconds
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise ValueError(f"{name} must be None or a finite number of seconds > 0, got {value!r}")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_wait_s = max_wait_s
        self.deadline_s = deadline_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.chunk_size = chunk_size
        self.max_body_bytes = max_body_bytes
        self.model = model
        self._pid, self._http = os.getpid(), self._new_http()

    def _new_http(self):
        """What one process holds to send: its httpx client (the async client: one per event loop)."""
        raise NotImplementedError

    def _own(self):
        """This process's _new_http(). A process forked after this client had sent (verl's reward
        managers that score in a fork-started process pool) holds copies of its kept-alive sockets:
        parent and children sent their requests down one TCP connection, interleaving bodies (400s
        naming garbled JSON, calls that hung) and reading each other's answers; a forked process
        gets a client of its own, leaving the parent's sockets to the parent."""
        if self._pid != os.getpid():
            with _making:
                if self._pid != os.getpid():  # not made by another thread meanwhile
                    # _http first: a thread that sees this process's _pid without the lock takes _http
                    self._http = self._new_http()
                    self._pid = os.getpid()
        return self._http

    def __getstate__(self):
        # the settings alone: the httpx client's locks, sockets and SSL context cannot be pickled (Ray
        # pickles a reward function with the client it refers to, a 'spawn' pool its arguments), and
        # the process that unpickles the copy makes its own, as a forked one does
        state = dict(self.__dict__, _pid=None)
        del state["_http"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _http=None)

    def _delay(self, attempt: int, resp: Optional[httpx.Response]) -> float:
        # a Retry-After in seconds or as an HTTP date, on a 429 or a 503 (a proxy or gateway sends it
        # on either); a negative, NaN or infinite one is ignored: back off as usual
        wait = retry_after(resp.headers) if resp is not None and resp.status_code in (429, 503) else None
        if wait is not None:
            return min(wait, self.max_backoff_s)
        # Exponential backoff with jitter, so retrying clients do not arrive in step.
        # (the exponent capped: past max_retries a 429 or 503 is retried for max_wait_s, whatever the count)
        return min(self.backoff_s * 2 ** min(attempt, 60), self.max_backoff_s) * (0.5 + random.random() / 2)

    def _check(self, resp: httpx.Response, attempt: int, started: float) -> Optional[float]:
        """None: the answer is usable; else the seconds to wait before sending again; raises when
        retrying cannot help. `started`: time.monotonic() at the request's first attempt.

        A 429 or 503 (a full queue, a server restarting) is retried for max_wait_s in all, however
        many attempts that takes: under a sustained overload every attempt is refused at once, and
        max_retries of them last a few seconds, which would fail an RL step that a wait of minutes
        lets through. Every other retryable answer is retried max_retries times."""
        status = resp.status_code
        if status == 200:
            return None
        if status in _RETRY_STATUS and resp.headers.get(_NO_RETRY_HEADER, "").lower() != "false":
            delay = self._delay(attempt, resp)
            if attempt < self.max_retries:
                return delay
            wait = self._wait_left(delay, started) if status in (429, 503) else None
            if wait is not None:
                return wait
            raise RewardServerError(status, f"{_message(resp)} ({self._gave_up(attempt, started)})",
                                    str(resp.request.url))
        raise RewardServerError(status, _message(resp), str(resp.request.url))

    def _wait_left(self, delay: float, started: float) -> Optional[float]:
        """`delay`, or what is left of max_wait_s since the first attempt if less; None once it has passed."""
        waited = time.monotonic() - started
        return min(delay, self.max_wait_s - waited) if waited < self.max_wait_s else None

    def _gave_up(self, attempt: int, started: float) -> str:
        return (f"gave up after {_tried(attempt, started)}: max_retries={self.max_retries}, "
                f"and max_wait_s={self.max_wait_s:g} for a 429, a 503 or a refused connection")

    def _unsent(self, e: httpx.TransportError, url: str, attempt: int, started: float) -> float:
        """The seconds to wait after a request to `url` met `e` instead of an answer; raises a
        RewardConnectionError (RewardTimeoutError for a timeout) naming `url`, what happened and what
        was tried, when retrying is over.

        A refused connection is a server not listening yet: `polar serve` binds its port at start
        and listens once its model is loaded (seconds for a tiny model, minutes for a 7B), refusing
        connections until then, so it is waited for as a 503 is, for max_wait_s; nothing was sent,
        so sending again cannot score twice.

        A read timeout (the request sent in full, no answer within timeout_s) is not retried: the
        server holds the batch, queued or being scored (an overloaded `polar serve` answers 429 at
        once rather than queueing past its --max-queue), and the same batch sent again waits and
        takes as long, so each retry would time out too, adding the batch's work again each time (a
        copy whose batch had started is scored for nobody). The error says so, and the ways out: a
        larger timeout_s, a smaller chunk_size.

        Every other transport error keeps to max_retries: a host name that does not resolve (a
        service not registered yet), a connect, pool or write timeout (the request never reached the
        server whole: nothing scored), a connection closed before the answer."""
        if isinstance(e, httpx.ReadTimeout):
            tried = (f"{_tried(attempt, started)}; not sent again: the server may still be scoring it, and a retry "
                     f"would add the same work and time out as well; raise timeout_s, or send fewer items per "
                     f"request by lowering chunk_size={self.chunk_size}")
        else:
            delay = self._delay(attempt, None)
            if attempt < self.max_retries:
                return delay
            wait = self._wait_left(delay, started) if _root(e, ConnectionRefusedError) is not None else None
            if wait is not None:
                return wait
            tried = self._gave_up(attempt, started)
        raise self._unanswered(e, url, tried, attempt, started) from e

    def _unanswered(self, e: httpx.TransportError, url: str, tried: str, attempt: int,
                    started: float) -> RewardConnectionError:
        """The error for a call to `url` that ended with `e`; `tried` says what was tried."""
        error = RewardTimeoutError if isinstance(e, httpx.TimeoutException) else RewardConnectionError
        return error(f"{_what_happened(e, url, self.timeout_s)} ({tried})", url=url, attempts=attempt + 1,
                     waited_s=time.monotonic() - started)

    def _rewards(self, payload, n: int) -> list[float]:
        """One reward per item sent, in the items' order (by each answer's "index" where given): an
        answer of another length or shape, or a reward that is not a finite number (a NaN, which
        JSON parsers take, a string, a null), is an error naming the item, never a reward paired
        with the wrong item or one an RL step would average in."""
        try:
            data = payload["data"]
            if not isinstance(data, list) or len(data) != n:
                raise ValueError(f"{len(data) if isinstance(data, list) else 'no list of'} rewards for {n} items")
            order = [d.get("index", k) for k, d in enumerate(data)]
            if sorted(order) != list(range(n)):
                raise ValueError(f"indices {order[:8]} are not 0..{n - 1}")
            out = [0.0] * n
            for k, d in zip(order, data):
                r = d["reward"]
                try:  # an integer past a float's range (JSON's numbers have none) overflows float()
                    out[k] = float(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else math.nan
                except OverflowError:
                    out[k] = math.inf
                if not math.isfinite(out[k]):
                    raise ValueError(f"the reward of items[{k}] is {r!r:.40}, not a finite number")
            return out
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RewardServerError(200, f"an answer that is not one reward per item: {e}",
                                    self.base_url + "/v1/rewards") from None


class RewardClient(_Base):
    """Blocking client. `score(items)` -> one float per item, in order."""

    def _new_http(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout_s, headers=self.headers)

    _connections = _Base._own

    def _post(self, path: str, body: bytes, call: _Call) -> dict:
        started = time.monotonic()
        for attempt in itertools.count():
            left = call.left()
            if left <= 0:
                raise call.error()
            # no thread to cancel a blocking request: its waits end at the deadline instead
            capped = left < (math.inf if self.timeout_s is None else self.timeout_s)
            try:
                resp = self._connections().post(self.base_url + path, content=body, headers=_JSON,
                                                timeout=left if capped else self.timeout_s)
            except httpx.TransportError as e:
                if isinstance(e, httpx.TimeoutException) and capped:
                    raise call.error() from e
                delay = self._unsent(e, self.base_url + path, attempt, started)
            else:
                delay = self._check(resp, attempt, started)
                if delay is None:
                    return _json(resp)
            time.sleep(max(0.0, min(delay, call.left())))

    def score(self, items: Sequence[dict]) -> list[float]:
        entries = _entries(items)
        spans = _spans(entries, self.chunk_size, self.max_body_bytes)
        call = _Call(self.deadline_s, self.base_url + "/v1/rewards", len(spans))
        out: list[float] = []
        for a, b in spans:
            out += self._score(entries[a:b], call, a)
            call.done += 1
        return out

    def _score(self, entries: list[bytes], call: _Call, offset: int = 0) -> list[float]:
        try:
            return self._rewards(self._post("/v1/rewards", _body(entries, self.model), call), len(entries))
        except RewardServerError as e:
            if not _over_request_limit(e, len(entries)):
                raise _in_call(e, offset, len(entries)) from None
        half = len(entries) // 2  # the server's limits are below this client's chunks: halve
        return self._score(entries[:half], call, offset) + self._score(entries[half:], call, offset + half)

    def health(self) -> dict:
        """GET /health, once (it says whether the server is up now: `polar serve` answers its JSON,
        status "unavailable" with a 503); a RewardConnectionError when it does not answer, a
        RewardServerError naming the URL when the answer is not JSON (a proxy's page, another server)."""
        url, started = self.base_url + "/health", time.monotonic()
        try:
            resp = self._connections().get(url)
        except httpx.TransportError as e:
            raise self._unanswered(e, url, _tried(0, started), 0, started) from e
        return _json(resp)

    def close(self) -> None:
        # this process's: a forked child's copy of the parent's is the parent's to close (its pool's
        # lock may have been held by a parent thread at the fork)
        if self._pid == os.getpid():
            self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRewardClient(_Base):
    """asyncio client; the chunks of one call are in flight together."""

    def _new_http(self) -> weakref.WeakKeyDictionary:
        return weakref.WeakKeyDictionary()

    def _connections(self) -> httpx.AsyncClient:
        """This process's httpx client for the running event loop. A connection kept alive belongs
        to the loop that opened it: a call from the next loop (a reward function running each
        step's calls under asyncio.run) failed at once with 'RuntimeError: Event loop is closed',
        and one client for the last loop used made a new one at every switch between loops that
        live on (threads with a loop each), leaving the last one's connections open. A closed loop's
        client is dropped, not closed (closing needs its loop), when another loop makes one."""
        loop, per_loop = asyncio.get_running_loop(), self._own()
        http = per_loop.get(loop)
        if http is None:
            with _making:
                http = per_loop.get(loop)
                if http is None:
                    for closed in [other for other in per_loop if other.is_closed()]:
                        del per_loop[closed]
                    http = per_loop[loop] = httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers)
        return http

    async def _post(self, path: str, body: bytes) -> dict:
        # score() bounds the whole call with its deadline, cancelling this where it waits
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                resp = await self._connections().post(self.base_url + path, content=body, headers=_JSON)
            except httpx.TransportError as e:
                delay = self._unsent(e, self.base_url + path, attempt, started)
            else:
                delay = self._check(resp, attempt, started)
                if delay is None:
                    return _json(resp)
            await asyncio.sleep(delay)

    async def score(self, items: Sequence[dict]) -> list[float]:
        entries = _entries(items)
        spans = _spans(entries, self.chunk_size, self.max_body_bytes)
        call = _Call(self.deadline_s, self.base_url + "/v1/rewards", len(spans))

        async def chunk(a: int, b: int) -> list[float]:
            rewards = await self._score(entries[a:b], a)
            call.done += 1
            return rewards

        try:
            # wait_for cancels the chunks (_gather cancels the others with the first) at the deadline
            parts = await asyncio.wait_for(_gather(*(chunk(a, b) for a, b in spans)),
                                           None if self.deadline_s is None else call.left())
        except TimeoutError as e:
            if isinstance(e, RewardConnectionError):  # a request's own timeout, not the deadline
                raise
            raise call.error() from None
        return [r for p in parts for r in p]

    async def _score(self, entries: list[bytes], offset: int = 0) -> list[float]:
        try:
            return self._rewards(await self._post("/v1/rewards", _body(entries, self.model)), len(entries))
        except RewardServerError as e:
            if not _over_request_limit(e, len(entries)):
                raise _in_call(e, offset, len(entries)) from None
        half = len(entries) // 2
        first, second = await _gather(self._score(entries[:half], offset), self._score(entries[half:], offset + half))
        return first + second

    async def aclose(self) -> None:
        # those of this loop: another loop's connections can only be closed from that loop (call
        # aclose from each loop still running that used the client). Nothing is made to be closed: a
        # loop that never sent has no pool, and a forked or unpickled copy that never sent has none of
        # its own (the parent's are the parent's)
        if self._pid == os.getpid():
            http = self._http.get(asyncio.get_running_loop())
            if http is not None:
                await http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
