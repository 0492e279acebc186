"""Viber callback helpers: the test bot's token, the user as Viber's REST API docs show
it, and posting a signed callback to the platform's webhook."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import httpx

TOKEN = "445da6az1s345z78-dazcczb2542zv51a-e0vc5fva17480im9"
USER = {"id": "01234567890A=", "name": "Olena Koval", "avatar": "http://avatar.example",
        "language": "uk", "country": "UA", "api_version": 8}


async def post(platform: Any, body: dict | bytes, token: str | None = TOKEN) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Viber-Content-Signature"] = hmac.new(
            token.encode(), raw, hashlib.sha256).hexdigest()
    async with platform.http_client() as client:
        return await client.post("/webhooks/viber/vb", content=raw, headers=headers)


def started(token: int = 4912661846655238145, context: str | None = None) -> dict:
    body = {"event": "conversation_started", "timestamp": 1457764197627,
            "message_token": token, "type": "open", "user": USER, "subscribed": False}
    if context:
        body["context"] = context
    return body
