"""`manage.py check --deploy`: the checks Django runs only with its own security middleware.

Django asks about HSTS (security.W004, W005, W021), nosniff (W006), the TLS redirect (W008),
the Referrer-Policy (W022) and X-Frame-Options (W019) only when SecurityMiddleware and
XFrameOptionsMiddleware are in MIDDLEWARE (else it says W001/W002, silenced in the settings).
The edge (`edge.layer`) does those middlewares' work from the same settings, for every answer,
so it asks the same questions with Django's own words, under `edge.` ids. Behind a TLS proxy
(`KURS_TLS_PROXY`) exactly edge.W005 and edge.W021 remain until an operator opts in to HSTS for
every subdomain and to the preload list (docs/operations.md#deploy-checks).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Tags, Warning, register
from django.core.checks.security import base


def _as_edge(warning: CheckMessage) -> Warning:
    code = (warning.id or "").rsplit(".", 1)[-1]
    return Warning(warning.msg, hint=warning.hint, id=f"edge.{code}")


W004, W005, W006, W008, W019, W021, W022 = (
    _as_edge(w)
    for w in (base.W004, base.W005, base.W006, base.W008, base.W019, base.W021, base.W022)
)


@register(Tags.security, deploy=True)
def check_edge_security(app_configs: Any, **kwargs: Any) -> list[Warning]:
    warnings = []
    if not settings.SECURE_HSTS_SECONDS:
        warnings.append(W004)
    else:
        if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS is not True:
            warnings.append(W005)
        if settings.SECURE_HSTS_PRELOAD is not True:
            warnings.append(W021)
    if settings.SECURE_CONTENT_TYPE_NOSNIFF is not True:
        warnings.append(W006)
    if settings.SECURE_SSL_REDIRECT is not True:
        warnings.append(W008)
    if not settings.SECURE_REFERRER_POLICY:
        warnings.append(W022)
    if settings.X_FRAME_OPTIONS != "DENY":
        warnings.append(W019)
    return warnings
