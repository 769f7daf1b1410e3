"""Settings for the test suite: the real settings module, with test defaults for the env.

pytest-django imports settings before any conftest runs, so the defaults are set here. A value
already in the environment (e.g. DATABASE_URL for the PostgreSQL run) wins.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("DJANGO_SECRET_KEY", "kurs-test-secret-key-not-for-production")
os.environ.setdefault("DJANGO_DEBUG", "false")
os.environ.setdefault("KURS_LOG_LEVEL", "WARNING")
# Events of a test run stay off the real `kurs.>` subjects (and the KURS stream) of the machine's
# NATS, and parallel runs do not hear each other.
os.environ.setdefault("KURS_NATS_PREFIX", f"kurstest{os.getpid()}")

from config.settings import *  # noqa: F403
from config.settings import CACHES, DATABASES

# Tests never run collectstatic: serve static files from the apps, warn about no missing folder.
STATIC_ROOT = None
WHITENOISE_USE_FINDERS = True

# Tests share state within one process; a file cache would leak between runs.
CACHES["shared"] = {
    "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
    "LOCATION": "shared",
}

# SQLite: the test database is a file like the one Kurs runs on, not Django's default in-memory
# database. That one shares its cache between connections, and there a write meeting another
# connection's lock (the NATS thread marking outbox rows delivered) fails at once with "database
# table is locked" (SQLITE_LOCKED ignores the busy timeout); on a file in WAL mode readers never
# block and a writer waits its turn (docs/events.md#no-lost-event). One file per run (its pid).
_default = DATABASES["default"]
if _default["ENGINE"] == "django.db.backends.sqlite3" and not _default.get("TEST", {}).get("NAME"):
    _default["TEST"] = {
        "NAME": os.path.join(tempfile.gettempdir(), f"kurs-test-{os.getpid()}.sqlite3")
    }
