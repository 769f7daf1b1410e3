"""Kurs's HTTP edge: what every request meets before and around the views.

One ASGI layer (`edge.layer.EdgeLayer`) wraps both entrances: the route table of the hot reads
(`edge.routes`, answered from memory by the same handlers the ninja routes call) and Django. Each
concern lives in one place:

- request id and the access log: `edge.accesslog`;
- host validation (ALLOWED_HOSTS): `edge.hosts`;
- TLS redirect, HSTS, the security headers, CSP, Cache-Control, the `/api/` rules (empty query
  values are absent, JSON errors), HEAD as GET: `edge.layer` (CSP's policy in `edge.csp`, the
  Cache-Control table in `edge.caching`);
- request metrics and `/metrics`: `edge.metrics`;
- the read throttle (per worker process) and API keys: `edge.security`;
- exception -> status: `edge.errors` (a read whose database connection ended is tried once more,
  by `edge.layer` for Django and `edge.routes.answer` for the route table, then answered 503);
  the bytes of an answer: `edge.answer`;
- prometheus_client's private names: `edge.promclient` (pinned to the version it was written
  against by a test); the TLS deploy checks Django runs only with its SecurityMiddleware:
  `edge.checks`;
- the operations probes: `/api/v1/health` (`edge.health`), a router of the API that checks every
  component of the deployment (no app owns it), beside `/metrics`.
"""
