"""`Content-Security-Policy` for the HTML pages Kurs serves itself: the dashboard and the admin.

The policy allows only this origin's scripts, styles, images and connections (the dashboard's
WebSocket and fetches are same-origin; CSP 3 lets `'self'` cover `ws:`/`wss:` to the same host),
no inline script or style, no plugins, and no framing. Both pages comply: the dashboard's script,
styles and icon are static files, and Django's admin (5.x) has no inline script. An injected
`<script>` in a pair's name could therefore not run, even if escaping ever failed.

Only those pages: the API answers JSON (a policy means nothing there), and the interactive API
docs (`/api/v1/docs`) load Swagger UI in a way this policy would refuse. A response that
already has a policy keeps it.
"""

from __future__ import annotations

HEADER = "Content-Security-Policy"
POLICY = "; ".join(
    (
        "default-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
# The dashboard and the admin (config/urls.py).
PAGES = ("/",)
PREFIXES = ("/admin/",)


def covered(path: str) -> bool:
    """Whether the answer to `path` gets the policy (`edge.layer` adds it)."""
    return path in PAGES or path.startswith(PREFIXES)
