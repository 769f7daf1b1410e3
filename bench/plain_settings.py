"""Settings of the web server under `bench/bench_courses.py`: the project's, plus a baseline route.

`bench.plain_urls` adds `/bench/plain/item`, a plain django-ninja endpoint returning fixed bytes,
so that item detail is measured against Django+ninja's floor on the same server and settings.
"""

from __future__ import annotations

from config.settings import *  # noqa: F403

ROOT_URLCONF = "bench.plain_urls"
