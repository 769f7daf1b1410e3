"""Exit 0 when host:port accepts a TCP connection, 1 otherwise (used by the Makefile)."""

from __future__ import annotations

import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return 0
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
