"""No lost event: a NATS outage while prices move every second, and clients that resume by `seq`.

    .venv/bin/python bench/bench_outbox.py [--outage 10] [--repeat 3] [--before DIR]

Each round (`tests/outage.py`): a fresh SQLite database, a nats-server with JetStream (a store in
a temporary folder), the emulator in this process moving prices every second, `run_fetch
--watch` and one uvicorn web process. A WebSocket and an SSE client read rate events of BTC-USD
and ETH-USD and go away; NATS is stopped for `--outage` seconds; it comes back; both clients
resume from their last `seq` (`?since=`, `Last-Event-ID`). Printed per round and as medians:
the versions the database wrote that each client should get, how many it got, lost, duplicated,
out of order, and `gap` frames.

`--before DIR` runs the same rounds in the same run with the fetcher and the web process of
another checkout, the baseline: e.g. the commit before the transactional outbox,
`git worktree add --detach /tmp/kurs-before <commit>` (with `.venv` linked into it). The machine
is shared (2 cores, other sessions' work): counts, not timings, are the figures here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run as a script from bench/: the project's packages come from the repository root.
sys.path.insert(0, str(REPO))

from rates.emulator import run_emulator_server  # noqa: E402
from tests.outage import OutageResult, outage_round  # noqa: E402
from tests.services import NatsServer, free_port  # noqa: E402
from tests.stack import Stack  # noqa: E402


async def one_round(root: Path, folder: Path, outage: float) -> OutageResult:
    server = NatsServer(port=free_port(), store_dir=folder / "jetstream")
    server.start()
    try:
        async with run_emulator_server(host="127.0.0.1", port=0, tick=1.0) as emulator:
            stack = Stack(
                folder=folder, emulator=emulator, nats_url=server.url, poll=1.0, root=root
            )
            await asyncio.to_thread(stack.migrate)
            try:
                stack.fetcher()
                web = stack.web()
                return await outage_round(stack, web, server, outage_s=outage, within=90)
            finally:
                await asyncio.to_thread(stack.stop)
    finally:
        if server.process is not None:
            server.stop()


def report(name: str, results: list[OutageResult]) -> dict[str, float]:
    medians = {}
    for client in ("ws", "sse"):
        verdicts = [r.verdicts[client] for r in results]
        for figure in ("expected", "received", "lost", "duplicates", "out_of_order", "gaps"):
            medians[f"{client} {figure}"] = statistics.median(getattr(v, figure) for v in verdicts)
    moved = statistics.median(r.moved for r in results)
    print(f"{name}: median of {len(results)} rounds, {moved:g} versions written during the outage")
    for client in ("ws", "sse"):
        figures = ", ".join(
            f"{figure.replace('_', ' ')} {medians[f'{client} {figure}']:g}"
            for figure in ("expected", "received", "lost", "duplicates", "out_of_order", "gaps")
        )
        print(f"  {client:>3}: {figures}")
    return medians


async def run(args: argparse.Namespace) -> None:
    checkouts = [("after (this checkout)", REPO)]
    if args.before:
        checkouts.insert(0, ("before (" + str(args.before) + ")", Path(args.before).resolve()))
    results: dict[str, list[OutageResult]] = {name: [] for name, _ in checkouts}
    for n in range(args.repeat):
        for name, root in checkouts:  # interleaved: both see the same machine, round by round
            with tempfile.TemporaryDirectory(prefix="kurs-bench-outbox-") as folder:
                result = await one_round(root, Path(folder), args.outage)
            results[name].append(result)
            print(
                f"round {n + 1} {name}: NATS down {result.outage_s:.1f}s, "
                f"{result.moved} versions written meanwhile; "
                f"ws {result.verdicts['ws']}; sse {result.verdicts['sse']}",
                flush=True,
            )
    print()
    medians = {name: report(name, results[name]) for name, _ in checkouts}
    if args.before:
        before, after = (medians[name] for name, _ in checkouts)
        for client in ("ws", "sse"):
            print(
                f"versions lost by a resuming {client} client: "
                f"{before[f'{client} lost']:g} before, {after[f'{client} lost']:g} after"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=10.0, help="seconds NATS is down")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", help="another checkout to run the same rounds with")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
