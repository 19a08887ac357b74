"""Admission: how many requests are read, parsed and tokenized at once, and in what order.

A request is admitted once its body fits in --max-reading-bytes with the bodies of those admitted
before it; reading takes no --max-preparing slot (it waits on the client's network), and a slot is
taken, in arrival order, only to parse and tokenize a body already read. A request that does not
fit waits, up to --max-waiting of them for at most --max-preparing-wait-s, then gets 429.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Optional

from polar.serve.batcher import Batcher, QueueFull
from polar.serve.client_watch import ClientGone, until_gone
from polar.serve.metrics import Metrics
from polar.serve.validation import RequestError

if TYPE_CHECKING:
    # for annotations only: polar serve's argument parsing imports this module, and without the [serve]
    # extra starlette (fastapi's dependency) is missing too, which polar.cli cannot name an extra for
    from starlette.requests import Request

    from polar.serve.app import ServeSettings

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


class TooBusy(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def declared_length(request: Request) -> Optional[int]:
    """The body's Content-Length; None when it is not known before it is read: no Content-Length, or
    Transfer-Encoding beside one, which the HTTP server reads chunked (RFC 9112 section 6.3: the
    encoding overrides the length), so the body may grow to --max-body-bytes whatever it declares."""
    declared = request.headers.get("content-length")
    if declared is None or "transfer-encoding" in request.headers:
        return None
    try:
        return int(declared)
    except ValueError:
        raise RequestError("the Content-Length header is not a number") from None


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


class Admission:
    """The room requests are read, parsed and tokenized in: --max-reading-bytes of bodies being
    read, --max-preparing slots to parse and tokenize them, --max-waiting requests waiting for room."""

    def __init__(self, settings: ServeSettings, batcher: Batcher, metrics: Metrics):
        self.settings = settings
        self.batcher = batcher
        self.metrics = metrics
        if settings.max_preparing < 1:
            raise ValueError(f"--max-preparing must be 1 or more, got {settings.max_preparing}")
        self.max_reading_bytes = reading_bytes_bound(settings.max_reading_bytes, settings.max_preparing,
                                                     settings.max_body_bytes)
        self._slots = _Allowance(settings.max_preparing)  # parsing and tokenizing
        self._room = _Allowance(self.max_reading_bytes)  # body bytes of the requests admitted
        # read from the room when scraped: the room also changes where no request is admitted or
        # finished (granted to a waiting request that gives up, or is cancelled, in the same turn)
        metrics.reading_bytes.set_function(lambda: self._room.held)
        self.waiting = 0  # requests waiting for room
        self.reading = 0  # requests admitted, not yet holding a slot: reading their body or waiting for a slot
        # each waiting request becomes at least one queued item: more than --max-queue could never all be queued
        self.max_waiting = batcher.max_queue_items if settings.max_waiting is None else settings.max_waiting
        if self.max_waiting < 0:
            raise ValueError(f"--max-waiting must be 0 or more, got {self.max_waiting}")

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
            raise TooBusy(str(e), e.retry_after_s) from None
        declared = declared_length(request)
        charge = self.charge(declared)
        if self._room.take_now(charge):
            self._admitted(request, charge)
            return []
        if self.waiting >= self.max_waiting:
            raise TooBusy(f"{self.waiting} requests are waiting for room to be read in (--max-reading-bytes "
                          f"{self.max_reading_bytes}), this server's limit of waiting requests "
                          f"(--max-waiting {self.max_waiting}); retry after 1 s", 1)
        loop = asyncio.get_running_loop()
        room = self._room.ask(charge)
        self.waiting += 1
        taken: list[dict] = []
        # A client that leaves while waiting (its own timeout, then a retry) must not keep its place:
        # seen by taking its body, when that is small enough that holding it costs nothing more.
        watched = declared is not None and declared <= _WATCHED_BODY_BYTES
        gone = asyncio.ensure_future(until_gone(request, taken)) if watched else loop.create_future()
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
                raise ClientGone()
            raise TooBusy(f"{self.reading + self.preparing} requests are being read and tokenized, holding "
                          f"{self._room.held} of the {self.max_reading_bytes} bytes this server reads at once "
                          f"(--max-reading-bytes), and not enough was freed within "
                          f"{self.settings.preparing_wait_s:g} s (--max-preparing-wait-s); retry after 1 s", 1)
        self._admitted(request, charge)
        return taken

    def _admitted(self, request: Request, charge: int) -> None:
        request.state.charge = charge
        self.reading += 1

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

