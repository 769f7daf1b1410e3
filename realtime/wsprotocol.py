"""The WebSocket protocol Kurs is served with: uvicorn's (websockets, sans-I/O) with two client
mistakes answered the way a server should, not with a hang or a traceback.

`scripts/serve.sh` selects it (`--ws realtime.wsprotocol:KursWebSocketProtocol`).

- **A handshake websockets refuses to parse** (a request line or header over 8 KiB, more than 128
  headers: websockets' limits) leaves uvicorn 0.54 waiting forever: websockets only marks the
  handshake failed, and uvicorn never looks. Here it is refused at once, 431 for a size limit and
  400 otherwise, with one WARNING line.
- **A text message that is not UTF-8** is closed with 1007 as uvicorn does, but uvicorn logs an
  ERROR with a traceback each time (`logger.exception`): a client can flood the log. Here it is
  one WARNING line.

The uvicorn members this subclass reads, sets and overrides are listed in `edge._uvicorn_compat`,
whose test fails on another uvicorn version.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from websockets.exceptions import SecurityError
from websockets.frames import CloseCode

from edge._uvicorn_compat import WebSocketsSansIOProtocol

logger = logging.getLogger(__name__)


class KursWebSocketProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self._refuse_handshake(self.conn.handshake_exc)

    def _refuse_handshake(self, exc: Exception) -> None:
        cause = exc.__cause__ or exc
        status = (
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            if isinstance(cause, SecurityError)
            else HTTPStatus.BAD_REQUEST
        )
        logger.warning(
            "websocket: handshake from %s refused with %d: %s", self._peer(), status, cause
        )
        response = self.conn.reject(status, f"{status.phrase}: {cause}\n")
        # Written directly: websockets has already queued its end of stream after the failure.
        self.transport.write(response.serialize())
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.close()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError as exc:
                logger.warning(
                    "websocket: %s sent a text message that is not UTF-8 (%s at %d): closed 1007",
                    self._peer(),
                    exc.reason,
                    exc.start,
                )
                self.frames = []
                self.conn.send_close(CloseCode.INVALID_DATA, "invalid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown peer"
