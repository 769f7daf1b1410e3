"""`/courses` through the repo's nginx (`deploy/nginx.conf`), its cache on and off, beside nginx
serving the same bytes as a static file.

    .venv/bin/python bench/bench_nginx_cache.py [--duration 4] [--repeats 3] [--connections 64]

Kurs as `bench/bench_courses.py` serves it (2 workers, production settings, SQLite, a nats-server
of its own); in front of it Debian's nginx, twice: with `deploy/nginx.conf` as rendered for
compose (the `/courses` cache on: `proxy_cache` with `proxy_cache_lock`), and with the same file
but `proxy_cache off` in `/courses`' location (every request proxied, as before the cache); and a
third nginx serving `/courses`' bytes as a static file (the ceiling). wrk loads each in turns,
medians of --repeats runs, with the ratio to the static file and the CPU time every process of
each set used per request (nginx's and Kurs's together, for the proxied ones).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_courses import (  # noqa: E402
    COURSES,
    GROUPS,
    Figure,
    capture_bodies,
    get,
    group_cpu,
    kurs_cmd,
    nginx_cmd,
    prepare,
    running,
    warm,
)
from wrk import bench_run, wrk  # noqa: E402

from tests.prod_stack import nginx_main_conf, render_template  # noqa: E402
from tests.services import free_port  # noqa: E402

TEMPLATE = REPO / "deploy" / "nginx.conf"
RATE = "100000r/s"  # the template's per-client limit stays in the path, out of the way


def front_conf(tmp: Path, name: str, port: int, upstream: int, cache: bool) -> list[str]:
    """nginx running deploy/nginx.conf on `port` in front of Kurs on `upstream`."""
    folder = tmp / name
    folder.mkdir()
    folder.chmod(0o755)  # nginx's workers (another user) create and use the cache inside
    site = render_template(
        TEMPLATE.read_text(),
        {
            "KURS_NGINX_LISTEN": f"127.0.0.1:{port}",
            "KURS_WEB_UPSTREAM": [f"127.0.0.1:{upstream}"],
            "KURS_NGINX_API_RATE": RATE,
            "KURS_NGINX_API_BURST": "100000",
            "KURS_NGINX_CACHE_DIR": str(folder / "cache"),
        },
    )
    if not cache:
        site = site.replace("proxy_cache kurs_courses;", "proxy_cache off;")
        assert "proxy_cache off;" in site
    (folder / "site.conf").write_text(site)
    conf = nginx_main_conf(folder, folder / "site.conf")
    # The bench's nginx logs nothing per request, as the static baseline.
    conf.write_text(
        conf.read_text().replace(f"access_log {folder}/nginx-access.log;", "access_log off;")
    )
    return ["nginx", "-c", str(conf), "-p", str(folder), "-g", "daemon off;"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    with bench_run("kurs-bench-nginx-", ("wrk", "nginx")) as (tmp, nats_port):
        run(args, tmp, prepare(tmp, nats_port, "INFO"))


def run(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> None:
    courses, _ = capture_bodies(tmp, env)
    kurs_port, cached_port, proxied_port, static_port = (free_port() for _ in range(4))
    with (
        running(kurs_cmd("config.asgi:application", kurs_port, 2), env, kurs_port, COURSES) as kurs,
        running(
            front_conf(tmp, "cached", cached_port, kurs_port, True), env, cached_port, COURSES
        ) as cached,
        running(
            front_conf(tmp, "proxied", proxied_port, kurs_port, False), env, proxied_port, COURSES
        ) as proxied,
        running(nginx_cmd(tmp, static_port, 2), env, static_port, COURSES) as static,
    ):
        for origin in (cached, proxied, static):
            warm(origin, COURSES, 2)
            assert get(origin + COURSES)[2] == courses, f"{origin} serves other bytes"
        status = get(cached + COURSES)[1].get("x-cache-status")
        assert status in ("HIT", "UPDATING", "STALE", "EXPIRED", "REVALIDATED"), status
        # The CPU of each set: nginx's processes, and Kurs's behind the two that proxy.
        sets = {
            "cached": (cached, [GROUPS[cached], GROUPS[kurs]]),
            "proxied": (proxied, [GROUPS[proxied], GROUPS[kurs]]),
            "static": (static, [GROUPS[static]]),
        }
        runs: dict[str, list[Figure]] = {label: [] for label in sets}
        for _ in range(args.repeats):  # in turns: the machine's other load spreads over all
            for label, (origin, groups) in sets.items():
                cpu = sum(group_cpu(group) for group in groups)
                rps, p99, count = wrk(origin + COURSES, args.duration, args.connections)
                used = sum(group_cpu(group) for group in groups) - cpu
                runs[label].append((rps, p99, used / count * 1e6))
    medians = {
        label: tuple(statistics.median(figure[i] for figure in got) for i in range(3))
        for label, got in runs.items()
    }
    print(
        f"wrk -t1 -c{args.connections}, {args.repeats} x {args.duration:g} s each, medians; "
        f"Kurs 2 workers, KURS_LOG_LEVEL=INFO; nginx worker_processes 2"
    )
    print(f"{'/courses':<44} {'req/s':>9} {'p99 ms':>8} {'CPU us':>7} {'÷ static':>9}")
    static_rps = medians["static"][0]
    for label, title in (
        ("proxied", "through nginx, cache off (before)"),
        ("cached", "through nginx, proxy_cache + lock (after)"),
        ("static", "nginx static file, same bytes"),
    ):
        rps, p99, cpu = medians[label]
        print(f"{title:<44} {rps:>9,.0f} {p99:>8.2f} {cpu:>7.0f} {rps / static_rps:>8.2f}x")


if __name__ == "__main__":
    main()
