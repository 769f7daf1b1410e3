"""The production shape's files (docs/operations.md#deploying-with-docker-compose):
docker-compose.yml, Dockerfile, deploy/, .env.example.

There is no Docker engine in CI, so the files are checked for what `docker compose up --build`
relies on: the Compose Specification's JSON schema (the copy the check-jsonschema package
vendors from compose-spec/compose-spec, pinned in requirements-dev.txt), that it
starts as typed without a `.env` and warns about its local defaults, pinned images, a slim
non-root app image, healthchecks, migrations first, nginx's proxying rules (and `nginx -t` on the
rendered template with Debian's nginx), and Prometheus scraping every process that has metrics
(`promtool check config`). `make test-prod` runs the same process set natively.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import nats
import pytest
import yaml

from edge.caching import IN_FRONT, NO_STORE
from tests.prod_stack import nginx_cmd, nginx_main_conf, render_template
from tests.services import (
    ROOT,
    START_TIMEOUT,
    NatsServer,
    free_port,
    in_ci,
    jetstream_ready,
    wait_for_port,
)

COMPOSE = ROOT / "docker-compose.yml"
CLUSTER = ROOT / "docker-compose.cluster.yml"
NGINX = ROOT / "deploy" / "nginx.conf"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
ENTRYPOINT = ROOT / "scripts" / "docker-entrypoint.sh"
APP_SERVICES = ("migrate", "web", "fetcher", "qcluster")


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


# --- several compose files, merged as `docker compose -f a -f b` does ------------------------
@dataclass(frozen=True)
class Tagged:
    """A value with Compose's merge tag: `!reset` (remove) or `!override` (replace)."""

    tag: str
    value: Any


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading Compose's `!reset` and `!override` tags."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return Tagged(node.tag, value)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged)

# Attributes whose later value replaces the earlier one instead of being appended (the
# Compose Specification's merge rules: "Shell commands").
REPLACED = {"command", "entrypoint", "test"}


def merged(base: Any, later: Any, key: str = "") -> Any:
    """`later` merged over `base` by the Compose Specification's rules (mappings merged,
    sequences appended, commands replaced, `!reset` removes, `!override` replaces)."""
    if isinstance(later, Tagged):
        return later.value
    if isinstance(base, dict) and isinstance(later, dict):
        out = dict(base)
        for name, value in later.items():
            if isinstance(value, Tagged) and value.tag == "!reset":
                out.pop(name, None)
            else:
                out[name] = merged(out.get(name, {}), value, name)
        return out
    if isinstance(base, list) and isinstance(later, list) and key not in REPLACED:
        return base + [value for value in later if value not in base]
    return later


@cache
def cluster_compose() -> dict[str, Any]:
    """docker-compose.yml with docker-compose.cluster.yml over it."""
    return merged(compose(), yaml.load(CLUSTER.read_text(), Loader=ComposeLoader))


