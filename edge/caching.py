"""`Cache-Control` of the API's answers: what a browser or a proxy may keep, and how long.

One table, applied by `edge.layer` to every answer under `/api/` and to `/metrics` that has no
`Cache-Control` of its own. `/courses` sets its own on its answers (`max-age=1` with its ETag,
`rates.courses`), and so does the event stream:

- errors and writes: `no-store`. A 404 or a 429 must not outlive its cause in a cache, and a
  write's answer (and `POST /convert`, `POST /tasks/run`) is the answer to that one request;
- probes (`/health`, `/metrics`): `no-store`, a cached "ok" would hide an outage;
- the live reads (an item with its latest rate, `latest`, any pair, `convert`, the item list,
  providers): `no-cache`: a cache may keep them but must ask again before each use, since they
  change with every quote;
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

# (route prefix relative to /api/v1/, the policy of its successful GET answers)
_READ_POLICIES: tuple[tuple[str, str], ...] = (
    ("health", NO_STORE),
    ("openapi.json", "max-age=60"),
    ("docs", "max-age=60"),
)
_HISTORY_SUFFIXES = ("/rates", "/candles")
_API_PREFIX = "/api/v1/"
_COURSES = "/api/v1/courses"


def cache_control(method: str, path: str, status: int) -> str | None:
    """The `Cache-Control` value of an answer to `method path` with `status`; None: not ours."""
    if path != "/metrics" and not path.startswith("/api/"):
        return None
    if status >= 400 or method not in ("GET", "HEAD"):
        return NO_STORE
    if path == _COURSES:
        return None  # its own: `max-age=1` with its ETag
    if path == "/metrics":
        return NO_STORE
    route = path.removeprefix(_API_PREFIX)
    for prefix, policy in _READ_POLICIES:
        if route == prefix or route.startswith(prefix + "/"):
            return policy
    if route.startswith("items/") and route.endswith(_HISTORY_SUFFIXES):
        return "max-age=1"
    return NO_CACHE


def point_in_time(*, closed: bool) -> str:
    """The `Cache-Control` of a GET answer about a past instant; `closed`: its version has a
    successor, so the answer can never change."""
    return IMMUTABLE if closed else NO_CACHE
