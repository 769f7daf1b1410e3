"""Strict environment helpers: every setting is parsed here and a bad value fails loudly.

Each helper raises :class:`ConfigError` with one line that names the setting, so that
`manage.py` and the ASGI entry point can print it and exit instead of starting half-configured.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """A setting has a value Kurs cannot run with."""


def raw(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip()


def string(name: str, default: str) -> str:
    value = raw(name)
    return default if value is None else value


def boolean(name: str, default: bool) -> bool:
    value = raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def positive_float(name: str, default: float) -> float:
    value = raw(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}: expected a positive number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")
    return number


def _whole_number(name: str, default: int, *, minimum: int, expected: str) -> int:
    value = raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    return number


def positive_int(name: str, default: int) -> int:
    return _whole_number(name, default, minimum=1, expected="a positive whole number")


def non_negative_int(name: str, default: int) -> int:
    return _whole_number(name, default, minimum=0, expected="a whole number >= 0")


def csv(name: str, default: str) -> list[str]:
    value = string(name, default)
    return [part.strip() for part in value.split(",") if part.strip()]


def choice(name: str, default: str, choices: set[str], *, upper: bool = False) -> str:
    value = string(name, default)
    value = value.upper() if upper else value.lower()
    if value not in choices:
        allowed = ", ".join(sorted(choices))
        raise ConfigError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


def url(name: str, default: str, schemes: set[str]) -> str:
    """A base URL (origin plus optional path prefix), returned without a trailing slash."""
    value = string(name, default)
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        allowed = "/".join(sorted(schemes))
        raise ConfigError(f"{name}: expected a {allowed} URL, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name}: bad port in {value!r}") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"{name}: a base URL takes no query or fragment, got {value!r}")
    return value.rstrip("/")


def url_list(name: str, default: str, schemes: set[str]) -> list[str]:
    values = csv(name, default)
    if not values:
        raise ConfigError(f"{name}: expected at least one URL")
    checked = []
    for value in values:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            allowed = "/".join(sorted(schemes))
            raise ConfigError(f"{name}: expected {allowed} URLs, got {value!r}")
        checked.append(value)
    return checked


_RATE_RE = re.compile(r"^(\d+)/(s|sec|second|m|min|minute|h|hour|d|day)$")
_PERIOD_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def rate_limit(name: str, default: str = "") -> tuple[int, int] | None:
    """`50/s`, `1000/min`, `10000/h`, `100000/d` -> (requests, seconds); empty -> None (off)."""
    value = string(name, default)
    if value == "":
        return None
    match = _RATE_RE.match(value.replace(" ", "").lower())
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(f"{name}: expected N/s, N/min, N/h or N/d with N > 0, got {value!r}")
    return int(match.group(1)), _PERIOD_SECONDS[match.group(2)[0]]


_ASSET_RE = re.compile(r"^[A-Z0-9]{2,12}$")


def aliases(name: str, default: str) -> dict[str, str]:
    """`USDTTRC:USDT,USDTERC:USDT` -> {"USDTTRC": "USDT", "USDTERC": "USDT"}."""
    result: dict[str, str] = {}
    for entry in csv(name, default):
        alias, sep, target = entry.partition(":")
        alias, target = alias.strip().upper(), target.strip().upper()
        if not sep or not _ASSET_RE.match(alias) or not _ASSET_RE.match(target):
            raise ConfigError(f"{name}: expected ALIAS:SYMBOL pairs, got {entry!r}")
        result[alias] = target
    return result


def pegs(name: str, default: str) -> list[tuple[str, str, Decimal]]:
    """`USDT:USD:0.01,USDC:USD:0.005` -> [("USDT", "USD", Decimal("0.01")), ...]; empty: none.

    The band is a fraction (0.01 = 1 %), above 0 and below 1; an asset is pegged once.
    """
    result: list[tuple[str, str, Decimal]] = []
    for entry in csv(name, default):
        parts = [part.strip().upper() for part in entry.split(":")]
        try:
            band = Decimal(parts[2]) if len(parts) == 3 else None
        except InvalidOperation:
            band = None
        if (
            band is None
            or not _ASSET_RE.match(parts[0])
            or not _ASSET_RE.match(parts[1])
            or parts[0] == parts[1]
            or not Decimal(0) < band < Decimal(1)
        ):
            raise ConfigError(
                f"{name}: expected ASSET:REFERENCE:BAND entries with a band between 0 and 1 "
                f"(e.g. USDT:USD:0.01), got {entry!r}"
            )
        if any(asset == parts[0] for asset, _, _ in result):
            raise ConfigError(f"{name}: {parts[0]} is pegged twice")
        result.append((parts[0], parts[1], band))
    return result


def origins(name: str) -> list[str]:
    """`https://app.example.com,http://localhost:3000` (or `*`): browser origins, no path."""
    checked = []
    for value in csv(name, ""):
        if value == "*":
            checked.append(value)
            continue
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(f"{name}: bad port in {value!r}") from None
        if (
            parts.scheme not in {"http", "https"}
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username
        ):
            raise ConfigError(
                f"{name}: expected origins like https://app.example.com or *, got {value!r}"
            )
        checked.append(f"{parts.scheme}://{parts.netloc}".lower())
    return checked
