#!/bin/sh
# The image's entrypoint (Dockerfile): two things a container needs before its command runs.
# 1. docker-compose.yml falls back to published local defaults when no .env gives the secrets:
#    fine to try Kurs out, never for production; say so in every Kurs container's log.
# 2. Prometheus scrapes each web replica by its container address (Host: 172.x.y.z:8000), which
#    Django's host check would refuse: this container's own addresses are allowed hosts too.
set -eu
case "${DJANGO_SECRET_KEY:-}|${DATABASE_URL:-}" in
  django-insecure-*|*:kurs-local-default@*)
    echo "kurs: WARNING: running on docker-compose.yml's local defaults (no .env with" \
      "DJANGO_SECRET_KEY, POSTGRES_PASSWORD, GRAFANA_ADMIN_PASSWORD): not for production." \
      "See .env.example." >&2
    ;;
esac
own=$(python -c "import socket; print(','.join(sorted({a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)})))" 2>/dev/null || true)
if [ -n "$own" ]; then
  export DJANGO_ALLOWED_HOSTS="${DJANGO_ALLOWED_HOSTS:-localhost,127.0.0.1},$own"
fi
exec "$@"
