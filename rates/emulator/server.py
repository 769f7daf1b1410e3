"""Serve :class:`~rates.emulator.app.EmulatorApp` with uvicorn, in-process or from the command."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

import uvicorn

from edge._uvicorn_compat import WebSocketsSansIOProtocol
from rates.emulator.app import EmulatorApp
from rates.emulator.market import WALK_SLICES, Fault, Market, parse_depeg

if TYPE_CHECKING:
    from edge._uvicorn_compat import ASGISendEvent


class EmulatorWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket implementation on websockets' current (sans-I/O) API (the older one
    is built on websockets.legacy, which is deprecated), quiet about refused upgrades.

    The emulator refuses a stream as an exchange does, with an HTTP answer (503 when down, 429
    with Retry-After). uvicorn 0.54 counts the handshake complete only after an accept or a
    close, so each refusal also logged ERROR "ASGI callable returned without completing
    handshake" (Kludex/uvicorn#3138, an open pull request): here a refusal sent in full
    completes it too. The uvicorn members it touches are listed in `edge._uvicorn_compat`.
    """

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and self.close_sent:
            self.handshake_complete = True


@dataclass(frozen=True)
class EmulatorServer:
    app: EmulatorApp
    host: str
    port: int

    @property
    def market(self) -> Market:
        return self.app.market

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_base_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def rest_url(self, provider: str) -> str:
        """What ``KURS_<PROVIDER>_REST_URL`` should be to use this emulator."""
        return f"{self.base_url}/{provider}"

    def ws_url(self, provider: str) -> str:
        return f"{self.ws_base_url}/{provider}"

    def set_fault(self, provider: str, mode: str, **options: object) -> None:
        """In-process shortcut for ``POST /_control/<provider>``."""
        self.market.set_fault(provider, Fault.from_json({"mode": mode, **options}))

    def set_depeg(self, usdt_usd: Decimal | str) -> None:
        """In-process shortcut for ``POST /_control/depeg``; ``1`` restores the peg."""
        self.market.set_depeg(parse_depeg(usdt_usd))


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def run_emulator_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tick: float = 1.0,
    seed: int | None = None,
    faults: Mapping[str, Fault] | None = None,
    depeg: Decimal | None = None,
    synthetic_pairs: int = 0,
    log_level: str = "warning",
    slices: int = WALK_SLICES,
) -> AsyncIterator[EmulatorServer]:
    """Run the emulator on ``host:port`` (0: a free port) for the duration of the block;
    ``synthetic_pairs`` more coins (SYN0001...) listed on every crypto provider."""
    market = Market(tick=tick, seed=seed, synthetic_pairs=synthetic_pairs, slices=slices)
    for provider, fault in (faults or {}).items():
        market.set_fault(provider, fault)
    if depeg is not None:
        market.set_depeg(depeg)
    app = EmulatorApp(market)
    sock = bind_socket(host, port)
    config = uvicorn.Config(
        app,
        lifespan="off",
        ws=EmulatorWebSocketProtocol,
        log_level=log_level,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=2,
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    await app.start()
    main_loop = asyncio.create_task(server.main_loop())
    try:
        yield EmulatorServer(app, host, sock.getsockname()[1])
    finally:
        await app.stop()
        server.should_exit = True
        await main_loop
        await server.shutdown(sockets=[sock])
