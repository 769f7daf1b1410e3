"""The one name Kurs reads from WhiteNoise below its documented surface.

`edge.staticfiles.AsyncWhiteNoiseMiddleware` serves static files with WhiteNoise's own
`__call__`, in a thread; every other request must go on in the event loop without that hop, so
the middleware must know which paths WhiteNoise may answer. WhiteNoise computes that prefix from
the settings it documents (`STATIC_URL`, `FORCE_SCRIPT_NAME`, `WHITENOISE_STATIC_PREFIX`) but
keeps the result in an undocumented attribute, read here rather than computed a second time.

`WRITTEN_AGAINST` is the WhiteNoise it was read from; `edge/tests/test_staticfiles.py` fails
when another version is installed or the attribute is gone. Upstream, WhiteNoise has no async
middleware (evansd/whitenoise#179, and the async rewrite in pull request #359 became the
separate ServeStatic project); an upgrade that adds one would make this module unnecessary.
"""

from __future__ import annotations

from django.conf import settings
from whitenoise.middleware import WhiteNoiseMiddleware

WRITTEN_AGAINST = "6.12.0"
UNDOCUMENTED: dict[type, tuple[str, ...]] = {WhiteNoiseMiddleware: ("static_prefix",)}


def served_prefix(middleware: WhiteNoiseMiddleware) -> str:
    """The path prefix under which `middleware` may answer a request with a file."""
    if getattr(settings, "WHITENOISE_ROOT", None):
        return "/"  # files served from the site's root: any path may be one
    return str(middleware.static_prefix)
