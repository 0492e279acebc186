"""Telegram's harness: the Bot API fake, the secret-token header, callback queries."""

from __future__ import annotations

import html
import json
from typing import Any

from bot_platform.config import BotConfig
from tests.contract import Delivered, Fault
from tests.fakes.telegram_api import FakeTelegramServer

TOKEN = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11"
SECRET = "s3cret-token"
USER = 1111
SENDS = ("sendMessage", "sendPhoto")


class TelegramHarness:
    channel, bot_id, user = "telegram", "shop", str(USER)

    def fake(self) -> FakeTelegramServer:
        return FakeTelegramServer()

    def start(self, server: FakeTelegramServer) -> None:
        self.server = server

    def bot(self) -> BotConfig:
        return BotConfig(id=self.bot_id, channel=self.channel, token=TOKEN, secret=SECRET,
                         api_base=self.server.url)

    def attach(self, platform: Any) -> None:
        pass

    def signed(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": SECRET}

    def forged(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json",
                "X-Telegram-Bot-Api-Secret-Token": SECRET[:-1] + "x"}

    def _update(self, number: int, **kind: Any) -> tuple[bytes, dict[str, str]]:
        body = json.dumps({"update_id": number, **kind}).encode()
        return body, self.signed(body)

    def _person(self) -> dict[str, Any]:
        return {"id": USER, "is_bot": False, "first_name": "Olena", "language_code": "en"}

    def webhook(self, number: int, text: str) -> tuple[bytes, dict[str, str]]:
        return self._update(number, message={
            "message_id": number, "date": 1767225600, "text": text, "from": self._person(),
            "chat": {"id": USER, "first_name": "Olena", "type": "private"}})

    def press(self, number: int, message: Delivered, index: int) -> tuple[bytes,
                                                                          dict[str, str]]:
        inline = (message.raw.params.get("reply_markup") or {}).get("inline_keyboard", [])
        if index >= sum(len(row) for row in inline):  # a reply keyboard key: its title
            return self.webhook(number, message.choices[index])
        return self._update(number, callback_query={
            "id": f"cq-{number}", "from": self._person(), "chat_instance": "1",
            "data": message.replies[index],
            "message": {"message_id": 1, "date": 1767225600,
                        "chat": {"id": USER, "type": "private"}}})

    def _send_calls(self) -> list[Any]:
        return [c for c in self.server.calls if c.method in SENDS]

    def sends(self) -> int:
        return len(self._send_calls())

    def fail(self, number: int, fault: Fault) -> None:
        self.server.fail_send(number, status={"429": 429, "5xx": 502}[fault])

    def block(self) -> None:
        self.server.block(USER)

    def delivered(self) -> list[Delivered]:
        out = []
        for call in self._send_calls():
            if not call.params.get("_ok") or str(call.params.get("chat_id")) != self.user:
                continue
            markup = call.params.get("reply_markup") or {}
            inline = [b for row in markup.get("inline_keyboard", []) for b in row]
            keys = [b for row in markup.get("keyboard", []) for b in row]
            out.append(Delivered(
                text=html.unescape(call.params.get("text") or call.params.get("caption")
                                   or ""),
                image=call.params.get("photo"),
                choices=tuple(b["text"] for b in inline + keys),
                replies=tuple([b.get("callback_data") for b in inline] + [
                    None if b.get("request_contact") else b["text"] for b in keys]),
                raw=call))
        return out
