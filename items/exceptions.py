"""Domain errors of the items app; `config/api.py` maps each to an HTTP answer once."""

from __future__ import annotations


class ItemError(Exception):
    """Base for item errors; `str()` is the message the API shows as `detail`."""


class ItemNotFound(ItemError):
    pass


class ItemAlreadyExists(ItemError):
    pass


class InvalidItem(ItemError):
    """The input cannot become an Item; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
