"""A fake OpenAI-compatible server on 127.0.0.1: ``POST /v1/chat/completions`` with the
real response shape, a scripted "model" (a callable or a queue of contents), recorded
requests, and injectable latency and errors. The real ``openai`` client talks to it
through ``base_url``. Reusable by ``bench/``."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fakes.server import LoopbackServer


class FakeOpenAIServer(LoopbackServer):
    url_suffix = "/v1"
    shutdown_timeout = 1.0  # a slow "model" must not hold the shutdown

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.replies: deque[str] = deque()  # contents to answer with, in order
        self.responder: Callable[[dict[str, Any]], str] | None = None
        self.latency = 0.0
        self.failures: deque[int] = deque()
        self.malformed = False
        self._ids = itertools.count(1)

    def reply_json(self, **content: Any) -> None:
        self.replies.append(json.dumps(content))

    def system_prompt(self, index: int = -1) -> str:
        return self.requests[index]["messages"][0]["content"]

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.failures:
            status = self.failures.popleft()
            return web.json_response({"error": {"message": "The server had an error",
                                                "type": "server_error", "code": None}},
                                     status=status)
        if self.malformed:
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if self.responder is not None:
            content = self.responder(body)
        elif self.replies:
            content = self.replies.popleft()
        else:
            content = json.dumps({"action": "unknown", "confidence": 0.0})
        return web.json_response({
            "id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._completions)
