"""Domain errors of the rates app; `config/api.py` maps each to an HTTP answer once."""

from __future__ import annotations


class RatesError(Exception):
    """Base for rates errors; `str()` is the message the API shows as `detail`."""


class PairNotPriced(RatesError):
    """No provider lists the pair, directly, inverted or through a cross rate (404)."""


class ProvidersUnavailable(RatesError):
    """Providers that could price the pair failed or sent no valid quote just now (503)."""


class InvalidQuery(RatesError):
    """Parameters that are each valid but make no sense together; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class OnDemandBudgetExceeded(RatesError):
    """Too many pairs priced on demand just now, by this client or by all (429, Retry-After)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotServedAt(RatesError):
    """No version of the pair's current rate was served at or before the instant asked (404)."""
