"""Kurs settings: one module, every value from the environment (and `.env` when present).

A bad value raises :class:`config.env.ConfigError` with one line naming the setting; the entry
points (`manage.py`, `config/asgi.py`) print it and exit non-zero.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any

import dj_database_url
from dotenv import load_dotenv

from config import env
from config.env import ConfigError

BASE_DIR = Path(__file__).resolve().parent.parent

# The process environment wins over `.env`, so that `make` targets and CI can override it.
load_dotenv(BASE_DIR / ".env", override=False)

DEBUG = env.boolean("DJANGO_DEBUG", False)

_secret = env.raw("DJANGO_SECRET_KEY")
if _secret:
    SECRET_KEY = _secret
elif DEBUG:
    # A fresh key per process: sessions do not survive a restart, which is fine for development.
    SECRET_KEY = secrets.token_urlsafe(50)
else:
    raise ConfigError("DJANGO_SECRET_KEY: required when DJANGO_DEBUG is false")

ALLOWED_HOSTS = env.csv("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = env.csv("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",
    "config.apps.KursAdminConfig",  # django.contrib.admin, its sign-in throttled
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "ninja",
    "edge",
    "items",
    "rates",
    "realtime",
    # Listed after rates, so that rates' `qcluster` (django-q2's plus the metrics port) is the
    # command run: of two apps with a command of the same name, the earlier one wins.
    "django_q",
]

# Request id, access log, host validation, TLS redirect and HSTS, the security headers, CSP,
# Cache-Control, request metrics and the read throttle are the edge's (`edge/layer.py`, an ASGI
# layer around Django and the fast route table): what is left here is what pages need.
MIDDLEWARE = [
    "edge.staticfiles.AsyncWhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # A view whose database connection ended: 503 JSON, read again once by the edge (a GET).
    "edge.errors.DatabaseFailureMiddleware",
]
# security.W001/W002 say SecurityMiddleware and XFrameOptionsMiddleware are missing from
# MIDDLEWARE: the edge sends what they would (edge/layer.py, tested in edge/tests/test_layer.py),
# from the same settings, for every answer including those Django never sees; the checks those
# warnings stand for are the edge's (edge/checks.py).
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W002"]

# Admin messages live in the (database) session, not in a cookie: the default cookie storage
# signs but does not encrypt, and the message that shows a new API key carries the raw key.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
_database_url = env.string("DATABASE_URL", "sqlite:///db.sqlite3")
if not re.match(r"^(sqlite|postgres|postgresql|pgsql)://", _database_url):
    raise ConfigError(f"DATABASE_URL: expected sqlite:// or postgres:// URL, got {_database_url!r}")
try:
    _database = dj_database_url.parse(_database_url, conn_max_age=0)
except Exception as exc:  # dj-database-url raises several types for malformed URLs
    raise ConfigError(f"DATABASE_URL: cannot parse {_database_url!r}: {exc}") from None
if _database["ENGINE"] == "django.db.backends.sqlite3":
    _name = str(_database["NAME"])
    if _name not in ("", ":memory:") and not os.path.isabs(_name):
        _database["NAME"] = str(BASE_DIR / _name)
    # Several processes (web, fetcher, qcluster) share the file: wait for locks instead of failing.
    # WAL with synchronous=NORMAL: a commit costs no fsync (with the rollback journal it was 1.1-
    # 1.5 ms of the fetcher's 2.5 ms write per quote, the largest share of tick -> socket), readers
    # never block the writer, and a power cut may lose the last commits but never corrupts the
    # file (the rollback journal with NORMAL could). A WAL reader's snapshot lasts one statement in
    # Django's autocommit, so a connection kept between requests sees every commit
    # (config/tests/test_sqlite_journal.py); nothing here reads inside a long transaction.
    _database["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
# Parallel test runs (several developers on one machine) each name their own test database.
_test_db_name = env.raw("KURS_TEST_DB_NAME")
if _test_db_name:
    _database["TEST"] = {"NAME": _test_db_name}
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache and channel layer ---------------------------------------------------------
REDIS_URL = env.raw("REDIS_URL") or None
if REDIS_URL:
    REDIS_URL = env.url("REDIS_URL", "", {"redis", "rediss", "unix"})
    _redis_cache = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "kurs",
    }
    CACHES = {"default": _redis_cache, "shared": _redis_cache}
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": "kurs"},
        }
    }
else:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        # State that every local process must see (the fetcher's provider status read by the
        # web process): files beside the project, since the default cache is per process.
        "shared": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": env.string("KURS_SHARED_CACHE_DIR", str(BASE_DIR / "var" / "cache")),
        },
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- django-q2 ------------------------------------------------------------------------------
Q_CLUSTER: dict[str, Any] = {
    "name": "kurs",
    "workers": 2,
    # Must stay below retry (docs/decisions.md#django-q2-timeout-below-retry-no-catch-up).
    "timeout": 50,
    "retry": 120,
    "max_attempts": 1,
    "catch_up": False,
    "save_limit": 250,
    "label": "Tasks",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

# --- NATS -----------------------------------------------------------------------------------
NATS_SERVERS = env.url_list("NATS_URL", "nats://127.0.0.1:4222", {"nats", "tls", "ws", "wss"})
KURS_NATS_PREFIX = env.string("KURS_NATS_PREFIX", "kurs")
if not re.match(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", KURS_NATS_PREFIX):
    raise ConfigError(f"KURS_NATS_PREFIX: expected NATS subject tokens, got {KURS_NATS_PREFIX!r}")
# Copies of the JetStream stream: 1 on a single server, 3 in a three-node cluster (an odd number
# up to 5, as JetStream allows); reconciled at start-up (docs/events.md#the-stream).
KURS_NATS_REPLICAS = env.positive_int("KURS_NATS_REPLICAS", 1)
if KURS_NATS_REPLICAS > 5:
    raise ConfigError(
        f"KURS_NATS_REPLICAS: at most 5 (JetStream's limit), got {KURS_NATS_REPLICAS}"
    )
# Live state split by pair across this many owner leases, one per shard
# (docs/architecture.md#sharded-ownership); 1: one owner of every pair, as before shards.
KURS_OWNER_SHARDS = env.positive_int("KURS_OWNER_SHARDS", 1)
if KURS_OWNER_SHARDS > 64:
    raise ConfigError(f"KURS_OWNER_SHARDS: at most 64, got {KURS_OWNER_SHARDS}")
# Names this process in the `Kurs-Origin` header, so that it can recognise its own messages.
KURS_INSTANCE = env.raw("KURS_INSTANCE") or f"{socket.gethostname()}-{os.getpid()}"

# --- Providers ------------------------------------------------------------------------------
KURS_KNOWN_PROVIDERS = ("binance", "bybit", "coingecko", "cbr")
KURS_PROVIDERS = env.csv("KURS_PROVIDERS", "binance,bybit,coingecko,cbr")
for _provider in KURS_PROVIDERS:
    if _provider not in KURS_KNOWN_PROVIDERS:
        _known = ", ".join(KURS_KNOWN_PROVIDERS)
        raise ConfigError(f"KURS_PROVIDERS: unknown provider {_provider!r} (known: {_known})")
if not KURS_PROVIDERS:
    raise ConfigError("KURS_PROVIDERS: name at least one provider")
if len(set(KURS_PROVIDERS)) != len(KURS_PROVIDERS):
    raise ConfigError("KURS_PROVIDERS: a provider is named twice")

_DEFAULT_URLS = {
    "binance": ("https://api.binance.com", "wss://stream.binance.com:9443"),
    "bybit": ("https://api.bybit.com", "wss://stream.bybit.com"),
    "coingecko": ("https://api.coingecko.com", None),
    "cbr": ("https://www.cbr-xml-daily.ru", None),
}
KURS_PROVIDER_URLS: dict[str, dict[str, str | None]] = {}
for _name, (_rest, _ws) in _DEFAULT_URLS.items():
    _key = _name.upper()
    KURS_PROVIDER_URLS[_name] = {
        "rest": env.url(f"KURS_{_key}_REST_URL", _rest, {"http", "https"}),
        "ws": env.url(f"KURS_{_key}_WS_URL", _ws, {"ws", "wss"}) if _ws else None,
    }

KURS_COINGECKO_API_KEY = env.raw("KURS_COINGECKO_API_KEY") or None
KURS_POLL_INTERVAL = env.positive_float("KURS_POLL_INTERVAL", 5.0)
KURS_USD_PROXY = env.string("KURS_USD_PROXY", "USDT").upper()
if KURS_USD_PROXY and not re.match(r"^[A-Z0-9]{2,12}$", KURS_USD_PROXY):
    raise ConfigError(f"KURS_USD_PROXY: expected an asset code or empty, got {KURS_USD_PROXY!r}")
# Assets assumed equal to a reference within a band, measured continuously; outside the band the
# pairs priced through them are converted and marked `depeg` (docs/rates.md#pegs).
KURS_PEGS = env.pegs("KURS_PEGS", "USDT:USD:0.01")
KURS_STALE_AFTER = env.positive_float("KURS_STALE_AFTER", 30.0)
KURS_MAX_JUMP = env.positive_float("KURS_MAX_JUMP", 0.2)
# How items that do not set their own `pricing` are priced (docs/rates.md#consensus-pricing).
KURS_PRICING = env.choice("KURS_PRICING", "priority", {"priority", "consensus"})
KURS_CONSENSUS_MIN_SOURCES = env.positive_int("KURS_CONSENSUS_MIN_SOURCES", 2)
KURS_HISTORY_DAYS = env.positive_int("KURS_HISTORY_DAYS", 90)
KURS_WS_HEARTBEAT = env.positive_float("KURS_WS_HEARTBEAT", 30.0)
# Browser origins allowed on /ws/items and the stream besides DJANGO_ALLOWED_HOSTS
# (docs/events.md#who-may-connect).
KURS_WS_ALLOWED_ORIGINS = env.origins("KURS_WS_ALLOWED_ORIGINS")
# Per client address and web worker process, WebSocket and SSE together (realtime/limits.py).
KURS_MAX_CONNECTIONS_PER_CLIENT = env.positive_int("KURS_MAX_CONNECTIONS_PER_CLIENT", 50)
# A resume further behind than this many stream events gets `gap` + snapshot, not a replay.
KURS_MAX_REPLAY_EVENTS = env.non_negative_int("KURS_MAX_REPLAY_EVENTS", 1000)
KURS_MAX_REPLAYS_PER_CLIENT = env.positive_int("KURS_MAX_REPLAYS_PER_CLIENT", 2)
KURS_API_KEYS_REQUIRED = env.boolean("KURS_API_KEYS_REQUIRED", True)
KURS_RATE_LIMIT = env.rate_limit("KURS_RATE_LIMIT")
# `POST /tasks/run` per API key: each call makes every exchange answer at once (their bans).
KURS_TASKS_RATE_LIMIT = env.rate_limit("KURS_TASKS_RATE_LIMIT", "6/min")
# Failed admin sign-ins per address and per username before a lockout of the period.
KURS_ADMIN_LOGIN_LIMIT = env.rate_limit("KURS_ADMIN_LOGIN_LIMIT", "5/min")
# USDTTRC and USDTERC are USDT on TRON and Ethereum; exchanges quote plain USDT
# (docs/rates.md#aliases-the-usd-proxy-and-cross-rates).
KURS_ASSET_ALIASES = env.aliases("KURS_ASSET_ALIASES", "USDTTRC:USDT,USDTERC:USDT")
# Untracked pairs priced anew (rates/ondemand.py) per second, by all clients together and by one
# client address; beyond either, /rates/{base}/{quote} and /convert answer 429 with Retry-After.
KURS_ONDEMAND_RATE = env.positive_float("KURS_ONDEMAND_RATE", 50.0)
KURS_ONDEMAND_CLIENT_RATE = env.positive_float("KURS_ONDEMAND_CLIENT_RATE", 5.0)

# --- Metrics port of the processes without a web server (fetcher, qcluster) ------------------
# Web processes answer GET /metrics; `run_fetch --watch` and `qcluster` serve Prometheus on this
# port when it is set (compose: 9100), so that their quote and circuit metrics are scraped.
KURS_METRICS_PORT = env.positive_int("KURS_METRICS_PORT", 0) or None
if KURS_METRICS_PORT is not None and KURS_METRICS_PORT > 65535:
    raise ConfigError(f"KURS_METRICS_PORT: expected a TCP port, got {KURS_METRICS_PORT}")
KURS_METRICS_HOST = env.string("KURS_METRICS_HOST", "127.0.0.1")

# --- Logging --------------------------------------------------------------------------------
KURS_LOG_LEVEL = env.choice(
    "KURS_LOG_LEVEL", "INFO", {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}, upper=True
)
KURS_LOG_FORMAT = env.choice("KURS_LOG_FORMAT", "console", {"console", "json"})
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "console": {
            "()": "config.logs.ConsoleFormatter",
            "format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        },
        "json": {
            "()": "config.logs.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "ts", "levelname": "level", "name": "logger"},
        },
    },
    "filters": {
        "request_id": {"()": "config.logs.RequestIdFilter"},
        "no_server_access": {"()": "config.logs.DropServerAccessLines"},
    },
    "handlers": {
        "default": {
            "class": "logging.StreamHandler",
            "formatter": KURS_LOG_FORMAT,
            "filters": ["request_id"],
        },
        # The access lines, written in batches (edge/accesslog.py).
        "access": {
            "class": "edge.accesslog.BufferedStreamHandler",
            "formatter": KURS_LOG_FORMAT,
        },
    },
    "root": {"handlers": ["default"], "level": KURS_LOG_LEVEL},
    "loggers": {
        # Django's default config gives "django" its own console handler (active with DEBUG):
        # with propagation to root that printed every line twice. Root's handler only.
        "django": {"handlers": [], "level": KURS_LOG_LEVEL, "propagate": True},
        "django.request": {"level": "ERROR"},
        # One access line per request comes from the edge (with the request id); the servers'
        # own access logs would repeat it.
        "kurs.access": {"handlers": ["access"], "propagate": False},
        "django.server": {"handlers": [], "propagate": False},
        "django.channels.server": {"filters": ["no_server_access"]},
        "uvicorn.access": {"handlers": [], "propagate": False},
        # uvicorn's other lines (start-up, WebSocket, errors) in our format, JSON included.
        "uvicorn": {"handlers": [], "level": KURS_LOG_LEVEL, "propagate": True},
        "daphne": {"level": "WARNING"},
        "nats": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}

# --- Internationalisation, static files, auth -----------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where collectstatic puts the files WhiteNoise serves (the image builds it here).
STATIC_ROOT: Path | None = Path(env.string("KURS_STATIC_ROOT", "") or BASE_DIR / "staticfiles")
# App static files (the dashboard's script and styles, the admin's) are found in their folders
# at start-up, so pages work with DEBUG off even before `collectstatic` (which the image runs;
# its STATIC_ROOT copies are served as well). DEBUG also looks them up again on each request.
WHITENOISE_USE_FINDERS = True

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

NINJA_PAGINATION_MAX_LIMIT = 500
# How many reverse proxies (nginx: 1) stand in front of the web processes: the client address
# for rate limiting is then taken from X-Forwarded-For at that depth, which clients cannot forge.
# 0 (docs/settings.md): the TCP peer, X-Forwarded-For ignored (ninja's None would trust the
# whole header).
NINJA_NUM_PROXIES = env.non_negative_int("KURS_NUM_PROXIES", 0)

# --- Behind a TLS-terminating proxy (nginx with certificates, a load balancer) ----------------
# The proxy says `X-Forwarded-Proto: https`; then plain HTTP is redirected, cookies are secure-only
# and browsers are told to stay on HTTPS (HSTS), which is what `check --deploy` asks for. Off by
# default: `make run` and the compose file serve plain HTTP on a private port.
KURS_TLS_PROXY = env.boolean("KURS_TLS_PROXY", False)
if KURS_TLS_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    # Probes inside the deployment (compose healthchecks, Prometheus) speak plain HTTP directly.
    SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.non_negative_int("KURS_HSTS_SECONDS", 365 * 24 * 3600)
    # Each binds every subdomain (or the browsers' preload list) for good: the operator's call.
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.boolean("KURS_HSTS_INCLUDE_SUBDOMAINS", False)
    SECURE_HSTS_PRELOAD = env.boolean("KURS_HSTS_PRELOAD", False)
