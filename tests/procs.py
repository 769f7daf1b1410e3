"""Run the Procfile's processes under honcho, as `make run` does, and read what they print."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.services import ROOT

# The virtualenv running the tests (sys.prefix, not resolved: .venv/bin/python is a symlink).
VENV = Path(sys.prefix)
VENV_BIN = VENV / "bin"


def plain_env(*, venv_on_path: bool = True, **overrides: str) -> dict[str, str]:
    """The environment of a plain shell: none of the test run's DJANGO_*/KURS_* settings.

    `venv_on_path` puts `.venv/bin` first on PATH, as `make run` does for its processes.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "KURS_", "PYTEST_", "PROMETHEUS_"))
        and key not in ("DATABASE_URL", "REDIS_URL", "NATS_URL", "VIRTUAL_ENV")
    }
    if venv_on_path:
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(overrides)
    return env


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, found through /proc before anything is killed: a child
    that started a session of its own (qcluster under scripts/own_group.py) is outside the
    group a `killpg` reaches, and would outlive the test once its parent is gone."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # The command name may hold spaces and parentheses: the fields follow its last ")".
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group and every descendant, wherever their group."""
    below = descendants(pid)
    for target in (pid, *below):
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(target, signal.SIGKILL)


class Honcho:
    """`honcho start -f Procfile NAMES...` in its own session; its output lines, as they come."""

    def __init__(self, names: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [str(VENV_BIN / "honcho"), "start", "-f", "Procfile", *names],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float) -> str:
        """The first line matching `pattern` (a regex); AssertionError after `timeout` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    output = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{output}")
                self._changed.wait(min(left, 0.2))

    def ctrl_c(self, timeout: float = 60) -> None:
        """SIGINT to honcho, as a terminal's Ctrl-C, and wait for it to exit (`timeout`: a bound
        on the wait; whether its processes stopped in time, honcho's grace says: it SIGKILLs
        them after KILL_WAIT, and says so)."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout)
        self._reader.join(5)

    def close(self) -> None:
        """Never leave processes behind, whatever the test did."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                kill_tree(self.process.pid)
                self.process.wait()

    def output_of(self, name: str) -> list[str]:
        """What process `name` (e.g. `web`) printed, without honcho's `time name.1 | ` prefix."""
        prefix = re.compile(rf"^\S+ {re.escape(name)}\.\d+\s*\| ?")
        return [prefix.sub("", line) for line in self.lines if prefix.match(line)]
