"""A fake OpenAI-compatible server on 127.0.0.1: ``POST /v1/chat/completions`` with the
real response shape and a scripted "model", so the real ``openai`` client talks to it
through ``base_url``. Reusable by ``bench/``.

Every request can be answered differently: a queue (``replies``) of contents, JSON
objects, ``Reply`` scripts (status, raw or JSON body, delay, usage tokens) or callables of
the request body; or one ``responder`` for all. ``requests`` records every body (and
``headers`` every request's headers) in order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.server import LoopbackServer

DEFAULT_USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
_DEFAULT = object()


@dataclass
class Reply:
    """One scripted response. By default a normal completion whose message is
    ``content``; ``json`` (any shape) or ``raw`` (any text: HTML, cut JSON) replace the
    whole body, which is how a broken or hostile server is played."""

    content: str | None = None
    json: Any = None
    raw: str | bytes | None = None
    status: int = 200
    content_type: str | None = None  # default: application/json, text/html for raw
    delay: float = 0.0  # seconds before answering (a slow model)
    usage: Any = field(default=_DEFAULT)  # a usage object, a total, or None (no usage)
    finish_reason: str = "stop"
    headers: dict[str, str] | None = None  # extra response headers (Content-Encoding ...)


Script = str | dict[str, Any] | Reply | Callable[[dict[str, Any]], "str | dict[str, Any] | Reply"]


class FakeOpenAIServer(LoopbackServer):
    url_suffix = "/v1"
    shutdown_timeout = 1.0  # a slow "model" must not hold the shutdown

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        # What to answer, one per request in order: a content string, a JSON object (the
        # message content, serialised), a Reply, or a callable of the request body.
        self.replies: deque[Script] = deque()
        self.responder: Callable[[dict[str, Any]], str | dict[str, Any] | Reply] | None = None
        self.latency = 0.0
        self.failures: deque[int] = deque()  # statuses to fail the next requests with
        self.malformed = False  # every answer an HTML page with status 200
        self._ids = itertools.count(1)

    def reply_json(self, **content: Any) -> None:
        """Queue one model answer whose content is this JSON object."""
        self.replies.append(json.dumps(content))

    def script(self, *replies: Script) -> None:
        """Queue answers for the next requests, in order."""
        self.replies.extend(replies)

    def system_prompt(self, index: int = -1) -> str:
        return self.requests[index]["messages"][0]["content"]

    def user_text(self, index: int = -1) -> str:
        return self.requests[index]["messages"][-1]["content"]

    def _next(self, body: dict[str, Any]) -> Reply:
        script: Script
        if self.responder is not None:
            script = self.responder
        elif self.replies:
            script = self.replies.popleft()
        else:
            script = json.dumps({"action": "unknown", "confidence": 0.0})
        if callable(script) and not isinstance(script, Reply):
            script = script(body)
        if isinstance(script, Reply):
            return script
        if isinstance(script, dict):
            return Reply(content=json.dumps(script))
        return Reply(content=script)

    async def _completions(self, request: web.Request) -> web.Response:
        raw = await request.text()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"_raw": raw}
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.failures:
            status = self.failures.popleft()
            return web.json_response({"error": {"message": "The server had an error",
                                                "type": "server_error", "code": None}},
                                     status=status)
        if self.malformed:
            return web.Response(text="<html>oops</html>", content_type="text/html")
        reply = self._next(body)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.raw is not None:
            data = reply.raw.encode() if isinstance(reply.raw, str) else reply.raw
            return web.Response(body=data, status=reply.status, headers=reply.headers,
                                content_type=reply.content_type or "text/html")
        if reply.json is not None:
            return web.Response(text=json.dumps(reply.json), status=reply.status,
                                content_type=reply.content_type or "application/json")
        usage = DEFAULT_USAGE if reply.usage is _DEFAULT else reply.usage
        if isinstance(usage, int):
            usage = {"prompt_tokens": usage, "completion_tokens": 0, "total_tokens": usage}
        completion: dict[str, Any] = {
            "id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "fake"),
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": reply.content},
                         "finish_reason": reply.finish_reason, "logprobs": None}]}
        if usage is not None:
            completion["usage"] = usage
        return web.Response(text=json.dumps(completion), status=reply.status,
                            content_type=reply.content_type or "application/json")

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._completions)
