"""A messenger API gone wrong in the ways that put a bot's token into an error message."""

from __future__ import annotations

from aiohttp import web

from tests.fakes.server import LoopbackServer


class LeakyMessenger(LoopbackServer):
    """A messenger API gone wrong. ``redirect``: every call is answered 302 to itself,
    forever; ``json``: a 400 whose body repeats the request's URL and headers in every
    messenger's error shape; ``text``: a 502 page repeating them. Telegram's
    ``deleteWebhook`` succeeds, so a poller gets as far as ``getUpdates``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.calls = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        if request.path.endswith("/deleteWebhook"):
            return web.json_response({"ok": True, "result": True})
        if self.mode == "redirect":
            raise web.HTTPFound(str(request.url))
        echo = f"cannot serve {request.url} {dict(request.headers)}"
        if self.mode == "text":
            return web.Response(text=echo, status=502)
        return web.json_response({
            "ok": False, "error_code": 400, "description": f"Bad Request: {echo}",
            "status": 3, "status_message": echo,
            "error": {"code": 100, "message": echo}}, status=400)
