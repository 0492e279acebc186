"""Facebook's harness: the Graph API fake, ``X-Hub-Signature-256``, postbacks and quick
replies that come back with their payloads."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from bot_platform.config import BotConfig
from tests.contract import Delivered, Fault
from tests.fakes.graph_api import FakeGraphServer

APP_SECRET = "app-secret-123"
PAGE = "1234567890"
PSID = "PSID1"


class FacebookHarness:
    channel, bot_id, user = "facebook", "page", PSID

    def fake(self) -> FakeGraphServer:
        return FakeGraphServer()

    def start(self, server: FakeGraphServer) -> None:
        self.server = server

    def bot(self) -> BotConfig:
        return BotConfig(id=self.bot_id, channel=self.channel, token="PAGE-TOKEN",
                         secret=APP_SECRET, verify_token="verify-me",
                         api_base=self.server.url)

    def attach(self, platform: Any) -> None:
        self.server.clock = platform.clock.now  # the 24-hour window runs on it

    def signed(self, body: bytes) -> dict[str, str]:
        digest = hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
        return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}

    def forged(self, body: bytes) -> dict[str, str]:
        digest = hmac.new(b"not-the-app-secret", body, hashlib.sha256).hexdigest()
        return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}

    def _event(self, number: int, **kind: Any) -> tuple[bytes, dict[str, str]]:
        webhook = {"object": "page", "entry": [{"id": PAGE, "time": 1767225600000,
                   "messaging": [{"sender": {"id": PSID}, "recipient": {"id": PAGE},
                                  "timestamp": 1767225600000 + number, **kind}]}]}
        self.server.observe(webhook)  # the person wrote: the 24-hour window is open
        body = json.dumps(webhook).encode()
        return body, self.signed(body)

    def webhook(self, number: int, text: str) -> tuple[bytes, dict[str, str]]:
        return self._event(number, message={"mid": f"m-{number}", "text": text})

    def press(self, number: int, message: Delivered, index: int) -> tuple[bytes,
                                                                          dict[str, str]]:
        reply = message.replies[index]
        assert reply is not None
        if index < len(message.raw.get("quick_replies") or []):
            return self._event(number, message={
                "mid": f"m-{number}", "text": message.choices[index],
                "quick_reply": {"payload": reply}})
        return self._event(number, postback={"mid": f"m-{number}", "payload": reply,
                                             "title": message.choices[index]})

    def _send_calls(self) -> list[Any]:
        return [c for c in self.server.calls if c.path.endswith("/me/messages")]

    def sends(self) -> int:
        return len(self._send_calls())

    def fail(self, number: int, fault: Fault) -> None:
        if fault == "429":
            self.server.fail_send(number, code=613, message="Calls to this api have "
                                  "exceeded the rate limit.")
        else:
            self.server.fail_send(number, code=2, status=500,
                                  message="Service temporarily unavailable")

    def block(self) -> None:
        self.server.unavailable.add(PSID)

    def delivered(self) -> list[Delivered]:
        out = []
        for message in self.server.messages(PSID):
            attachment = message.get("attachment") or {}
            payload = attachment.get("payload") or {}
            quick = [q for q in message.get("quick_replies") or []]
            buttons = payload.get("buttons") or []
            elements = payload.get("elements") or []
            out.append(Delivered(
                text=message.get("text") or payload.get("text") or "",
                image=payload.get("url") if attachment.get("type") == "image" else None,
                choices=tuple(q.get("title", "") for q in quick)
                + tuple(b["title"] for b in buttons),
                replies=tuple(q.get("payload") for q in quick)
                + tuple(b.get("payload") for b in buttons),
                cards=tuple(e["title"] for e in elements),
                raw=message))
        return out
