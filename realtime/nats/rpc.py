"""Request/reply on the process's connection: a service on a subject, and a request to one.

Control subjects (`<prefix>.ctl.*`, see `control_prefix`) are never events: the stream does not
keep them and the bridge does not relay them. The live owner answers `POST /tasks/run` this way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from realtime.nats.link import NatsConnection, connection

logger = logging.getLogger("realtime.nats")

Handler = Callable[[bytes], Awaitable[bytes]]


class Responder:
    """A request/reply service on one subject, kept across reconnects until `close()`."""

    def __init__(self, subject: str, handler: Handler, link: NatsConnection = connection) -> None:
        self.subject = subject
        self._handler = handler
        self._link = link
        self._sub_id, _ = link.subscribe(subject, self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            answer = await self._handler(msg.data)
        except Exception:
            logger.exception("nats: the handler of %s failed", self.subject)
            return
        await msg.respond(answer)

    def close(self) -> None:
        self._link.unsubscribe(self._sub_id)


def serve(subject: str, handler: Handler) -> Responder:
    """Answer requests on `subject` with `handler(payload)` (it runs on the NATS thread)."""
    return Responder(subject, handler)


async def request(
    subject: str, payload: bytes, *, within: float, link: NatsConnection = connection
) -> bytes | None:
    """A NATS request from any event loop; the reply, or None when nobody answered in time."""
    link.start()
    client = link.client
    if client is None or not client.is_connected:
        return None

    async def ask() -> bytes:
        reply = await client.request(subject, payload, timeout=within)
        data: bytes = reply.data
        return data

    try:
        return await link.on_loop(ask())
    except (NoRespondersError, NatsTimeoutError, TimeoutError):
        return None
    except Exception as exc:
        logger.warning("nats: request on %s failed: %s", subject, exc)
        return None
