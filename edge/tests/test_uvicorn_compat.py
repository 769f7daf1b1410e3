"""The uvicorn Kurs's protocols were written against, and the undocumented names they use.

A failure here is the signal to read the new uvicorn's protocol classes before upgrading:
see `edge/_uvicorn_compat.py`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import version

import pytest

from edge._uvicorn_compat import PRIVATE_MODULES, UNDOCUMENTED, WRITTEN_AGAINST


def test_the_installed_uvicorn_is_the_one_the_adapters_were_written_against() -> None:
    assert version("uvicorn") == WRITTEN_AGAINST, (
        f"uvicorn {version('uvicorn')} is installed; edge/_uvicorn_compat.py was written against"
        f" {WRITTEN_AGAINST}: check every name it lists in the new version, then bump it"
    )


def defined(cls: type, name: str) -> bool:
    """A method or class attribute of `cls`, or an attribute its methods assign on `self`."""
    if hasattr(cls, name):
        return True
    source = "".join(inspect.getsource(klass) for klass in cls.__mro__ if klass is not object)
    return re.search(rf"\bself\.{name}\s*(:[^=\n]*)?=", source) is not None


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls, names in UNDOCUMENTED.items() for name in names],
    ids=lambda value: value.__name__ if isinstance(value, type) else str(value),
)
def test_each_undocumented_name_still_exists(cls: type, name: str) -> None:
    assert defined(cls, name), f"{cls.__module__}.{cls.__name__} no longer has {name!r}"


def test_the_check_itself_notices_a_missing_name() -> None:
    (cls, *_rest) = UNDOCUMENTED
    assert not defined(cls, "no_such_member_in_any_uvicorn")


@pytest.mark.parametrize("module", PRIVATE_MODULES)
def test_each_private_module_still_exists(module: str) -> None:
    assert importlib.import_module(module).ASGISendEvent
