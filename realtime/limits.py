"""Per-client caps of the streaming endpoints, `/ws/items` and `GET /api/v1/stream`.

A *client* is an address, found as every rate limit of the API finds it (ninja's `get_ident`
under KURS_NUM_PROXIES, through `edge.clients`), so a proxy's clients are told
apart by their X-Forwarded-For entry, and a client cannot pick another address by sending one.

Two caps, counted in this worker process (each uvicorn worker counts its own clients: a client
may hold the cap once per worker):
- open connections, WebSocket and SSE together: KURS_MAX_CONNECTIONS_PER_CLIENT;
- replays running at once (resumes with `since` / `Last-Event-ID` still reading the stream):
  KURS_MAX_REPLAYS_PER_CLIENT. A replay's cost grows with the events it reads; a resume more than
  KURS_MAX_REPLAY_EVENTS behind gets a `gap` and a fresh snapshot instead (`replay_bound`).

A connection without an address (a Unix socket without a proxy, an in-process test client) is
not counted: putting every such client in one bucket would make the per-client cap a global one.

A slot is a `Lease`: released once, by whichever comes first of the connection's own clean-up and
the garbage collection of what it is bound to (a response body Django never started, a consumer
whose disconnect never ran), so no path leaks a slot for the life of the process.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from edge.clients import client_of_request as address_of_request
from edge.clients import client_of_scope as address_of_scope

logger = logging.getLogger(__name__)

# What Retry-After advises: a replay is over in a moment; a connection slot frees only when one
# of the client's own connections ends, which the client knows better than the server.
REPLAY_RETRY_AFTER_S = 1
CONNECTION_RETRY_AFTER_S = 10


def client_of_request(request: HttpRequest) -> str | None:
    """The client's address as every per-client limit sees it (edge.clients); None when there
    is none (such connections are not counted)."""
    return address_of_request(request) or None


def client_of_scope(scope: Mapping[str, Any]) -> str | None:
    """The same for a WebSocket handshake."""
    return address_of_scope(scope) or None


class Lease:
    """One slot of one client in one counter; `release()` is idempotent and thread-safe.

    A client without an address gets a lease of nothing (`caps` None): not counted."""

    __slots__ = ("__weakref__", "_caps", "_client", "_counter")

    def __init__(self, caps: ClientCaps | None, counter: Counter[str], client: str) -> None:
        self._caps = caps
        self._counter = counter
        self._client = client

    def bind(self, owner: object) -> Lease:
        """Release when `owner` is collected, if nothing released it before."""
        if self._caps is not None:
            weakref.finalize(owner, self.release)
        return self

    def release(self) -> None:
        caps, self._caps = self._caps, None
        if caps is not None:
            caps.give_back(self._counter, self._client)


class ClientCaps:
    """Connections and replays per client in this process."""

    def __init__(self) -> None:
        self.connections: Counter[str] = Counter()
        self.replays: Counter[str] = Counter()
        # A finaliser may run in any thread that triggers a collection (asgiref's sync thread).
        self._lock = threading.RLock()

    def connection(self, client: str | None) -> Lease | None:
        """A connection slot for `client`; None when it holds all it may."""
        return self._take(self.connections, client, settings.KURS_MAX_CONNECTIONS_PER_CLIENT)

    def replay(self, client: str | None) -> Lease | None:
        """A slot for a replay running now; None when the client runs all it may."""
        return self._take(self.replays, client, settings.KURS_MAX_REPLAYS_PER_CLIENT)

    def _take(self, counter: Counter[str], client: str | None, limit: int) -> Lease | None:
        if client is None:
            return Lease(None, counter, "")
        with self._lock:
            if counter[client] >= limit:
                return None
            counter[client] += 1
        return Lease(self, counter, client)

    def give_back(self, counter: Counter[str], client: str) -> None:
        with self._lock:
            counter[client] -= 1
            if counter[client] <= 0:
                del counter[client]


def replay_bound(since: int, last_seq: int | None) -> int | None:
    """None when a resume after `since` may replay; else the `first_available` of the gap it gets
    instead: the oldest sequence this server replays from now (KURS_MAX_REPLAY_EVENTS back from
    `last_seq`, the newest event this process has handed on). Unknown `last_seq` (no stream
    read yet): the replay itself finds out what the stream holds."""
    limit = settings.KURS_MAX_REPLAY_EVENTS
    if last_seq is None or last_seq - since <= limit:
        return None
    return last_seq - limit + 1


def too_many_connections(client: str | None) -> str:
    limit = settings.KURS_MAX_CONNECTIONS_PER_CLIENT
    logger.info("realtime: refused a connection of %s (%d open, the limit)", client, limit)
    return f"too many connections from this address (at most {limit} per server process)"


def too_many_replays(client: str | None) -> str:
    limit = settings.KURS_MAX_REPLAYS_PER_CLIENT
    logger.info("realtime: refused a resume of %s (%d replays running, the limit)", client, limit)
    return f"too many resumes at once from this address (at most {limit} per server process)"


caps = ClientCaps()
