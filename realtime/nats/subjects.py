"""The names Kurs uses on NATS: subjects, the stream, the headers, the fallback group.

Pure functions of the prefix (`KURS_NATS_PREFIX`), shared by the connection, the bridge and
the producers, so that each name is spelled once (docs/events.md lists them for users).
"""

from __future__ import annotations

import re

from django.conf import settings

ORIGIN_HEADER = "Kurs-Origin"
# The seeds' subject, outside the prefix.
SEED_SUBJECT = "items.updates"
# The channel-layer message type the bridge listens for on the fallback group.
FALLBACK_MESSAGE_TYPE = "kurs.event"


def fallback_group() -> str:
    """The channel-layer group every web process's bridge joins (one per prefix)."""
    return f"{settings.KURS_NATS_PREFIX}.events"


def stream_name(prefix: str) -> str:
    """`kurs` -> `KURS`; another prefix gets its own stream, so tests never touch it."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix).upper()


def event_subjects(prefix: str) -> list[str]:
    """What the replay stream keeps: every event family under the prefix.

    Not `<prefix>.>` as a whole: a request on `<prefix>.ctl.fetch` captured by a stream would be
    answered by JetStream's publish acknowledgement before the owner could reply, and control
    requests are not events anyone should replay.
    """
    families = ("items", "rates", "fetch", "provider", "peg", "quotes")
    return [f"{prefix}.{family}.>" for family in families]


def control_prefix(prefix: str) -> str:
    """Request/reply subjects (`kurs.ctl.fetch`): never events, never relayed to clients."""
    return f"{prefix}.ctl."
