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


class FakeOpenAIServer:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: deque[str] = deque()  # contents to answer with, in order
        self.responder: Callable[[dict[str, Any]], str] | None = None
        self.latency = 0.0
        self.failures: deque[int] = deque()
        self.malformed = False
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

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

    async def start(self) -> FakeOpenAIServer:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        # A slow "model" must not hold the test's shutdown: close its requests quickly.
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeOpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
