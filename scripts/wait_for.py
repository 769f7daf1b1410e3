"""Wait until every `host:port` in KURS_WAIT_FOR (comma-separated) accepts TCP connections.

The Procfile's fetcher runs this first: under `make demo` (scripts/start.sh sets KURS_WAIT_FOR to
the emulator) its first cycle would otherwise run before the emulator listens, and that
"cannot reach" error would stay on the dashboard. Unset or empty: returns at once. Exit 1 when
a port is still closed after KURS_WAIT_TIMEOUT seconds (default 30), so the failure is visible.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def _open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def main() -> int:
    targets = [part.strip() for part in os.environ.get("KURS_WAIT_FOR", "").split(",")]
    timeout = float(os.environ.get("KURS_WAIT_TIMEOUT") or 30)
    deadline = time.monotonic() + timeout
    for target in filter(None, targets):
        host, _, port = target.rpartition(":")
        if not _open(host or "127.0.0.1", int(port)):
            print(f"wait_for: waiting for {target} to listen", flush=True)
        while not _open(host or "127.0.0.1", int(port)):
            if time.monotonic() > deadline:
                print(f"wait_for: nothing listens on {target} after {timeout:g}s", file=sys.stderr)
                return 1
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
