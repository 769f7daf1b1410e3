"""scripts/write_env.py: the local `.env` of `make run`'s first run, never overwriting one."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

from tests.services import ROOT

SCRIPT = ROOT / "scripts" / "write_env.py"


def write_env(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, check=True
    )


def test_it_writes_debug_and_a_generated_secret_readable_only_by_the_owner(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    assert "Wrote" in write_env(path).stdout
    text = path.read_text()
    assert re.search(r"^DJANGO_DEBUG=true$", text, re.MULTILINE)
    secret = re.search(r"^DJANGO_SECRET_KEY=(\S+)$", text, re.MULTILINE)
    assert secret is not None
    assert len(secret.group(1)) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    other = tmp_path / "other.env"
    write_env(other)
    assert other.read_text() != text  # a fresh secret each time


def test_it_never_touches_an_existing_env(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("DJANGO_DEBUG=false\nDJANGO_SECRET_KEY=mine\n")
    assert write_env(path).stdout == ""
    assert path.read_text() == "DJANGO_DEBUG=false\nDJANGO_SECRET_KEY=mine\n"
