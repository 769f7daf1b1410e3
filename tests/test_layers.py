"""The layers contract of `make lint` (pyproject.toml) places every module of every app.

import-linter checks that imports point down the layers, but only between modules it is told
about: a new module left out of the contract would be checked by nothing. Tests and migrations
are not layers (they may import anything of their app).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_LAYERS = {"tests", "migrations", "__pycache__"}


def _contract() -> tuple[list[str], list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["name"].startswith("Dependencies"))
    placed = [
        name.strip()
        for layer in contract["layers"]
        for group in layer.split(":")
        for name in group.split("|")
    ]
    return config["root_packages"], placed


def _app_modules(packages: list[str]) -> set[str]:
    modules = set()
    for package in packages:
        for child in (ROOT / package).iterdir():
            name = child.name.removesuffix(".py")
            if name in NOT_LAYERS or name == "__init__" or name.startswith("."):
                continue
            if (child.is_dir() and (child / "__init__.py").exists()) or child.suffix == ".py":
                modules.add(f"{package}.{name}")
    return modules


def test_every_app_module_is_in_one_layer() -> None:
    packages, placed = _contract()
    assert sorted(packages) == ["config", "edge", "items", "rates", "realtime"]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert _app_modules(packages) - set(placed) == set(), "place these in pyproject.toml's layers"
    assert set(placed) - _app_modules(packages) == set(), "these layers name no module"
