"""A recording server for the console channel's relay (``api_base``): what a test or a
benchmark uses as "the messenger" when it needs one in another process.

Only requests that complete are recorded: a sender killed mid-request sends nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from aiohttp import web


class FakeRelayServer:
    """POST /send {bot_id, recipient, message} -> {"message_id": "..."}; records each."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.delay = 0.0  # seconds before answering (a slow messenger)
        self.hang_after: int | None = None  # after this many messages, hang (until closed)
        self.fail_next: list[int] = []  # HTTP statuses to answer with, in order
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _send(self, request: web.Request) -> web.Response:
        body = await request.json()
        hang = self.hang_after is not None and len(self.received) >= self.hang_after
        deadline = asyncio.get_running_loop().time() + (3600 if hang else self.delay)
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                return web.Response(status=499)  # the sender is gone: nothing delivered
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        if self.fail_next:
            return web.Response(status=self.fail_next.pop(0), headers={"Retry-After": "1"})
        self.received.append(body)
        return web.json_response({"message_id": f"relay-{next(self._ids)}"})

    def texts(self, recipient: str | None = None) -> list[str]:
        return [r["message"]["text"] for r in self.received
                if recipient is None or r["recipient"] == recipient]

    async def start(self) -> FakeRelayServer:
        app = web.Application()
        app.router.add_post("/send", self._send)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeRelayServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
