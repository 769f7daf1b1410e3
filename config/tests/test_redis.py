"""With REDIS_URL set, the cache and the channel layer are Redis, over a real connection."""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit

import pytest

from tests.services import REDIS_URL, require, run_python

pytestmark = pytest.mark.redis

PROBE = """
import asyncio, os, sys
import django
django.setup()
from django.conf import settings
from django.core.cache import cache
from channels.layers import get_channel_layer

token = sys.argv[1]
assert settings.CACHES["default"]["BACKEND"].endswith("RedisCache"), settings.CACHES
cache.set("probe", token, 30)
assert cache.get("probe") == token

async def main():
    layer = get_channel_layer()
    assert type(layer).__name__ == "RedisChannelLayer", type(layer)
    channel = await layer.new_channel()
    await layer.group_add("probe", channel)
    await layer.group_send("probe", {"type": "probe.message", "token": token})
    message = await asyncio.wait_for(layer.receive(channel), 5)
    assert message["token"] == token
    await layer.group_discard("probe", channel)

asyncio.run(main())
print("redis-ok", token)
"""


def test_redis_url_switches_cache_and_channel_layer_to_redis() -> None:
    parts = urlsplit(REDIS_URL)
    require("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    token = uuid.uuid4().hex
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.test_settings",
        "REDIS_URL": REDIS_URL,
    }
    result = run_python(["-c", PROBE, token], environment)
    assert result.returncode == 0, result.stderr
    assert f"redis-ok {token}" in result.stdout


def test_without_redis_url_the_defaults_are_in_process(settings: pytest.FixtureRequest) -> None:
    if os.environ.get("REDIS_URL"):
        pytest.skip("this run sets REDIS_URL")
    from django.conf import settings as django_settings

    cache, layer = django_settings.CACHES["default"], django_settings.CHANNEL_LAYERS["default"]
    assert cache["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache"
    assert layer["BACKEND"] == "channels.layers.InMemoryChannelLayer"
