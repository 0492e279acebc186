"""The console's harness: its relay fake (``api_base``) as the messenger; the webhook's
shared secret (``X-Botp-Console-Secret``) as its signature; a choice is pressed by
typing its number."""

from __future__ import annotations

import json
from typing import Any

from bot_platform.config import BotConfig
from tests.contract import Delivered, Fault
from tests.fakes.relay import FakeRelayServer

SECRET = "console-webhook-secret-0123456789"
USER = "eve"


class ConsoleHarness:
    channel, bot_id, user = "console", "console", USER

    def fake(self) -> FakeRelayServer:
        return FakeRelayServer()

    def start(self, server: FakeRelayServer) -> None:
        self.server = server

    def bot(self) -> BotConfig:
        return BotConfig(id=self.bot_id, channel=self.channel, secret=SECRET,
                         api_base=self.server.url)

    def attach(self, platform: Any) -> None:
        pass

    def signed(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Botp-Console-Secret": SECRET}

    def forged(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Botp-Console-Secret": SECRET[:-1]}

    def webhook(self, number: int, text: str) -> tuple[bytes, dict[str, str]]:
        body = json.dumps({"user_id": USER, "text": text, "event_id": f"e-{number}",
                           "first_name": "Eve"}).encode()
        return body, self.signed(body)

    def press(self, number: int, message: Delivered, index: int) -> tuple[bytes,
                                                                          dict[str, str]]:
        return self.webhook(number, str(index + 1))

    def sends(self) -> int:
        return self.server.attempts

    def fail(self, number: int, fault: Fault) -> None:
        self.server.send_faults[number] = {"429": 429, "5xx": 503}[fault]

    def block(self) -> None:
        self.server.blocked.add(USER)

    def delivered(self) -> list[Delivered]:
        out = []
        for record in self.server.received:
            if record["recipient"] != USER:
                continue
            message: dict[str, Any] = record["message"]
            choices = [*message["buttons"], *message["quick_replies"]]
            out.append(Delivered(
                text=message["text"], image=message["image_url"],
                choices=tuple(c["title"] for c in choices),
                replies=tuple(str(n) if c.get("payload") else None
                              for n, c in enumerate(choices, start=1)),
                cards=tuple(c["title"] for c in message["cards"]), raw=message))
        return out
