"""Every shell command the README and `docs/*.md` show works as typed, in a fresh copy of the
repository, and every link between them leads somewhere.

The commands are read from the ```sh / ```bash / ```shell blocks of README.md and then of each
`docs/*.md` (in name order), so the documents cannot drift from what works. Each command is
classified: run here, long-running (started and checked to come up), or excluded with a reason;
a command that matches none of them fails the test, so a new kind of command needs a decision.

They run in a copy of the files git would commit (tracked plus untracked,
not ignored: a fresh clone of the commit being made, so uncommitted edits are checked too, and
no `.env`, database or `var/`), with the test run's virtualenv linked in as `.venv` (the
Makefile's install stamp then makes `make install` a no-op instead of minutes of pip), in a
plain environment: no DJANGO_* variables, no virtualenv on PATH.

- Long-running commands (`make run`, `run_emulator`, `run_fetch --watch`, `qcluster`) are started
  first, checked to come up, and stopped at the end: `make run` with a Ctrl-C to its process group,
  which must stop everything within honcho's grace.
- The others run in order in one bash under a pseudo-terminal (interactive `createsuperuser`
  gets its answers), each exit status checked.
- Two adjustments for a shared machine: the web and emulator ports (8000, 8900) are replaced by
  free ports (`KURS_PORT` and the emulator's `--port`), and NATS subjects get a private prefix.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.procs import VENV, kill_tree, plain_env
from tests.services import ROOT, free_port, port_open

README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:sh|bash|shell)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

# Shown but not run here, each with the reason.
EXCLUDED = {
    "make test": "runs the whole suite, this test included (recursive, and minutes)",
    "make bench": "runs the benchmarks for minutes",
    "make demo": "make run's process set (checked here) plus the emulator (run_emulator, checked"
    " here); a second full stack would double this test's time",
    ".venv/bin/pip install ./clients/python": "installs into the test run's virtualenv, which"
    " `make install` already did (requirements-dev.txt); tests/test_client.py builds the package",
    "docker compose up --build": "needs Docker and minutes of image builds; tests/test_deploy.py"
    " checks the compose file and make test-prod runs the same process set natively",
}
# Long-running commands: how to tell each has come up.
LONG_RUNNING = ("make run", "run_emulator", "run_fetch --watch", "qcluster")
# What may run here: commands that end by themselves against the stack this test starts.
RUNNABLE = (
    re.compile(r"curl\s.*"),
    re.compile(r"make (superuser|apikey NAME=[\w-]+)"),
    re.compile(r"KEY=\$\(make apikey NAME=[\w-]+ \| tail -n 1\)"),
    re.compile(r"\.venv/bin/python manage\.py (createsuperuser|run_fetch|create_api_key)\b.*"),
)
# `NAME=value ` assignments before a command (quoted values included).
ASSIGNMENTS = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=(?:'[^']*'|\"[^\"]*\"|[^\s$'\"]+)\s+)*")
PASSWORD = "kurs-Newcomer-2026!x"


def readme_commands(text: str) -> list[str]:
    """The commands of a document's shell blocks, in order (comments and blank lines dropped)."""
    commands: list[str] = []
    for block in FENCE.findall(text):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def bare(command: str) -> str:
    """The command without its trailing comment (for matching; bash drops it anyway)."""
    return re.sub(r"\s+#.*$", "", command).strip()


def document_commands() -> list[str]:
    """Every document's commands: the README's first, then docs/*.md in name order."""
    return [command for path in DOCUMENTS for command in readme_commands(path.read_text())]


def kind(command: str) -> str:
    """`excluded`, `long-running`, `run`, or `unclassified` (a command nobody decided about)."""
    if bare(command) in EXCLUDED:
        return "excluded"
    if any(name == bare(command) or f" {name}" in bare(command) for name in LONG_RUNNING):
        return "long-running"
    if any(pattern.fullmatch(bare(command)) for pattern in RUNNABLE):
        return "run"
    if any(pattern.fullmatch(ASSIGNMENTS.sub("", bare(command))) for pattern in RUNNABLE[3:]):
        return "run"
    return "unclassified"


