"""Repo-wide test set-up: a test configuration that never depends on a developer's `.env`."""

from __future__ import annotations

import os

# Set before Django reads its settings (pytest-django imports them after this file).
os.environ.setdefault("DJANGO_SECRET_KEY", "kurs-test-secret-key-not-for-production")
os.environ.setdefault("DJANGO_DEBUG", "false")
os.environ.setdefault("KURS_LOG_LEVEL", "WARNING")
