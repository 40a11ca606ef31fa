"""Slow and idle connections (slowloris): a time limit on each request's head and caps on the connections
that wait for one, per client address and in total.

uvicorn (0.30 to at least 0.55) has no timeout for a request's head: a connection that sends half a
request line and then nothing is held forever, and since ``limit_concurrency`` counts connections, a few
hundred of them make every request, /health included, answer 503. ``guarded_protocol`` wraps uvicorn's
HTTP protocol class so that a connection *waiting* for a request (just opened, or idle between requests
on keep-alive) is closed when

- its request head has not arrived ``head_timeout`` seconds after it began to wait, or
- it is the oldest waiting connection of a client with more than ``per_client`` waiting, or the oldest
  of all when more than ``waiting`` wait in total (among those that have waited over a second: a burst
  of new connections from one client is not cut), or
- the server is at ``concurrency`` connections when another connection's request head arrives: the
  longest-waiting connection makes room for it, so /health and real requests still get through while a
  flood lasts, instead of uvicorn's 503.

Connections whose request is being answered are never touched here (a body that stops arriving is timed
out by the application: ``app.BodyLimit``); requests beyond ``limit_concurrency`` get uvicorn's 503.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout: float = 10.0  # seconds for a whole request head (request line and headers)
    body_timeout: float = 30.0  # seconds the server waits for each next piece of a request body
    waiting: int = 128  # connections waiting for a request head, all clients together
    per_client: int = 16  # connections waiting for a request head from one client address
    concurrency: int = 512  # uvicorn's limit_concurrency: connections and requests at once (then 503)


class ConnectionGuard:
    """The waiting connections of one server, oldest first, with their head timers and start times."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        # protocol -> (its head timer, when it began to wait); insertion order is age
        self.waiting: dict[Any, tuple[asyncio.TimerHandle, float]] = {}
        self.per_client: Counter[str] = Counter()
        self.grace = min(1.0, limits.head_timeout / 2)  # a burst of new connections is not evicted
        self.closed_for_time = 0
        self.evicted = 0

    def wait(self, protocol: Any) -> None:
        """``protocol`` waits for a request head from now on."""
        if protocol in self.waiting or protocol.transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.limits.head_timeout, self._time_out, protocol)
        self.waiting[protocol] = (timer, loop.time())
        client = _client(protocol)
        self.per_client[client] += 1
        now = loop.time()
        while self.per_client[client] > self.limits.per_client:
            if not self._evict_oldest(now, lambda p: _client(p) == client):
                break
        while len(self.waiting) > self.limits.waiting:
            if not self._evict_oldest(now, lambda p: True):
                break

    def make_room(self, protocol: Any) -> None:
        """Before ``protocol``'s request head is handled: if the server is at ``concurrency`` (where
        uvicorn answers 503), close the connections that have waited longest to make room for it."""
        connections = protocol.connections
        while len(connections) >= self.limits.concurrency:
            oldest = next((p for p in self.waiting if p is not protocol), None)
            if oldest is None:
                return
            self._evict(oldest)
            connections.discard(oldest)  # now, not when the loop reports it closed

    def busy(self, protocol: Any) -> None:
        """``protocol``'s request head has arrived (or it closed): it no longer waits."""
        entry = self.waiting.pop(protocol, None)
        if entry is None:
            return
        entry[0].cancel()
        client = _client(protocol)
        self.per_client[client] -= 1
        if not self.per_client[client]:
            del self.per_client[client]

    def _evict_oldest(self, now: float, which: Any) -> bool:
        """Close the oldest waiting connection that ``which`` selects if it has waited past the grace."""
        for protocol, (_, since) in self.waiting.items():
            if which(protocol):
                if now - since < self.grace:
                    return False
                self._evict(protocol)
                return True
        return False

    def _time_out(self, protocol: Any) -> None:
        if protocol in self.waiting:
            self.closed_for_time += 1
            self._close(protocol)

    def _evict(self, protocol: Any) -> None:
        self.evicted += 1
        self._close(protocol)

    def _close(self, protocol: Any) -> None:
        self.busy(protocol)
        protocol.transport.close()

    def stats(self) -> dict[str, int]:
        return {"waiting": len(self.waiting), "timed_out": self.closed_for_time, "evicted": self.evicted}


def _client(protocol: Any) -> str:
    client = getattr(protocol, "client", None)
    return client[0] if client else ""


def _request_in_flight(protocol: Any) -> bool:
    cycle = getattr(protocol, "cycle", None)
    return cycle is not None and not cycle.response_complete


def guarded_protocol(guard: ConnectionGuard) -> type:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with ``guard`` watching it."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            guard.wait(self)

        def data_received(self, data: bytes) -> None:
            if self in guard.waiting:
                guard.make_room(self)
            super().data_received(data)
            if _request_in_flight(self):  # the head arrived and parsed: a request is being answered
                guard.busy(self)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not _request_in_flight(self):  # else a pipelined request started at once
                guard.wait(self)

        def connection_lost(self, exc: Exception | None) -> None:
            guard.busy(self)
            super().connection_lost(exc)

    return GuardedHTTPProtocol
