"""Viber's harness: the Chat API fake, ``X-Viber-Content-Signature``, keyboard replies
that come back as text with the keyboard's ``tracking_data``."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from bot_platform.config import BotConfig
from tests.contract import Delivered, Fault
from tests.fakes.viber_api import FakeViberServer

TOKEN = "445da6az1s345z78-dazcczb2542zv51a-e0vc5fva17480im9"
PERSON = {"id": "01234567890A=", "name": "Olena Koval", "language": "en", "country": "UA",
          "api_version": 8}
SENDS = ("send_message", "broadcast_message")


class ViberHarness:
    channel, bot_id, user = "viber", "vb", PERSON["id"]

    def fake(self) -> FakeViberServer:
        return FakeViberServer(TOKEN)

    def start(self, server: FakeViberServer) -> None:
        self.server = server

    def bot(self) -> BotConfig:
        return BotConfig(id=self.bot_id, channel=self.channel, token=TOKEN,
                         api_base=self.server.url)

    def attach(self, platform: Any) -> None:
        pass

    def signed(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Viber-Content-Signature":
                hmac.new(TOKEN.encode(), body, hashlib.sha256).hexdigest()}

    def forged(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Viber-Content-Signature":
                hmac.new(b"not-the-token", body, hashlib.sha256).hexdigest()}

    def _message(self, number: int, message: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        body = json.dumps({"event": "message", "timestamp": 1767225600000 + number,
                           "message_token": number, "sender": PERSON,
                           "message": message}).encode()
        return body, self.signed(body)

    def webhook(self, number: int, text: str) -> tuple[bytes, dict[str, str]]:
        return self._message(number, {"type": "text", "text": text})

    def press(self, number: int, message: Delivered, index: int) -> tuple[bytes,
                                                                          dict[str, str]]:
        reply = message.replies[index]
        assert reply is not None
        return self._message(number, {"type": "text", "text": reply,
                                      "tracking_data": message.raw.get("tracking_data")})

    def _send_calls(self) -> list[Any]:
        return [c for c in self.server.calls if c.method in SENDS]

    def sends(self) -> int:
        return len(self._send_calls())

    def fail(self, number: int, fault: Fault) -> None:
        self.server.send_faults[number] = {"429": 12, "5xx": 500}[fault]

    def block(self) -> None:
        self.server.unsubscribed.add(self.user)

    def delivered(self) -> list[Delivered]:
        out = []
        for call in self._send_calls():
            body = call.body
            if not call.ok or self.user not in (body.get("receiver"),
                                                *(body.get("broadcast_list") or ())):
                continue
            keys = (body.get("keyboard") or {}).get("Buttons", [])
            cells = (body.get("rich_media") or {}).get("Buttons", [])
            out.append(Delivered(
                text=body.get("text") or "",
                image=body.get("media") if body.get("type") == "picture" else None,
                choices=tuple(k["Text"] for k in keys),
                replies=tuple(k["ActionBody"] if k["ActionType"] == "reply" else None
                              for k in keys),
                cards=tuple(c["Text"].split("\n")[0] for c in cells if "TextVAlign" in c),
                raw=body))
        return out