def localize(command: str, web_port: int, emulator_port: int) -> str:
    command = re.sub(r"(localhost|127\.0\.0\.1):8000\b", f"127.0.0.1:{web_port}", command)
    command = re.sub(r"(localhost|127\.0\.0\.1):8900\b", f"127.0.0.1:{emulator_port}", command)
    return re.sub(r"--port 8900\b", f"--port {emulator_port}", command)


def test_the_readme_starts_with_make_run_and_make_test() -> None:
    commands = readme_commands(README.read_text())
    assert [bare(command) for command in commands[:2]] == ["make run", "make test"]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_the_documents_run_manage_py_with_the_projects_virtualenv(path: Path) -> None:
    # `python manage.py` in a plain shell is the system Python, without Django.
    text = path.read_text()
    assert re.findall(r"(?<!\.venv/bin/)\bpython3? manage\.py", text) == []


def test_every_document_command_is_run_or_excluded_with_a_reason() -> None:
    kinds = {bare(command): kind(command) for command in document_commands()}
    assert [command for command, what in kinds.items() if what == "unclassified"] == []
    assert kinds["make run"] == "long-running"
    assert kinds["docker compose up --build"] == "excluded"
    assert [command for command, what in kinds.items() if what == "run"], "nothing to run"
    # Each document block was read: the docs add commands of their own.
    assert len(kinds) > len({bare(command) for command in readme_commands(README.read_text())})


@pytest.mark.parametrize(
    "command",
    [
        "rm -rf var",
        "docker compose up -d --scale web=4",
        "make soak",
        "sqlite3 db.sqlite3 .backup",
        "KEY=$(rm -rf /)",
        "X=1 rm -rf var",
        ".venv/bin/python manage.py flush --no-input",
    ],
)
def test_a_command_nobody_classified_fails(command: str) -> None:
    assert kind(command) == "unclassified"


# GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens.
def anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {anchor(heading) for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_the_anchor_of_a_heading_is_githubs() -> None:
    assert anchor("`GET /api/v1/items/{id}/rates/latest`") == "get-apiv1itemsidrateslatest"
    assert anchor("Rates: providers, validation") == "rates-providers-validation"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_every_link_of_a_document_leads_somewhere(path: Path) -> None:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # an absolute URL
        file, _, fragment = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    assert broken == []


# --- the run in a fresh copy -------------------------------------------------------------------


def fresh_copy(target: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is gone from the copy
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(VENV)
    return target


@dataclass
class Background:
    """A long-running README command in its own process group, its output in a file."""

    command: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, command: str, cwd: Path, env: dict[str, str], log: Path) -> Background:
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", command],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(command, process, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, up: str, port: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (port_open("127.0.0.1", port) if port else re.search(up, self.output())):
            if self.process.poll() is not None:
                pytest.fail(f"{self.command!r} exited {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.command!r} not up after {timeout:g}s:\n{self.output()}")
            time.sleep(0.1)

    def ctrl_c(self, timeout: float) -> bool:
        """SIGINT to the whole group, as a terminal's Ctrl-C: did the command exit (`timeout`
        bounds the wait; after it, the group is SIGKILLed)?"""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return False
        return True

    def kill(self) -> None:
        """Whatever the test did: the command, and everything it started, is gone."""
        kill_tree(self.process.pid)
        self.process.wait()


@dataclass
class Script:
    """Commands run in order by one bash on a pseudo-terminal, as typed at a prompt."""

    commands: list[str]
    output: str = ""
    statuses: dict[int, int] = field(default_factory=dict)

    PROMPTS: tuple[tuple[re.Pattern[str], Callable[[int], str]], ...] = (
        (re.compile(r"Username[^\n]*: $"), lambda n: f"newcomer{n}"),
        (re.compile(r"Email address: $"), lambda n: "newcomer@example.org"),
        (re.compile(r"Password( \(again\))?: $"), lambda n: PASSWORD),
        (re.compile(r"anyway\? \[y/N\]: $"), lambda n: "y"),
    )

    def run(self, cwd: Path, env: dict[str, str], timeout: float) -> None:
        lines = ["set -o pipefail"]
        for number, command in enumerate(self.commands):
            # The markers start a line of their own even after output without a final newline.
            lines += [
                f"printf '\\n@@CMD {number}\\n'",
                command,
                f"printf '\\n@@RC {number} %d\\n' $?",
            ]
        script = cwd / ".readme-commands.sh"
        script.write_text("\n".join(lines) + "\n")
        pid, fd = pty.fork()
        if pid == 0:  # the child: a login-less bash on the terminal
            os.chdir(cwd)
            os.execve("/bin/bash", ["bash", "--noprofile", "--norc", str(script)], env)
        chunks: list[str] = []
        answered_at, answers = 0, 0
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: bash exited and the terminal closed
                    break
                if not data:
                    break
                chunks.append(data.decode(errors="replace"))
                text = "".join(chunks)
                for prompt, answer in self.PROMPTS:
                    if prompt.search(text[answered_at:]):
                        answers += 1
                        os.write(fd, (answer(answers) + "\n").encode())
                        answered_at = len(text)
                        break
        finally:
            self.output = "".join(chunks).replace("\r\n", "\n")
            os.close(fd)
            # pty.fork made bash a session (and group) leader: nothing it started outlives it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for number, status in re.findall(r"^@@RC (\d+) (\d+)$", self.output, re.MULTILINE):
            self.statuses[int(number)] = int(status)

    def output_of(self, number: int) -> str:
        match = re.search(rf"^@@CMD {number}\n(.*?)^@@RC {number} ", self.output, re.S | re.M)
        return match.group(1) if match else self.output[-2000:]


@pytest.fixture
def background() -> Iterator[list[Background]]:
    started: list[Background] = []
    yield started
    for process in started:
        process.kill()


@pytest.mark.timeout(240)
def test_every_readme_command_works_as_typed_in_a_fresh_copy(
    tmp_path: Path, background: list[Background]
) -> None:
    copy = fresh_copy(tmp_path / "kurs")
    assert not (copy / ".env").exists()
    web_port, emulator_port = free_port(), free_port()
    env = plain_env(
        venv_on_path=False,
        KURS_PORT=str(web_port),
        KURS_NATS_PREFIX=f"kursreadme{os.getpid()}",
    )
    commands = [localize(c, web_port, emulator_port) for c in document_commands()]
    long_running = [command for command in commands if kind(command) == "long-running"]
    to_run = [command for command in commands if kind(command) == "run"]
    assert [command for command in commands if kind(command) == "unclassified"] == []

    # make run first: it writes .env and migrates, which the other commands rely on.
    long_running.sort(key=lambda command: bare(command) != "make run")
    for number, command in enumerate(long_running):
        process = Background.start(command, copy, env, tmp_path / f"long-{number}.log")
        background.append(process)
        if bare(command) == "make run":
            process.wait_until("", web_port, 150)
        elif "run_emulator" in command:
            process.wait_until("", emulator_port, 60)
        elif "run_fetch --watch" in command:
            process.wait_until(r"fetching from", None, 60)
        elif "qcluster" in command:
            process.wait_until(r"Q Cluster \S+ \[\S+\] running", None, 60)
        else:
            pytest.fail(f"no check for the long-running {command!r}: add one")
    env_file = (copy / ".env").read_text()
    assert "DJANGO_DEBUG=true" in env_file
    assert re.search(r"^DJANGO_SECRET_KEY=\S{40,}$", env_file, re.MULTILINE)

    script = Script(to_run)
    script.run(copy, env, timeout=150)

    failures = [
        f"$ {command}\n(exit {script.statuses.get(number, 'none: did not finish')})\n"
        f"{script.output_of(number)}"
        for number, command in enumerate(to_run)
        if script.statuses.get(number) != 0
    ]
    assert failures == [], "\n\n".join(failures)
    assert script.output.count("Superuser created successfully.") == sum(
        "superuser" in command for command in to_run
    )
    assert (copy / ".env").read_text() == env_file  # never rewritten once there

    # Long-running ones stop cleanly: make run's one Ctrl-C within honcho's grace.
    for process in reversed(background):
        stopped = process.ctrl_c(timeout=60)
        output = process.output()
        assert stopped, f"{process.command!r} did not stop:\n{output}"
        # Within honcho's grace: after it, honcho SIGKILLs what is left, and says so.
        assert "SIGKILL" not in output, output
