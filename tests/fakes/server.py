"""The part every fake messenger shares: an aiohttp app on 127.0.0.1, a random port,
start/close, ``async with``."""

from __future__ import annotations

from typing import Self

from aiohttp import web


class LoopbackServer:
    """Subclasses add their routes in ``routes``; ``url`` is set once started."""

    url_suffix = ""  # appended to http://127.0.0.1:<port> (e.g. an API prefix)
    shutdown_timeout = 60.0

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.url = ""

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self, port: int = 0) -> Self:
        """Listen on ``port`` (0: any free one; a fixed one lets a test start the fake
        after a client already failed to reach it)."""
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=self.shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}{self.url_suffix}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
