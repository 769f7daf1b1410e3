"""scripts/own_group.py: SIGTERM to the main process only, stragglers killed; django-q2 pinned."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import signal
import subprocess
import sys
from types import ModuleType

import pytest

from tests.services import ROOT

SCRIPT = ROOT / "scripts" / "own_group.py"
UPSTREAM = "django-q2 issues 346 and 66 (linked in scripts/own_group.py)"


def own_group() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_group", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_django_q2_is_the_release_the_workaround_was_written_against() -> None:
    installed = importlib.metadata.version("django-q2")
    assert installed == own_group().DJANGO_Q2_VERSION, (
        f"django-q2 {installed} is installed; scripts/own_group.py was written against "
        f"{own_group().DJANGO_Q2_VERSION}: check {UPSTREAM}, then the workaround, then the pin"
    )


@pytest.mark.parametrize("name", sorted(own_group().DJANGO_Q2_INTERNALS))
def test_the_django_q2_behaviour_it_works_around_is_still_there(name: str) -> None:
    module_name, _, qualname = name.rpartition(".")
    module_name, _, class_name = module_name.rpartition(".")
    function = getattr(getattr(importlib.import_module(module_name), class_name), qualname)
    assert own_group().DJANGO_Q2_INTERNALS[name] in inspect.getsource(function), (
        f"{name} changed: check {UPSTREAM} and whether scripts/own_group.py is still needed"
    )


# A main process that stops on SIGTERM but leaves a child behind which would not stop (as
# qcluster's task still running); the child says so if it is sent SIGTERM, which it must not be.
FAMILY = """
import signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("child got SIGTERM", flush=True))
print("child ready", flush=True)
while True:
    time.sleep(60)
'''])
def stop(*_):
    print("main got SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
{main_ignores}
print("main ready", flush=True)
signal.pause()
"""


def run_family(*, main_stops: bool) -> tuple[int, list[str]]:
    """own_group.py over FAMILY, sent SIGTERM once both are ready: its code and output lines.

    The output pipe is held by every process of the group: it ends only when all are gone.
    """
    main_ignores = "" if main_stops else "signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    script = FAMILY.format(main_ignores=main_ignores)
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--grace", "1", sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    ready = {process.stdout.readline().strip() for _ in range(2)}
    assert ready == {"main ready", "child ready"}
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    return process.returncode, output.splitlines()


def test_sigterm_goes_to_the_main_process_only_and_what_it_leaves_is_killed() -> None:
    code, lines = run_family(main_stops=True)
    assert code == 0
    assert lines == ["main got SIGTERM"]  # the child was killed, never sent SIGTERM


def test_a_main_process_that_does_not_stop_is_killed_after_the_grace() -> None:
    code, lines = run_family(main_stops=False)
    assert code == 0
    assert lines == [f"own_group: {sys.executable} still running after 1s: killed"]
