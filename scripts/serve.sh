#!/usr/bin/env bash
# The production web server, as `make run` (Procfile `web:`) starts it: uvicorn with uvloop and
# Kurs's HTTP protocol (edge/serverprotocol.py: uvicorn's httptools protocol sending each answer
# in one write, a quarter more requests per second) serving config.asgi:application (HTTP, the
# /courses fast path, WebSocket, lifespan -> the NATS bridge). Chosen by measurement against
# granian (docs/decisions.md#the-web-server-uvicorn-with-kurss-http-protocol).
# Slow or oversized requests, for when no nginx stands in front (edge/serverprotocol.py): a
# request head must arrive within 10 s of its first byte (else 408), its body within 30 s more
# (else the connection is closed); more than 100 headers or a head over 64 KiB is answered 431.
# Idle keep-alive connections close after uvicorn's --timeout-keep-alive (5 s).
#   KURS_HOST (127.0.0.1), KURS_PORT (8000), KURS_WEB_WORKERS (2): one process per worker, each
#   with its own bridge and snapshot. --no-proxy-headers: uvicorn would otherwise trust
#   X-Forwarded-For from 127.0.0.1; who is a trusted proxy is KURS_NUM_PROXIES's call
#   (docs/settings.md).
# On SIGTERM or SIGINT uvicorn stops accepting, closes WebSockets with 1012 (service restart, so
# clients reconnect), waits up to 10 s for requests in flight, runs the lifespan shutdown (NATS
# drained) and exits.
# WebSockets: realtime/wsprotocol.py (uvicorn's websockets protocol, answering an oversized
# handshake with 431 instead of holding it, and invalid UTF-8 with 1007 and one log line instead
# of a traceback); a client message over 64 KiB closes the socket with 1009 (the 4 KiB limit of
# docs/events.md#limits-and-close-codes answers an error frame below that; uvicorn's default,
# 16 MiB, would be buffered per socket).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

exec uvicorn config.asgi:application \
  --host "${KURS_HOST:-127.0.0.1}" --port "${KURS_PORT:-8000}" \
  --workers "${KURS_WEB_WORKERS:-2}" --loop uvloop --http edge.serverprotocol:KursHttpProtocol \
  --lifespan on --no-access-log --no-proxy-headers --timeout-graceful-shutdown 10 \
  --ws realtime.wsprotocol:KursWebSocketProtocol --ws-max-size 65536
