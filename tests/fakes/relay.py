"""A recording server for the console channel's relay (``api_base``): what a test or a
benchmark uses as "the messenger" when it needs one in another process.

Only requests that complete are recorded: a sender killed mid-request sends nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from aiohttp import web

from tests.fakes.server import LoopbackServer


class FakeRelayServer(LoopbackServer):
    """POST /send {bot_id, recipient, message} -> {"message_id": "..."}; records each."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []
        self.delay = 0.0  # seconds before answering (a slow messenger)
        self.hang_after: int | None = None  # after this many messages, hang (until closed)
        self.fail_next: list[int] = []  # HTTP statuses to answer with, in order
        # The nth /send (from 1) -> an HTTP status: a fault on a later part of a message.
        self.send_faults: dict[int, int] = {}
        self.blocked: set[str] = set()  # recipients answered 403 (they blocked the bot)
        self.attempts = 0  # /send requests answered, faults included
        self._ids = itertools.count(1)

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
        self.attempts += 1
        fault = self.send_faults.pop(self.attempts, 0) or (
            self.fail_next.pop(0) if self.fail_next else 0)
        if fault:
            return web.Response(status=fault, headers={"Retry-After": "1"})
        if body.get("recipient") in self.blocked:
            return web.Response(status=403)
        self.received.append(body)
        return web.json_response({"message_id": f"relay-{next(self._ids)}"})

    def texts(self, recipient: str | None = None) -> list[str]:
        return [r["message"]["text"] for r in self.received
                if recipient is None or r["recipient"] == recipient]

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/send", self._send)
