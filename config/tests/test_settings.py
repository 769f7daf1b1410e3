"""Settings: a bad value stops start-up with one clear line naming it (docs/settings.md)."""

from __future__ import annotations

import os
import re
import subprocess
from decimal import Decimal

import pytest

from config import env
from config.env import ConfigError
from tests.services import run_python


def run_check(*flags: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KURS_", "DJANGO_", "DATABASE_URL", "REDIS_URL", "NATS_URL"))
    }
    environment.update({"DJANGO_SECRET_KEY": "x" * 50, **overrides})
    return run_python(["manage.py", "check", *flags], environment)


# A key as `check --deploy` wants it (long, varied); the tests' "x" * 50 is refused as weak.
DEPLOY_KEY = "kG7#vR2q!Lz9@Wm4$Tn8^Hb5&Yc1*Pf6(Jd3)Sx0_Ua2+Qe7-Ni9=Ko4~Ml8"


def test_behind_a_tls_proxy_check_deploy_finds_nothing() -> None:
    result = run_check(
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_SECRET_KEY=DEPLOY_KEY,
        KURS_TLS_PROXY="true",
        KURS_HSTS_INCLUDE_SUBDOMAINS="true",
        KURS_HSTS_PRELOAD="true",
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_behind_a_tls_proxy_only_the_operators_two_hsts_choices_remain() -> None:
    """HSTS for every subdomain and the preload list bind a whole domain for good: Kurs leaves
    them off (docs/operations.md#deploy-checks), and check --deploy says exactly that."""
    result = run_check("--deploy", DJANGO_SECRET_KEY=DEPLOY_KEY, KURS_TLS_PROXY="true")
    assert result.returncode == 0, result.stderr
    reported = set(re.findall(r"\(([a-z]+\.[EW]\d+)\)", result.stderr))
    assert reported == {"edge.W005", "edge.W021"}, result.stderr
    assert "2 issues (2 silenced)" in result.stderr


def test_without_the_tls_settings_check_deploy_names_them() -> None:
    result = run_check("--deploy", DJANGO_SECRET_KEY=DEPLOY_KEY)
    warnings = {code for code in ("W004", "W008", "W012", "W016") if code in result.stderr}
    assert warnings == {"W004", "W008", "W012", "W016"}, result.stderr


def test_good_defaults_start() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KURS_PROVIDERS", "binance,kraken"),
        ("KURS_PROVIDERS", "binance,binance"),
        ("KURS_POLL_INTERVAL", "-1"),
        ("KURS_POLL_INTERVAL", "soon"),
        ("KURS_STALE_AFTER", "0"),
        ("KURS_MAX_JUMP", "nan"),
        ("KURS_HISTORY_DAYS", "1.5"),
        ("KURS_WS_HEARTBEAT", "inf"),
        ("KURS_WS_ALLOWED_ORIGINS", "app.example.com"),
        ("KURS_WS_ALLOWED_ORIGINS", "https://app.example.com/path"),
        ("KURS_BINANCE_REST_URL", "ftp://example.org"),
        ("KURS_BINANCE_WS_URL", "http://127.0.0.1:8900/binance"),
        ("KURS_CBR_REST_URL", "not a url"),
        ("KURS_API_KEYS_REQUIRED", "maybe"),
        ("KURS_RATE_LIMIT", "fast"),
        ("KURS_RATE_LIMIT", "0/s"),
        ("KURS_NUM_PROXIES", "-1"),
        ("KURS_LOG_LEVEL", "LOUD"),
        ("KURS_LOG_FORMAT", "xml"),
        ("KURS_METRICS_PORT", "metrics"),
        ("KURS_METRICS_PORT", "70000"),
        ("KURS_NATS_PREFIX", "kurs.>"),
        ("KURS_NATS_REPLICAS", "0"),
        ("KURS_NATS_REPLICAS", "7"),
        ("KURS_OWNER_SHARDS", "0"),
        ("KURS_OWNER_SHARDS", "65"),
        ("KURS_OWNER_SHARDS", "two"),
        ("KURS_USD_PROXY", "US DT"),
        ("KURS_PEGS", "USDT:USD"),
        ("KURS_PEGS", "USDT:USD:2"),
        ("KURS_PEGS", "USDT:USD:abc"),
        ("KURS_PEGS", "USDT:USDT:0.01"),
        ("KURS_PEGS", "USDT:USD:0.01,USDT:EUR:0.01"),
        ("KURS_ASSET_ALIASES", "USDTTRC=USDT"),
        ("NATS_URL", "http://127.0.0.1:4222"),
        ("DATABASE_URL", "mysql://localhost/kurs"),
        ("REDIS_URL", "localhost:6379"),
        ("DJANGO_DEBUG", "perhaps"),
    ],
)
def test_a_bad_value_stops_start_up_with_one_line(name: str, value: str) -> None:
    result = run_check(**{name: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"kurs: configuration error: {name}:")


def test_the_secret_key_is_required_outside_debug() -> None:
    result = run_check(DJANGO_SECRET_KEY="")
    assert result.returncode == 2
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_debug_runs_without_a_secret_key() -> None:
    assert run_check(DJANGO_SECRET_KEY="", DJANGO_DEBUG="true").returncode == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("50/s", (50, 1)), ("1000/min", (1000, 60)), ("10/h", (10, 3600)), ("5/day", (5, 86400))],
)
def test_rate_limits_parse(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[int, int]
) -> None:
    monkeypatch.setenv("KURS_RATE_LIMIT", value)
    assert env.rate_limit("KURS_RATE_LIMIT") == expected


def test_an_empty_rate_limit_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KURS_RATE_LIMIT", "")
    assert env.rate_limit("KURS_RATE_LIMIT") is None


def test_urls_keep_their_path_prefix_without_a_trailing_slash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KURS_X_URL", "http://127.0.0.1:8900/binance/")
    assert env.url("KURS_X_URL", "", {"http"}) == "http://127.0.0.1:8900/binance"


def test_aliases_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KURS_ALIASES", "usdttrc:usdt, wbtc:btc")
    assert env.aliases("KURS_ALIASES", "") == {"USDTTRC": "USDT", "WBTC": "BTC"}


def test_allowed_origins_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KURS_ORIGINS", "https://App.Example.com, http://localhost:3000/, *")
    assert env.origins("KURS_ORIGINS") == [
        "https://app.example.com",
        "http://localhost:3000",
        "*",
    ]
    monkeypatch.setenv("KURS_ORIGINS", "ws://app.example.com")
    with pytest.raises(ConfigError, match=r"^KURS_ORIGINS: expected origins like"):
        env.origins("KURS_ORIGINS")


def test_nats_url_accepts_a_cluster_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://a:4222, nats://b:4222")
    assert env.url_list("NATS_URL", "", {"nats"}) == ["nats://a:4222", "nats://b:4222"]


def test_a_bad_boolean_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KURS_FLAG", "sometimes")
    with pytest.raises(ConfigError, match=r"^KURS_FLAG: expected true or false"):
        env.boolean("KURS_FLAG", True)


def test_pegs_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KURS_PEGS", " usdt:usd:0.01 , USDC:USD:0.005")
    assert env.pegs("KURS_PEGS", "") == [
        ("USDT", "USD", Decimal("0.01")),
        ("USDC", "USD", Decimal("0.005")),
    ]
    monkeypatch.setenv("KURS_PEGS", "")
    assert env.pegs("KURS_PEGS", "USDT:USD:0.01") == []  # empty disables the check
