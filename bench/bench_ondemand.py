"""Upstream requests per 1,000 distinct random on-demand pairs, next to the listing bound.

    .venv/bin/python bench/bench_ondemand.py [--pairs 1000] [--concurrency 20] [--app-dir DIR]

Real processes: the exchange emulator (`manage.py run_emulator`, from this tree: it counts every
request it serves) and Kurs's web server (uvicorn `config.asgi:application`, one worker, from
`--app-dir`, this tree by default; pass an export of an older commit to measure "before", e.g.
`git archive e4310d8 | tar -x -C /tmp/kurs-before`). One client sends each pair once, half as
`GET /api/v1/rates/{base}/{quote}` and half as `GET /api/v1/convert`, `--concurrency` at a time;
a 429 is retried after its Retry-After, as a well-behaved client would. No fetcher runs, so even
the default items are priced on demand.

The baseline printed beside the count is the bound the on-demand design promises: each
provider's market-wide listing at most once per its listing interval over the run's duration
(`rates.ondemand.listing_interval`), plus one listing each at the start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")

import django  # noqa: E402

django.setup()

import httpx  # noqa: E402

from rates.ondemand import listing_interval  # noqa: E402
from rates.providers import PROVIDER_CLASSES, CBRProvider  # noqa: E402
from rates.providers.base import FIAT_CODES  # noqa: E402
from rates.providers.coingecko import COIN_IDS  # noqa: E402
from tests.services import free_port, wait_for_port  # noqa: E402

PYTHON = sys.executable
# What clients ask for: listed coins, fiat currencies, and codes no provider knows.
CRYPTO = [*COIN_IDS, "USDTTRC", "USDTERC", "ADA"]
FIAT = ["USD", "RUB", *sorted(FIAT_CODES & CBRProvider.CURRENCIES - {"USD"})[:14]]
UNKNOWN = [f"ZQ{n}" for n in range(6)]


def random_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    assets = CRYPTO + FIAT + UNKNOWN
    if count > len(assets) * (len(assets) - 1):
        raise SystemExit(f"--pairs: at most {len(assets) * (len(assets) - 1)} distinct pairs")
    rng = random.Random(seed)
    pairs: dict[tuple[str, str], None] = {}
    while len(pairs) < count:
        base, quote = rng.sample(assets, 2)
        pairs[(base, quote)] = None
    return list(pairs)


async def ask_all(
    web: str, pairs: list[tuple[str, str]], concurrency: int
) -> tuple[Counter[int], int]:
    """Each pair once; (final statuses, 429s met on the way)."""
    statuses: Counter[int] = Counter()
    refusals = 0
    queue: asyncio.Queue[tuple[int, tuple[str, str]]] = asyncio.Queue()
    for index, pair in enumerate(pairs):
        queue.put_nowait((index, pair))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal refusals
        while not queue.empty():
            index, (base, quote) = queue.get_nowait()
            if index % 2:
                url, params = f"/api/v1/rates/{base}/{quote}", None
            else:
                url, params = "/api/v1/convert", {"from": base, "to": quote, "amount": "1"}
            while True:
                response = await client.get(url, params=params)
                if response.status_code != 429:
                    break
                refusals += 1
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            statuses[response.status_code] += 1

    async with httpx.AsyncClient(base_url=web, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses, refusals


def bound(elapsed: float) -> int:
    return sum(
        (1 + math.floor(elapsed / listing_interval(cls))) * cls.listing_requests
        for cls in PROVIDER_CLASSES.values()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--app-dir", type=Path, default=ROOT, help="the Kurs tree to serve")
    parser.add_argument(
        "--no-budget",
        action="store_true",
        help="lift the on-demand round budgets, so only the listings bound the traffic",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args()
    app_dir = args.app_dir.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="kurs-bench-ondemand-"))
    web_log = (tmp / "web.log").open("wb")
    emu_port, web_port = free_port(), free_port()
    emulator = f"http://127.0.0.1:{emu_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KURS_", "DATABASE_URL"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DJANGO_DEBUG": "true",
            "DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3",
            "KURS_SHARED_CACHE_DIR": str(tmp / "shared"),
            "KURS_NATS_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
            "KURS_LOG_LEVEL": "ERROR",
            "KURS_BINANCE_REST_URL": f"{emulator}/binance",
            "KURS_BYBIT_REST_URL": f"{emulator}/bybit",
            "KURS_COINGECKO_REST_URL": f"{emulator}/coingecko",
            "KURS_CBR_REST_URL": f"{emulator}/cbr",
        }
    )
    if args.no_budget:
        env["KURS_ONDEMAND_RATE"] = env["KURS_ONDEMAND_CLIENT_RATE"] = "1000000"
    subprocess.run([PYTHON, "manage.py", "migrate", "-v", "0"], cwd=app_dir, env=env, check=True)
    procs = [
        subprocess.Popen(
            [PYTHON, "manage.py", "run_emulator", "--port", str(emu_port), "--tick", "1"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                *(PYTHON, "-m", "uvicorn", "config.asgi:application", "--port", str(web_port)),
                *("--workers", "1", "--lifespan", "on", "--no-access-log", "--log-level", "error"),
            ],
            cwd=app_dir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=web_log,
        ),
    ]
    try:
        wait_for_port(emu_port, 60.0, procs[0])
        wait_for_port(web_port, 60.0, procs[1])
        httpx.delete(f"{emulator}/_control/requests").raise_for_status()
        pairs = random_pairs(args.pairs, args.seed)
        started = time.perf_counter()
        statuses, refusals = asyncio.run(
            ask_all(f"http://127.0.0.1:{web_port}", pairs, args.concurrency)
        )
        elapsed = time.perf_counter() - started
        counts = httpx.get(f"{emulator}/_control/requests").json()["counts"]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        web_log.close()
    total = sum(counts.values())
    if args.json:
        figures = {
            "pairs": len(pairs),
            "elapsed_s": round(elapsed, 3),
            "statuses": statuses,
            "refusals": refusals,
            "requests": counts,
            "bound": bound(elapsed),
        }
        print(json.dumps(figures))
        return
    per_1000 = total * 1000 / len(pairs)
    print(f"app: {app_dir}{' (round budgets lifted)' if args.no_budget else ''}")
    print(f"{len(pairs)} distinct pairs, concurrency {args.concurrency}, {elapsed:.1f} s")
    print(f"answers: {dict(sorted(statuses.items()))}; 429s retried: {refusals}")
    print(f"upstream requests: {total} ({per_1000:.0f} per 1,000 pairs, {total / elapsed:.1f}/s)")
    print(f"  by provider: {dict(sorted(counts.items()))}")
    print(f"baseline (listing bound for {elapsed:.1f} s): {bound(elapsed)} requests")


if __name__ == "__main__":
    main()
