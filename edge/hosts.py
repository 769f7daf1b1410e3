"""Which `Host` headers the service answers: Django's ALLOWED_HOSTS rules, owned here.

Django checks the host only when a view asks for it (`HttpRequest.get_host`), and through
helpers it does not document; the edge checks every request once, before either entrance, with
the documented rules (https://docs.djangoproject.com/en/5.2/ref/settings/#allowed-hosts):

- the header is a domain name or a bracketed IPv6 address, with an optional port; matching is
  case-insensitive and ignores the port and one trailing dot (`example.com.`);
- `*` matches any host; `.example.com` matches `example.com` and every subdomain of it; any other
  entry matches exactly;
- with DEBUG on and ALLOWED_HOSTS empty: `.localhost`, `127.0.0.1` and `[::1]`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# As RFC 3986's reg-name for DNS names and IP-literal for IPv6, lower case, optional port.
_HOST = re.compile(r"([a-z0-9.-]+|\[[a-f0-9]*:[a-f0-9.:]+\])(?::[0-9]+)?")
DEBUG_HOSTS = (".localhost", "127.0.0.1", "[::1]")
MAX_KNOWN = 64


def domain_of(host: str) -> str | None:
    """The host's domain (lower case, no port, no trailing dot), None when malformed."""
    host = host.lower()
    match = _HOST.fullmatch(host)
    if match is None:
        return None
    domain = match[1]
    return domain[:-1] if domain.endswith(".") else domain


def matches(domain: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern == "*" or pattern == domain:
            return True
        if pattern.startswith(".") and (domain.endswith(pattern) or domain == pattern[1:]):
            return True
    return False


class AllowedHosts:
    """ALLOWED_HOSTS as read at start-up; the hosts seen and admitted are remembered."""

    def __init__(self, patterns: Sequence[str], *, debug: bool) -> None:
        self.patterns = tuple(patterns) or (DEBUG_HOSTS if debug else ())
        self._known: set[bytes] = set()

    def admits(self, host: bytes) -> bool:
        if host in self._known:
            return True
        domain = domain_of(host.decode("latin-1"))
        if not domain or not matches(domain, self.patterns):
            return False
        if len(self._known) < MAX_KNOWN:
            self._known.add(host)
        return True
