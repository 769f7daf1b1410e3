"""Prometheus metrics of the rates pipeline (docs/operations.md#metrics).

They live in the default registry, so whatever serves `/metrics` in a process exports them.
Label values are bounded: provider names (derived ones are `a+b` of two known names), rejection
reasons from `rates.validation` (a fixed handful), and tracked pair codes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FETCH_CYCLES = Counter(
    "kurs_fetch_cycles_total",
    "REST fetch cycles run, by outcome (ok: at least one provider returned valid quotes).",
    ["outcome"],
)
FETCH_DURATION = Histogram(
    "kurs_fetch_cycle_seconds",
    "Duration of one REST fetch cycle over every provider.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUOTES_ACCEPTED = Counter(
    "kurs_quotes_accepted_total", "Quotes that passed validation, by provider.", ["provider"]
)
QUOTES_REJECTED = Counter(
    "kurs_quotes_rejected_total",
    "Quotes refused by validation, by provider and reason.",
    ["provider", "reason"],
)
RATES_STORED = Counter(
    "kurs_rates_stored_total", "Rate rows written to the history, by provider.", ["provider"]
)
PROVIDER_ERRORS = Counter(
    "kurs_provider_errors_total",
    "Failed provider calls (REST rounds and stream connections), by provider and kind.",
    ["provider", "kind"],
)
CIRCUIT_STATE = Gauge(
    "kurs_circuit_state",
    "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open.",
    ["provider"],
    # Aggregated over processes (PROMETHEUS_MULTIPROC_DIR): the worst state any live one sees.
    multiprocess_mode="livemax",
)
RATE_AGE = Gauge(
    "kurs_rate_age_seconds",
    "Age of the source time of the last accepted quote per pair, when it was accepted.",
    ["pair"],
    multiprocess_mode="livemin",
)
RATE_STATUS = Gauge(
    "kurs_rate_status",
    "Status of each pair's current rate, as its owner last wrote it: 0 live, 1 failover, 2 stale.",
    ["pair"],
    multiprocess_mode="livemax",
)
RATE_CHECKED = Gauge(
    "kurs_rate_checked_timestamp_seconds",
    "When a source last confirmed each pair's current rate (its checked_at, Unix time), as "
    "written by the owner: time() minus this is the rate's age now.",
    ["pair"],
    multiprocess_mode="livemax",
)
QUOTES_EXCLUDED = Counter(
    "kurs_quotes_excluded_total",
    "Sources a consensus left out of a pair's value, by provider and reason "
    "(counted when the exclusion starts).",
    ["provider", "reason"],
)
PROVIDER_EXCLUDED = Gauge(
    "kurs_provider_excluded_seconds",
    "How long a consensus has left each provider out of at least one pair without interruption, "
    "as the owner observes it (0: included everywhere).",
    ["provider"],
    multiprocess_mode="livemax",
)
FAILOVERS = Counter(
    "kurs_failovers_total",
    "Times a pair went to failover, by pair and the lower-priority provider that took it over.",
    ["pair", "provider"],
)
OWNER_LEASE_HELD = Gauge(
    "kurs_owner_lease_held",
    "1 while this process owns live state (holds the owner's lease and writes rates), else 0.",
    # Summed over live processes: 1 when one owner runs, 0 when none (the alert's case).
    multiprocess_mode="livesum",
)
OWNER_SHARDS_HELD = Gauge(
    "kurs_owner_shards_held",
    "Shards of live state this process owns (KURS_OWNER_SHARDS; 1 while it owns, with one shard).",
    # Summed over live processes: KURS_OWNER_SHARDS when every shard has its owner.
    multiprocess_mode="livesum",
)

PEG_STATE = Gauge(
    "kurs_peg_state",
    "State of each peg of KURS_PEGS (ASSET-REFERENCE) as the owner measures it: 0 ok, 1 broken "
    "(pairs priced through it are converted and marked depeg), 2 unknown (no evidence).",
    ["peg"],
    multiprocess_mode="livemax",
)
PEG_DEVIATION = Gauge(
    "kurs_peg_deviation",
    "Measured value of each peg's asset in its reference, minus 1 (-0.03: 3 % below parity).",
    ["peg"],
    multiprocess_mode="livemax",
)

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
STATUS_VALUES = {"live": 0, "failover": 1, "stale": 2, "thin": 3, "depeg": 4}
PEG_VALUES = {"ok": 0, "broken": 1, "unknown": 2}
