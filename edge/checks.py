"""`manage.py check --deploy`: the TLS checks Django runs only with its SecurityMiddleware.

Django checks SECURE_HSTS_SECONDS (security.W004) and SECURE_SSL_REDIRECT (security.W008) only
when SecurityMiddleware is in MIDDLEWARE; the edge (`edge.layer`) does that middleware's work
from the same settings, so it asks the same questions, under its own ids.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Tags, Warning, register

W004 = Warning(
    "You have not set a value for the SECURE_HSTS_SECONDS setting. If your entire site is served "
    "only over SSL, you may want to consider setting a value and enabling HTTP Strict Transport "
    "Security (KURS_TLS_PROXY). Be sure to read the documentation first; enabling HSTS "
    "carelessly can cause serious, irreversible problems.",
    id="edge.W004",
)
W008 = Warning(
    "Your SECURE_SSL_REDIRECT setting is not set to True. Unless your site should be available "
    "over both SSL and non-SSL connections, you may want to either set this setting True or "
    "configure a load balancer or reverse-proxy server to redirect all connections to HTTPS "
    "(KURS_TLS_PROXY).",
    id="edge.W008",
)


@register(Tags.security, deploy=True)
def check_tls(app_configs: Any, **kwargs: Any) -> list[Warning]:
    warnings = []
    if not settings.SECURE_HSTS_SECONDS:
        warnings.append(W004)
    if not settings.SECURE_SSL_REDIRECT:
        warnings.append(W008)
    return warnings
