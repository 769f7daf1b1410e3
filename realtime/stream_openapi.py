"""What `GET /api/v1/stream` answers, said in its OpenAPI operation (docs/events.md, "Server-Sent
Events").

OpenAPI 3.1 has no keyword for the items of an event stream, so the convention schema checkers
follow (schemathesis among them) is used: the `text/event-stream` schema describes one event as
the stream's parser reads it, `{"event", "data", "id", "retry"}`, and `data`, a JSON text, says
so with `contentMediaType` and gives the envelope's shape in `contentSchema`. Each event type's
`data` is checked by an `if`/`then` on the envelope's `type`, so an event of one type cannot
pass with another type's fields.

The response keys are integers, as django-ninja writes its own: a string "200" beside ninja's
200 became two "200" members in the JSON document, which Swagger UI refuses to parse.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

# A stream epoch as frames carry it (`realtime.nats.stream.stream_epoch`: base 36), with room to
# spare; what `epoch=` accepts (`realtime.options`), anything else being a client's mistake.
EPOCH_PATTERN = r"^[0-9a-z]{1,16}$"

_TIME: Schema = {"type": "string", "format": "date-time"}
_NUMBER: Schema = {"type": "number"}
_STATUS: Schema = {"type": "string", "enum": ["live", "failover", "stale", "thin", "depeg"]}
_DECIMAL_OR_NULL: Schema = {"type": ["number", "null"]}
_ROUTE: Schema = {
    "type": "array",
    "description": "a cross rate's legs as their providers quoted them; empty otherwise",
    "items": {
        "type": "object",
        "required": ["pair", "provider", "value", "source_time"],
        "properties": {
            "pair": {"type": "string"},
            "provider": {"type": "string"},
            "value": _NUMBER,
            "source_time": _TIME,
        },
    },
}
_RATE_FIELDS: Schema = {
    "direction": {"type": "string", "examples": ["BTC-USD"]},
    "value": _NUMBER,
    "provider": {"type": "string", "description": "the serving provider (`a+b`: a cross rate)"},
    "source_time": _TIME,
    "checked_at": _TIME,
    "status": _STATUS,
    "derived": {"type": "boolean"},
    "route": _ROUTE,
    "version": {"type": "integer", "description": "+1 on every published change of the pair"},
}


def _object(properties: Schema, description: str = "", optional: Schema | None = None) -> Schema:
    schema: Schema = {
        "type": "object",
        "required": list(properties),
        "properties": {**properties, **(optional or {})},
    }
    if description:
        schema["description"] = description
    return schema


_PEG = _object(
    {
        "asset": {"type": "string", "examples": ["USDT"]},
        "reference": {"type": "string", "examples": ["USD"]},
        "value": {**_NUMBER, "description": "the measured value of one asset in the reference"},
        "band": {**_NUMBER, "description": "the band, a fraction (0.01: 1 %)"},
        "evidence": {
            "type": "array",
            "items": _object({"source": {"type": "string"}, "value": _NUMBER}),
        },
    },
    "a peg left its band (`peg.broken`) or came back within it (`peg.restored`)",
)

# How the value was priced (docs/rates.md#consensus-pricing); `sources` only with
# `expand=sources`. Optional: events written before these fields have none.
_EVIDENCE: Schema = {
    "mode": {"type": "string", "enum": ["priority", "consensus"]},
    "n_sources": {"type": "integer"},
    "dispersion_bps": _DECIMAL_OR_NULL,
    "bid": _DECIMAL_OR_NULL,
    "ask": _DECIMAL_OR_NULL,
    "spread_bps": _DECIMAL_OR_NULL,
    "sources": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["provider", "value", "source_time", "excluded", "reason"],
            "properties": {
                "provider": {"type": "string"},
                "value": _NUMBER,
                "bid": _DECIMAL_OR_NULL,
                "ask": _DECIMAL_OR_NULL,
                "source_time": _TIME,
                "age_s": {"type": "number"},
                "excluded": {"type": "boolean"},
                "reason": {"type": ["string", "null"]},
            },
        },
    },
}


_COURSE = _object(
    {
        **_RATE_FIELDS,
        "stale": {"type": "boolean"},
        "age_s": {"type": "number", "description": "seconds since checked_at"},
    },
    optional={**_EVIDENCE, "buy": _DECIMAL_OR_NULL, "sell": _DECIMAL_OR_NULL},
)
_ITEM = _object(
    {
        "id": {"type": "integer"},
        "code": {"type": "string"},
        "base": {"type": "string"},
        "quote": {"type": "string"},
        "name": {"type": "string"},
        "is_active": {"type": "boolean"},
        "pricing": {"type": ["string", "null"], "enum": ["priority", "consensus", None]},
        "markup_bps": _NUMBER,
        "created_at": _TIME,
        "updated_at": _TIME,
    }
)

# The `data` of each event type (docs/events.md, "Events").
EVENT_DATA: dict[str, Schema] = {
    "snapshot": _object(
        {
            "courses": {"type": "array", "items": _COURSE},
            "pairs": {
                "type": ["array", "null"],
                "items": {"type": "string"},
                "description": "the subscribed pairs; null: every active pair",
            },
        },
        "the current course of each subscribed pair; the first event, and after a gap",
    ),
    "rate.updated": _object(
        _RATE_FIELDS, "a pair's current rate changed, or a heartbeat", optional=_EVIDENCE
    ),
    "quote.excluded": _object(
        {
            "direction": {"type": "string"},
            "provider": {"type": "string"},
            "value": _NUMBER,
            "median": _NUMBER,
            "reason": {"type": "string"},
        },
        "a consensus left a source out of a pair's value",
    ),
    "item.created": _ITEM,
    "item.updated": _ITEM,
    "item.deleted": _object({"id": {"type": "integer"}, "code": {"type": "string"}}),
    "fetch.completed": _object(
        {
            "stored": {"type": "integer"},
            "providers": {"type": "object", "additionalProperties": {"type": "string"}},
            "duration_ms": {"type": "integer"},
        },
        "an owner's fetch cycle ended: one event per owner with sharded owners",
        optional={
            "shards": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "description": "the shards whose pairs the cycle quoted (KURS_OWNER_SHARDS > 1)",
            }
        },
    ),
    "provider.state": _object(
        {
            "name": {"type": "string"},
            "state": {"type": "string", "enum": ["closed", "open", "half_open"]},
            "reason": {"type": "string"},
        }
    ),
    "peg.broken": _PEG,
    "peg.restored": _PEG,
    "gap": _object(
        {
            "since": {"type": "integer"},
            "first_available": {
                "type": ["integer", "null"],
                "description": "null when the stream cannot be read now",
            },
        },
        "the events after `since` are no longer kept: a fresh snapshot follows",
    ),
    "nats.inbound": _object(
        {"subject": {"type": "string"}, "payload": {}},
        "a message another service published on the subjects Kurs follows",
    ),
}

ENVELOPE: Schema = {
    "type": "object",
    "required": ["type", "data", "ts"],
    "properties": {
        "type": {"type": "string", "enum": list(EVENT_DATA)},
        "data": {"type": "object"},
        "ts": _TIME,
        "id": {"type": "string", "format": "uuid", "description": "the event's id"},
        "seq": {
            "type": "integer",
            "minimum": 1,
            "description": "the JetStream stream sequence: where to resume from",
        },
        "epoch": {
            "type": "string",
            "pattern": EPOCH_PATTERN,
            "description": "on `snapshot` and `gap` only: the stream (its incarnation) `seq` and "
            "`first_available` are sequences of; resume with it as `epoch` beside `since`",
        },
    },
    "allOf": [
        {
            "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
            "then": {"properties": {"data": data}},
        }
        for kind, data in EVENT_DATA.items()
    ],
}

EVENT: Schema = {
    "type": "object",
    "description": "one Server-Sent Event, as an EventSource reads it",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": list(EVENT_DATA), "description": "the type"},
        "id": {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "the envelope's seq (absent while the server has no JetStream)",
        },
        "retry": {"type": "integer", "description": "milliseconds to wait before reconnecting"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": ENVELOPE,
            "description": "the envelope, as JSON",
        },
    },
}

_ERROR: Schema = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["detail"],
            "properties": {"detail": {"type": "string"}},
        }
    }
}

RESPONSES: dict[int, Schema] = {
    200: {
        "description": "An endless event stream. On the wire each event is `id: <seq>`, "
        "`event: <type>` and `data: <envelope>`, then a blank line; the schema below is one "
        "event as an EventSource reads it. A `snapshot` comes first (none on a resume), then "
        "every event of the subscription, and a `: keep-alive` comment every KURS_WS_HEARTBEAT "
        "seconds.",
        "content": {
            "text/event-stream": {
                "schema": EVENT,
                "example": {
                    "id": "42",
                    "event": "rate.updated",
                    "data": '{"type":"rate.updated","data":{"direction":"BTC-USD","value":54000.1,'
                    '"provider":"binance","source_time":"2026-12-01T10:00:00.000Z","checked_at":'
                    '"2026-12-01T10:00:00.120Z","status":"live","derived":false,"route":[],'
                    '"version":7},"ts":"2026-12-01T10:00:00.125Z","id":'
                    '"0b7e4c1e-5a1f-4c3e-9a57-3f7f0f6f2a10","seq":42}',
                },
            }
        },
    },
    403: {"description": "a browser Origin that is not allowed", "content": _ERROR},
    422: {"description": "an unknown pair or a bad option", "content": _ERROR},
    429: {
        "description": "over KURS_RATE_LIMIT, KURS_MAX_CONNECTIONS_PER_CLIENT or "
        "KURS_MAX_REPLAYS_PER_CLIENT (with Retry-After)",
        "content": _ERROR,
    },
}
