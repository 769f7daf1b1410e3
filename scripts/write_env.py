"""Write a local development `.env` on first run (docs/settings.md#env-on-first-run); an existing
`.env` is never touched.

`make run`, `make demo`, `make superuser` and `make apikey` call this, so that every
`manage.py` command in the README then works as typed in a plain shell: settings read `.env`.
Standard library only: it runs before (and without) the virtualenv.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

TEMPLATE = """\
# Written by `make run` on first run, for local development only: never use it in production
# (see .env.example for the production settings). Delete it to have a new one written.
DJANGO_DEBUG=true
DJANGO_SECRET_KEY={secret}
"""


def write_env(path: Path) -> bool:
    """Create `path` with a fresh secret; False (and no change) when it already exists."""
    try:
        # O_EXCL: even a `.env` created between a check and the write is left alone.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(TEMPLATE.format(secret=secrets.token_urlsafe(50)))
    return True


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else root / ".env"
    if write_env(path):
        print(f"Wrote {path} for local development (DJANGO_DEBUG=true, a generated secret key)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
