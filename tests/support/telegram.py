"""Telegram webhook helpers: the test bot's token and secret, Update JSON as the Bot API
sends it, and posting it to the platform's webhook."""

from __future__ import annotations

import json
from typing import Any

import httpx

TOKEN = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11"
SECRET = "s3cret-token"


def user(uid: int = 1111, first_name: str = "Olena", language: str = "uk") -> dict:
    return {"id": uid, "is_bot": False, "first_name": first_name, "username": "olena",
            "language_code": language}


def message_update(update_id: int, text: str, uid: int = 1111, **extra: Any) -> dict:
    return {"update_id": update_id, "message": {
        "message_id": update_id, "from": user(uid), "date": 1767225600,
        "chat": {"id": uid, "first_name": "Olena", "type": "private"}, "text": text,
        **({"entities": [{"offset": 0, "length": 6, "type": "bot_command"}]}
           if text.startswith("/") else {}), **extra}}


def callback_update(update_id: int, data: str, uid: int = 1111) -> dict:
    return {"update_id": update_id, "callback_query": {
        "id": f"cb-{update_id}", "from": user(uid), "chat_instance": "-77",
        "data": data, "message": {"message_id": 1, "date": 1767225600,
                                  "chat": {"id": uid, "type": "private"}, "text": "..."}}}


async def post(platform: Any, update: dict | bytes,
               secret: str | None = SECRET) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    body = update if isinstance(update, bytes) else json.dumps(update).encode()
    async with platform.http_client() as client:
        return await client.post("/webhooks/telegram/shop", content=body, headers=headers)
