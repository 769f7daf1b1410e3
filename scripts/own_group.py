"""Run a command in its own process group and stop it the way it expects to be stopped.

Usage (the Procfile's qcluster line): `python scripts/own_group.py [--grace S] COMMAND...`

honcho stops a process by signalling its whole process group (`killpg`). django-q2's qcluster
cannot take that: its sentinel process resets SIGTERM to the default, so it dies at once, often
inside `stop_event.wait()`, and the cluster's own handler then blocks forever in
`stop_event.set()` waiting for that dead waiter; honcho SIGKILLs it after 5 s, or hangs when the
shell in front of it has already exited. Here the command gets its own group, SIGTERM/SIGINT go to
its main process only (which stops its children in order, about a second for an idle cluster),
and whatever is left after `--grace` seconds (a task still running) is killed, so the whole
thing ends inside honcho's 5 s.

This is the one place Kurs works around django-q2's stopping; it imports nothing of django-q2
but depends on the behaviour of the names in `DJANGO_Q2_INTERNALS`, as of `DJANGO_Q2_VERSION`.
Upstream:
- https://github.com/django-q2/django-q2/issues/346 "Cluster.sig_handler deadlocks the cluster:
  `stop_event.set()` is called from signal context"
- https://github.com/django-q2/django-q2/issues/66 "'qcluster' doesn't stop with Control+C"

`tests/test_own_group.py` fails when the installed django-q2 is another version, or when those
names no longer behave so: check both issues then, and drop this wrapper if they are fixed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from types import FrameType

# The django-q2 release this workaround was written against, and what it relies on there.
DJANGO_Q2_VERSION = "1.11.1"
DJANGO_Q2_INTERNALS = {
    # The sentinel (a child of the cluster) sets SIGTERM back to the default: a group-wide
    # SIGTERM kills it on the spot instead of letting the cluster stop it.
    "django_q.cluster.Sentinel.__init__": "signal.signal(signal.SIGTERM, signal.SIG_DFL)",
    # The cluster's handler stops from signal context (issue 346): `stop()` sets the event.
    "django_q.cluster.Cluster.sig_handler": "self.stop()",
    "django_q.cluster.Cluster.stop": "self.stop_event.set()",
}


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    grace = 4.0
    if len(argv) >= 2 and argv[0] == "--grace":
        grace, argv = float(argv[1]), argv[2:]
    if not argv:
        print("usage: own_group.py [--grace SECONDS] COMMAND...", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv, start_new_session=True)
    deadline: float | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal deadline
        if deadline is None:
            deadline = time.monotonic() + grace
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            code = child.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                print(f"own_group: {argv[0]} still running after {grace:g}s: killed", flush=True)
                _kill_group(child.pid)
    _kill_group(child.pid)  # stragglers the main process left behind
    return 0 if deadline is not None and code in (0, -signal.SIGTERM, -signal.SIGKILL) else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