def started(model: dict[str, Any], profiles: tuple[str, ...] = ()) -> set[str]:
    """The services `docker compose up` starts with `profiles` active."""
    return {
        name
        for name, service in model["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (`make prod-tools` installs Debian's)"
        if in_ci():
            pytest.fail(f"{message}; CI=true")
        pytest.skip(message)
    return path


# --- compose interpolation, as `docker compose` does it with no .env and an empty environment --
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)((?::?[-?]).*)?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """`${VAR}`, `${VAR:-default}`, `${VAR-default}` (defaults nested) and `${VAR:?error}`."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if not text.startswith("${", i):
            out.append(text[i])
            i += 1
            continue
        depth, j = 0, i
        while True:  # the matching brace, defaults may nest ${...}
            if text.startswith("${", j):
                depth, j = depth + 1, j + 2
                continue
            if text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        match = _REFERENCE.fullmatch(text[i : j + 1])
        assert match, f"not an interpolation: {text[i : j + 1]}"
        name, tail = match.group(1), match.group(2) or ""
        value = env.get(name)
        if tail.startswith((":?", "?")):
            if not value:
                raise LookupError(f"{name}: {tail.lstrip(':?')}")
            out.append(value)
        elif tail.startswith((":-", "-")):
            if value is None or (tail.startswith(":") and value == ""):
                out.append(interpolate(tail[2:] if tail.startswith(":") else tail[1:], env))
            else:
                out.append(value)
        else:
            out.append(value or "")
        i = j + 1
    return "".join(out)


def references(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [ref for key, value in node.items() for ref in references(key) + references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in references(value)]
    if isinstance(node, str):
        return re.findall(r"\$\{[^}]*\}?", node)
    return []


def resolved(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: resolved(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


# --- the Compose Specification -----------------------------------------------------------------
@cache
def compose_validator() -> jsonschema.protocols.Validator:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema)


def test_the_compose_file_follows_the_compose_specification() -> None:
    errors = [f"{list(e.path)}: {e.message}" for e in compose_validator().iter_errors(compose())]
    assert errors == []


def test_the_schema_check_catches_a_misspelt_key() -> None:
    broken = json.loads(json.dumps(compose()))
    broken["services"]["web"]["healthcheck"]["intervall"] = "15s"
    assert not compose_validator().is_valid(broken)


# --- as typed, without .env ----------------------------------------------------------------------
def test_it_starts_without_a_dotenv_every_variable_has_a_default() -> None:
    no_default = [ref for ref in references(compose()) if ":-" not in ref]
    assert no_default == []  # `${VAR}` alone is empty, `${VAR:?...}` stops compose
    for name in APP_SERVICES:
        assert services()[name]["env_file"] == [{"path": ".env", "required": False}]
    env = resolved(services()["web"]["environment"], {})
    password = resolved(services()["postgres"]["environment"], {})["POSTGRES_PASSWORD"]
    assert env["DATABASE_URL"] == f"postgres://kurs:{password}@postgres:5432/kurs"
    assert env["DJANGO_DEBUG"] == "false"
    assert env["KURS_LOG_FORMAT"] == "json"


def test_a_dotenv_with_secrets_replaces_the_local_defaults() -> None:
    secrets = {"DJANGO_SECRET_KEY": "s" * 50, "POSTGRES_PASSWORD": "pg-secret"}
    env = resolved(services()["fetcher"]["environment"], secrets)
    assert env["DJANGO_SECRET_KEY"] == "s" * 50
    assert env["DATABASE_URL"] == "postgres://kurs:pg-secret@postgres:5432/kurs"
    external = resolved(services()["web"]["environment"], {"NATS_URL": "nats://a:4222,nats://b"})
    assert external["NATS_URL"] == "nats://a:4222,nats://b"


def run_entrypoint(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), "sh", "-c", 'echo "hosts=$DJANGO_ALLOWED_HOSTS"'],
        env={
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "DJANGO_SECRET_KEY": env["DJANGO_SECRET_KEY"],
            "DATABASE_URL": env["DATABASE_URL"],
            "DJANGO_ALLOWED_HOSTS": "web",
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


def test_the_local_defaults_print_that_they_are_not_for_production() -> None:
    web = services()["web"]["environment"]
    warned = run_entrypoint(resolved(web, {}))
    assert "not for production" in warned.stderr
    assert "See .env.example" in warned.stderr
    secrets = {"DJANGO_SECRET_KEY": "a-real-secret-" + "x" * 40, "POSTGRES_PASSWORD": "pg-secret"}
    # A real secret key alone still leaves the database on its published password.
    half = run_entrypoint(resolved(web, {"DJANGO_SECRET_KEY": secrets["DJANGO_SECRET_KEY"]}))
    assert "not for production" in half.stderr
    quiet = run_entrypoint(resolved(web, secrets))
    assert quiet.stderr == ""
    # The container's own address joins the allowed hosts (Prometheus scrapes web by address).
    assert re.fullmatch(r"hosts=web(,\d+\.\d+\.\d+\.\d+)+\n", quiet.stdout), quiet.stdout


def test_dotenv_example_documents_the_production_secrets_and_every_compose_variable() -> None:
    example = (ROOT / ".env.example").read_text()
    for secret in ("DJANGO_SECRET_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"^{secret}=$", example, re.M), f"{secret}= (empty, to be set)"
    names = set()
    for ref in references(compose()) + references(cluster_compose()):
        match = re.match(r"\$\{(\w+)", ref)
        assert match, f"not a variable reference: {ref}"
        names.add(match.group(1))
    undocumented = sorted(name for name in names if not re.search(rf"^#? ?{name}=", example, re.M))
    assert undocumented == []


# --- images ------------------------------------------------------------------------------------
def test_every_image_is_pinned_by_digest_or_exact_version() -> None:
    # An exact release: x.y.z, or x.y for PostgreSQL (its releases have two parts since 10).
    exact = re.compile(r"@sha256:[0-9a-f]{64}$|:v?(\d+\.\d+\.\d+|(?<=postgres:)\d+\.\d+)(-\w+)?$")
    for name, service in cluster_compose()["services"].items():  # every service of both files
        if "build" in service:
            continue  # the app image, built from this clone (its base is pinned: below)
        assert exact.search(service["image"]), f"{name}: {service['image']} is not pinned"
    assert not exact.search("nats:2.10-alpine")
    assert not exact.search("redis:7-alpine")


def test_the_app_image_is_slim_non_root_and_serves_with_serve_sh() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-bookworm", lines[0])
    user = [line for line in lines if line.startswith("USER ")][-1].split()[1]
    assert user not in ("root", "0")
    assert json.loads(lines[-1].removeprefix("CMD ")) == ["scripts/serve.sh"]
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT "))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT ")) == ["scripts/docker-entrypoint.sh"]
    assert ENTRYPOINT.stat().st_mode & 0o111
    assert (ROOT / "scripts" / "serve.sh").stat().st_mode & 0o111
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


# --- the process set ---------------------------------------------------------------------------
def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in cluster_compose()["services"].items():  # every service of both files
        if service.get("restart") == "no":
            continue  # migrate: a one-shot job, its success gates the others
        test = service.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test}"


def test_migrations_run_once_before_anything_uses_the_database() -> None:
    migrate = services()["migrate"]
    assert migrate["command"] == ["python", "manage.py", "migrate", "--no-input"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "fetcher", "qcluster"):
        assert services()[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_two_web_replicas_behind_nginx_which_waits_for_them() -> None:
    web, nginx = services()["web"], services()["nginx"]
    assert web["deploy"]["replicas"] == 2
    assert "command" not in web  # the image's CMD: scripts/serve.sh
    assert web["environment"]["KURS_WEB_WORKERS"] == "1"
    assert nginx["depends_on"]["web"]["condition"] == "service_healthy"
    assert nginx["environment"]["KURS_WEB_UPSTREAM"] == f"web:{web['environment']['KURS_PORT']}"


def test_prometheus_scrapes_web_fetcher_and_qcluster_where_they_listen() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    web = jobs["kurs-web"]["dns_sd_configs"][0]
    assert (web["names"], web["port"]) == (
        ["web"],
        int(services()["web"]["environment"]["KURS_PORT"]),
    )
    for name in ("fetcher", "qcluster"):
        service = services()[name]
        port = service["environment"]["KURS_METRICS_PORT"]
        assert service["environment"]["KURS_METRICS_HOST"] == "0.0.0.0"
        assert port in service["expose"]
        assert jobs[f"kurs-{name}"]["static_configs"][0]["targets"] == [f"{name}:{port}"]
    # qcluster's tasks run in forked workers: their metrics meet in a directory of its own.
    qcluster = services()["qcluster"]
    assert qcluster["environment"]["PROMETHEUS_MULTIPROC_DIR"] in qcluster["tmpfs"]


def test_prometheus_config_passes_promtool() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- nginx -------------------------------------------------------------------------------------
def compose_nginx_values() -> dict[str, str]:
    env = resolved(services()["nginx"]["environment"], {})
    return {key: value for key, value in env.items() if key.startswith("KURS_")}


def test_compose_renders_the_nginx_template_like_its_image_does() -> None:
    nginx = services()["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/templates/default.conf.template:ro" in nginx["volumes"]
    assert nginx["environment"]["NGINX_ENVSUBST_FILTER"] == "^KURS_"
    rendered = render_template(NGINX.read_text(), compose_nginx_values())
    assert "${" not in rendered
    assert "server web:8000 max_fails=3 fail_timeout=10s;" in rendered
    assert "rate=50r/s;" in rendered
    assert "$binary_remote_addr" in rendered  # nginx's own variables stay


def test_a_list_value_repeats_its_line_and_a_missing_one_is_an_error() -> None:
    template = "upstream u {\n    server ${UP} max_fails=3;\n}\nlisten ${PORT};\n"
    rendered = render_template(template, {"UP": ["127.0.0.1:1", "127.0.0.1:2"], "PORT": "80"})
    assert rendered == (
        "upstream u {\n    server 127.0.0.1:1 max_fails=3;\n    server 127.0.0.1:2 max_fails=3;\n"
        "}\nlisten 80;\n"
    )
    with pytest.raises(KeyError, match="PORT"):
        render_template(template, {"UP": "x"})


def blocks(conf: str) -> dict[str, str]:
    """`location ... {` -> its body (nginx.conf's locations hold no nested blocks)."""
    return {
        match.group(1).strip(): match.group(2)
        for match in re.finditer(r"location\s+([^{]+)\{([^}]*)\}", conf)
    }


def test_nginx_proxies_websocket_and_sse_with_gzip_timeouts_and_a_rate_limit() -> None:
    conf = render_template(NGINX.read_text(), compose_nginx_values())
    conf = re.sub(r"#.*", "", conf)  # comments mention directives and braces
    server = conf[conf.index("server {") :]
    locations = blocks(server)
    ws = locations["/ws/"]
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert "proxy_set_header Connection $connection_upgrade;" in ws
    sse = locations["= /api/v1/stream"]
    assert "proxy_buffering off;" in sse
    assert "gzip off;" in sse
    assert "limit_req zone=kurs_api" in sse
    assert "limit_req zone=kurs_api" in locations["/api/"]
    assert re.search(r"^\s*gzip on;", server, re.M)
    assert "text/event-stream" not in server.split("gzip_types", 1)[1].split(";", 1)[0]
    for directive in ("proxy_connect_timeout", "client_body_timeout", "send_timeout"):
        assert re.search(rf"^\s*{directive} \d+s;", server, re.M), directive
    assert "proxy_read_timeout 30s;" in locations["/api/"]
    assert "return 404;" in locations["= /metrics"]
    for body in locations.values():
        if "proxy_pass" in body:
            assert "proxy_set_header Host $host;" in body
            assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in body


def test_debians_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    require_tool("nginx")
    site = tmp_path / "site.conf"
    values: dict[str, str | list[str]] = {
        **compose_nginx_values(),
        "KURS_NGINX_LISTEN": "127.0.0.1:1",
        "KURS_WEB_UPSTREAM": ["127.0.0.1:2", "127.0.0.1:3"],
        "KURS_NGINX_CACHE_DIR": str(tmp_path / "cache"),
    }
    site.write_text(render_template(NGINX.read_text(), values))
    result = subprocess.run(
        nginx_cmd(nginx_main_conf(tmp_path, site), tmp_path, "-t"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- /courses cached in front (docs/operations.md#caches-in-front) ------------------------------
class Upstream:
    """A web process stand-in behind nginx: `/api/v1/courses` answers with Kurs's Cache-Control
    (edge.caching) and the number of requests it got for that query; `direction=BAD` is a 422
    that says no-store, as every Kurs error does."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with upstream.lock:
                    count = upstream.counts[self.path] = upstream.counts.get(self.path, 0) + 1
                bad = "direction=BAD" in self.path
                body = json.dumps({"path": self.path, "count": count}).encode()
                self.send_response(422 if bad else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", NO_STORE if bad else IN_FRONT)
                self.send_header("X-Request-ID", self.headers.get("X-Request-ID", ""))
                if not bad:
                    self.send_header("ETag", f'"{hash(self.path) & 0xFFFF:x}-{count}"')
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_nginx_caches_courses_by_query_and_never_an_error(tmp_path: Path) -> None:
    require_tool("nginx")
    shared = Path(tempfile.mkdtemp(prefix="kurs-nginx-cache-"))
    shared.chmod(0o755)
    upstream = Upstream()
    port = free_port()
    site = tmp_path / "site.conf"
    values: dict[str, str | list[str]] = {
        **compose_nginx_values(),
        "KURS_NGINX_LISTEN": f"127.0.0.1:{port}",
        "KURS_WEB_UPSTREAM": [f"127.0.0.1:{upstream.port}"],
        # nginx's workers run as another user, and pytest's folders are the owner's alone.
        "KURS_NGINX_CACHE_DIR": str(shared / "cache"),
    }
    site.write_text(render_template(NGINX.read_text(), values))
    nginx = subprocess.Popen(
        nginx_cmd(nginx_main_conf(tmp_path, site), tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, START_TIMEOUT, nginx)
        origin = f"http://127.0.0.1:{port}/api/v1/courses"
        with httpx.Client(timeout=5) as client:
            first = client.get(origin)
            second = client.get(origin)
            assert first.status_code == second.status_code == 200
            assert first.headers["x-cache-status"] == "MISS"
            assert second.headers["x-cache-status"] == "HIT"
            assert second.content == first.content  # one request reached the upstream
            assert first.headers["x-request-id"] != second.headers["x-request-id"]
            assert (
                client.get(origin, headers={"If-None-Match": first.headers["etag"]}).status_code
                == 304
            )
            # Another query string is another answer.
            filtered = client.get(origin + "?direction=BTC-USD")
            assert filtered.headers["x-cache-status"] == "MISS"
            assert filtered.json()["path"] == "/api/v1/courses?direction=BTC-USD"
            # An error is never kept: each one reaches the upstream.
            errors = [client.get(origin + "?direction=BAD") for _ in range(3)]
            assert [e.status_code for e in errors] == [422] * 3
            assert [e.json()["count"] for e in errors] == [1, 2, 3]
            # Many clients at once on a cold query: one request reaches the upstream.
            cold = origin + "?exchanger=binance"
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: httpx.get(cold, timeout=5), range(16)))
            assert {a.status_code for a in answers} == {200}
            assert {a.json()["count"] for a in answers} == {1}
        assert upstream.counts["/api/v1/courses"] == 1
        assert upstream.counts["/api/v1/courses?exchanger=binance"] == 1
    finally:
        nginx.terminate()
        nginx.wait(10)
        upstream.close()
        shutil.rmtree(shared, ignore_errors=True)


@dataclass
class ComposeNatsNode(NatsServer):
    """A node of `docker-compose.cluster.yml`, run natively with its own command:
    only the hosts are mapped to loopback ports (`nats-2:6222` -> `127.0.0.1:<port>`)."""

    command: tuple[str, ...] = ()

    def arguments(self) -> list[str]:
        return [*self.command, "-a", "127.0.0.1", "-p", str(self.port)]


def test_the_cluster_file_starts_three_nodes_not_the_single_one_and_kurs_waits_for_them() -> None:
    single, cluster = compose(), cluster_compose()
    assert "nats" in started(single)  # the default stays one server
    assert not started(single) & {"nats-1", "nats-2", "nats-3"}
    assert {"nats-1", "nats-2", "nats-3"} <= started(cluster)
    assert "nats" not in started(cluster)  # no idle single server beside the cluster
    for name in started(cluster):
        needs = set(cluster["services"][name].get("depends_on", {}))
        assert needs <= started(cluster), f"{name} waits for a service not started: {needs}"
    env: dict[str, str] = {}
    for name in ("web", "fetcher", "qcluster"):
        service = resolved(cluster["services"][name], env)
        assert service["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
            **{node: {"condition": "service_healthy"} for node in ("nats-1", "nats-2", "nats-3")},
        }
        assert service["environment"]["NATS_URL"] == ",".join(
            f"nats://nats-{n}:4222" for n in (1, 2, 3)
        )
        assert service["environment"]["KURS_NATS_REPLICAS"] == "3"
        assert service["environment"]["DJANGO_DEBUG"] == "false"  # the rest merged, not lost
    assert resolved(cluster["services"]["migrate"], env)["depends_on"] == {
        "postgres": {"condition": "service_healthy"}
    }
    errors = [f"{list(e.path)}: {e.message}" for e in compose_validator().iter_errors(cluster)]
    assert errors == []


def test_the_merge_follows_compose_s_rules() -> None:
    base = {"a": {"x": 1, "y": [1]}, "command": ["a"], "b": 2}
    later = {
        "a": {"y": [2], "z": 3},
        "command": ["b"],
        "b": Tagged("!reset", None),
        "c": Tagged("!override", {"q": 1}),
    }
    assert merged(base, later) == {
        "a": {"x": 1, "y": [1, 2], "z": 3},
        "command": ["b"],
        "c": {"q": 1},
    }
    assert merged({"d": {"k": 1}}, {"d": Tagged("!override", {"j": 2})}) == {"d": {"j": 2}}


def test_the_cluster_file_forms_one_jetstream_cluster_of_three(tmp_path: Path) -> None:
    nodes = {name: cluster_compose()["services"][name] for name in ("nats-1", "nats-2", "nats-3")}
    route_ports = {name: free_port() for name in nodes}
    mapped = {
        f"nats://{name}:6222": f"nats://127.0.0.1:{port}" for name, port in route_ports.items()
    }
    running: list[ComposeNatsNode] = []
    try:
        for name, node in nodes.items():
            assert node["volumes"] == [f"{name}:/data"]  # a store of its own
            command = list(node["command"])
            command[command.index("/data")] = str(tmp_path / name)
            command[command.index("8222")] = str(free_port())
            command[command.index("nats://0.0.0.0:6222")] = mapped[f"nats://{name}:6222"]
            routes = command.index("--routes") + 1
            peers = command[routes].split(",")
            assert sorted(peers) == sorted(r for r in mapped if r != f"nats://{name}:6222")
            command[routes] = ",".join(mapped[peer] for peer in peers)
            server = ComposeNatsNode(port=free_port(), command=tuple(command))
            server.start()
            running.append(server)
        # A JetStream meta leader is elected only when the three are one cluster.
        asyncio.run(jetstream_ready([server.url for server in running], within=30.0))
        asyncio.run(_placed_with_three_replicas([server.url for server in running]))
    finally:
        for server in running:
            server.kill()


async def _placed_with_three_replicas(urls: list[str]) -> None:
    client = await nats.connect(urls)
    try:
        js = client.jetstream(timeout=5)
        info = await js.add_stream(name="PROFILECHECK", subjects=["profilecheck.>"], num_replicas=3)
        assert info.config.num_replicas == 3
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2  # and the leader
    finally:
        await client.close()
