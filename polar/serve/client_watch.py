"""The watch on a client that leaves: a request whose client has closed its connection is not
queued, leaves the queue, or is skipped as the batcher forms its round."""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING, Optional

from polar.serve.metrics import Metrics

if TYPE_CHECKING:  # annotations only (imported at polar serve's argument parsing: polar.serve.admission)
    from starlette.requests import Request


class Departure:
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
        await until_gone(request)
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


async def until_gone(request: Request, taken: Optional[list] = None) -> None:
    """Returns when the client closes the connection; the body's messages received meanwhile are
    appended to `taken`. Once the body has been read, the next message is http.disconnect."""
    while (message := await request.receive())["type"] != "http.disconnect":
        if taken is not None:
            taken.append(message)


class ClientGone(Exception):
    pass
