"""`Cache-Control` of the API's answers: what a browser or a proxy may keep, and how long.

One table, applied by `edge.layer` to every answer under `/api/` and to `/metrics` that has no
`Cache-Control` of its own (only the event stream sets its own), whichever entrance answered:

- errors and writes: `no-store`. A 404 or a 429 must not outlive its cause in a cache, and a
  write's answer (and `POST /convert`, `POST /tasks/run`) is the answer to that one request;
- probes (`/health`, `/metrics`): `no-store`, a cached "ok" would hide an outage;
- the answers a cache in front serves (`/courses`, with its ETag; `latest`; any pair):
  `max-age=1, stale-while-revalidate=2, stale-if-error=30` (`IN_FRONT`): a cache (the compose
  nginx, a CDN) keeps a copy a second, then serves it at most 2 s more while it asks again in the
  background, so a burst of clients costs one request a second, and keeps it 30 s when the web
  processes fail (an error or no answer): old courses rather than none
  (docs/operations.md#caches-in-front);
- the other live reads (an item with its latest rate, `convert`, the item list, providers):
  `no-cache`: a cache may keep them but must ask again before each use, since they change with
  every quote;
- history and candles: `max-age=1`, as `/courses`: rows are appended every second at most, and a
  second's delay is what a dashboard polling them accepts anyway;
- the OpenAPI document and the docs page: `max-age=60`; they change only with a deployment;
- a GET about a past instant (`?at=`, docs/api.md#point-in-time) sets its own, by
  `point_in_time`: immutable once a later version closed the one it shows, else `no-cache`
  (the version still being served gets its `valid_until` later); both with a strong ETag.
"""

from __future__ import annotations

NO_STORE = "no-store"
NO_CACHE = "no-cache"
# A year, the longest `max-age` caches honour (RFC 9111 5.2.2.1: "never expires").
IMMUTABLE = "public, max-age=31536000, immutable"
IN_FRONT = "max-age=1, stale-while-revalidate=2, stale-if-error=30"

# (route prefix relative to /api/v1/, the policy of its successful GET answers)
_READ_POLICIES: tuple[tuple[str, str], ...] = (
    ("health", NO_STORE),
    ("openapi.json", "max-age=60"),
    ("docs", "max-age=60"),
)
_HISTORY_SUFFIXES = ("/rates", "/candles")
_API_PREFIX = "/api/v1/"
_COURSES = "/api/v1/courses"
_LATEST = "/rates/latest"
_PAIRS = "rates/"


def cache_control(method: str, path: str, status: int) -> str | None:
    """The `Cache-Control` value of an answer to `method path` with `status`; None: not ours."""
    if path != "/metrics" and not path.startswith("/api/"):
        return None
    if status >= 400 or method not in ("GET", "HEAD"):
        return NO_STORE
    if path == _COURSES:
        return IN_FRONT
    if path == "/metrics":
        return NO_STORE
    route = path.removeprefix(_API_PREFIX)
    for prefix, policy in _READ_POLICIES:
        if route == prefix or route.startswith(prefix + "/"):
            return policy
    if route.startswith(_PAIRS) or (route.startswith("items/") and route.endswith(_LATEST)):
        return IN_FRONT
    if route.startswith("items/") and route.endswith(_HISTORY_SUFFIXES):
        return "max-age=1"
    return NO_CACHE


def point_in_time(*, closed: bool) -> str:
    """The `Cache-Control` of a GET answer about a past instant; `closed`: its version has a
    successor, so the answer can never change."""
    return IMMUTABLE if closed else NO_CACHE
