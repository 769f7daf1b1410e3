#!/usr/bin/env bash
# Start Kurs's processes from the Procfile under honcho (one Ctrl-C stops all) and print the URLs.
# Arguments: extra Procfile processes (`emulator` for `make demo`).
set -euo pipefail
cd "$(dirname "$0")/.."

host=${KURS_HOST:-127.0.0.1}
port=${KURS_PORT:-8000}
processes="web qcluster fetcher $*"

mkdir -p var/nats
# `make demo`: the fetcher's first cycle waits for the emulator to listen (scripts/wait_for.py).
if [[ " $* " == *" emulator "* ]]; then
  export KURS_WAIT_FOR="127.0.0.1:${KURS_EMULATOR_PORT:-8900}"
fi
# One /metrics for all processes: each writes its own files here, the web process sums them.
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$PWD/var/prometheus}"
rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
# The embedded NATS only when nothing else provides one (docs/operations.md).
if [ -z "${NATS_URL:-}" ] && ! .venv/bin/python scripts/port_open.py 127.0.0.1 4222; then
  processes="$processes nats"
  echo "NATS:       embedded nats-server with JetStream on nats://127.0.0.1:4222"
else
  echo "NATS:       using ${NATS_URL:-nats://127.0.0.1:4222}"
fi
echo "Web:        uvicorn (uvloop, httptools), ${KURS_WEB_WORKERS:-2} workers: scripts/serve.sh"
echo "Dashboard:  http://$host:$port/"
echo "API docs:   http://$host:$port/api/v1/docs"
echo "Health:     http://$host:$port/api/v1/health"
echo "Admin:      http://$host:$port/admin/   (create a user: make superuser)"
echo "WebSocket:  ws://$host:$port/ws/items"
echo "Starting:   $processes   (Ctrl-C stops all)"
# shellcheck disable=SC2086 # the process names are words
exec .venv/bin/honcho start -f Procfile $processes
