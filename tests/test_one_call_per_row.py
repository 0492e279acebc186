"""One outbox row = one messenger API call (issue 15, item 1).

A broadcast of picture + 2,400-character text + button used to be one outbox row that
each adapter sent as several calls; a 429 / 5xx on the second call made the retry send
the picture again. Now ``fit_message`` cuts it into parts (one call each), each part is
its own row, and a fault on part two re-sends part two only. Figures count people.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from bot_platform import broadcasts
from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig
from bot_platform.fitting import fit_message
from bot_platform.models import Broadcast, Outbox
from bot_platform.ratelimit import MemoryRateLimiter
from bot_platform.types import Button, Capabilities, Card, Outgoing, QuickReply
from tests.fakes.graph_api import FakeGraphServer
from tests.fakes.telegram_api import FakeTelegramServer
from tests.fakes.viber_api import FakeViberServer

TG_TOKEN = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11"
TG_SECRET = "s3cret-token"
VIBER_TOKEN = "445da6az1s345z78-dazcczb2542zv51a-e0vc5fva17480im9"
VIBER_USER = {"id": "01234567890A=", "name": "Olena Koval", "language": "uk",
              "country": "UA", "api_version": 8}
FB_SECRET = "app-secret-123"
PICTURE = "https://img.example.com/spring.jpg"
LONG_TEXT = " ".join(f"word{n:03}" for n in range(300))  # 2,399 characters
BUTTON = {"title": "Shop now", "url": "https://shop.example.com/sale"}


async def _post(platform, path: str, body: dict, headers: dict[str, str]) -> None:
    async with platform.http_client() as client:
        response = await client.post(path, content=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **headers})
    assert response.status_code == 200, response.text


class Telegram:
    """The Telegram fake: a 429 (retry_after) on the broadcast's second call."""

    name, bot_id, user = "telegram", "shop", "1111"

    def __init__(self, server: FakeTelegramServer) -> None:
        self.server = server

    @staticmethod
    def fake() -> FakeTelegramServer:
        return FakeTelegramServer()

    def bot(self) -> BotConfig:
        return BotConfig(id=self.bot_id, channel="telegram", token=TG_TOKEN, secret=TG_SECRET,
                         api_base=self.server.url)

    async def subscribe(self, platform) -> None:
        await _post(platform, "/webhooks/telegram/shop", {"update_id": 1, "message": {
            "message_id": 1, "date": 1767225600, "text": "/start",
            "entities": [{"offset": 0, "length": 6, "type": "bot_command"}],
            "from": {"id": 1111, "is_bot": False, "first_name": "Olena",
                     "language_code": "uk"},
            "chat": {"id": 1111, "first_name": "Olena", "type": "private"}}},
            {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET})

    def calls(self) -> int:
        return sum(c.method in ("sendMessage", "sendPhoto") for c in self.server.calls)

    def fail_send(self, number: int) -> None:
        self.server.fail_send(number, status=429)

    def arrived(self, since: int) -> list[tuple[str, Any]]:
        """Every send call after the first ``since`` ones: (what, ok)."""
        sends = [c for c in self.server.calls if c.method in ("sendMessage", "sendPhoto")]
        return [(c.params.get("photo") or c.params.get("text"), bool(c.params.get("_ok")))
                for c in sends[since:]]

    def expected(self) -> list[str]:
        return [PICTURE, LONG_TEXT]


class Viber:
    """The Viber fake: status 12 (too many requests) on the broadcast's second call."""

    name, bot_id, user = "viber", "vb", VIBER_USER["id"]

    def __init__(self, server: FakeViberServer) -> None:
        self.server = server

    @staticmethod
    def fake() -> FakeViberServer:
        return FakeViberServer(VIBER_TOKEN)

    def bot(self) -> BotConfig:
        return BotConfig(id=self.bot_id, channel="viber", token=VIBER_TOKEN,
                         api_base=self.server.url)

    async def subscribe(self, platform) -> None:
        body = {"event": "message", "timestamp": 1457764197627, "message_token": 10,
                "sender": VIBER_USER, "message": {"type": "text", "text": "hello"}}
        signature = hmac.new(VIBER_TOKEN.encode(), json.dumps(body).encode(),
                             hashlib.sha256).hexdigest()
        await _post(platform, "/webhooks/viber/vb", body,
                    {"X-Viber-Content-Signature": signature})

    def _sends(self) -> list[Any]:
        return [c for c in self.server.calls
                if c.method in ("send_message", "broadcast_message")]

    def calls(self) -> int:
        return len(self._sends())

    def fail_send(self, number: int) -> None:
        self.server.send_faults[number] = 12

    def arrived(self, since: int) -> list[tuple[str, Any]]:
        return [(c.body.get("media") or c.body.get("text"), c.ok)
                for c in self._sends()[since:]]

    def expected(self) -> list[str]:
        return [PICTURE, LONG_TEXT]


class Facebook:
    """The Graph fake: a transient 500 on the broadcast's second call."""

    name, bot_id, user = "facebook", "page", "PSID1"

    def __init__(self, server: FakeGraphServer) -> None:
        self.server = server

    @staticmethod
    def fake() -> FakeGraphServer:
        return FakeGraphServer()

    def bot(self) -> BotConfig:
        return BotConfig(id=self.bot_id, channel="facebook", token="PAGE-TOKEN",
                         secret=FB_SECRET, verify_token="verify-me", api_base=self.server.url)

    async def subscribe(self, platform) -> None:
        self.server.clock = platform.clock.now
        body = {"object": "page", "entry": [{"id": "1234567890", "time": 1767225600000,
                "messaging": [{"sender": {"id": "PSID1"}, "recipient": {"id": "1234567890"},
                               "timestamp": 1, "postback": {
                                   "title": "Get Started", "payload": "GET_STARTED",
                                   "mid": "m-gs-1"}}]}]}
        self.server.observe(body)
        digest = hmac.new(FB_SECRET.encode(), json.dumps(body).encode(),
                          hashlib.sha256).hexdigest()
        await _post(platform, "/webhooks/facebook/page", body,
                    {"X-Hub-Signature-256": f"sha256={digest}"})

    def _sends(self) -> list[Any]:
        return [c for c in self.server.calls if c.path.endswith("/me/messages")]

    def calls(self) -> int:
        return len(self._sends())

    def fail_send(self, number: int) -> None:
        self.server.fail_send(number, code=2, status=500,
                              message="Service temporarily unavailable")

    def arrived(self, since: int) -> list[tuple[str, Any]]:
        out = []
        for call in self._sends()[since:]:
            message = call.body["message"]
            payload = message.get("attachment", {}).get("payload", {})
            out.append((message.get("text") or payload.get("url") or payload.get("text"),
                        call.ok))
        return out

    def expected(self) -> list[str]:
        # 2,000 characters at most per text, 640 on a button template.
        head, tail = fit_message(Outgoing(text=LONG_TEXT, buttons=(Button(**BUTTON),)),
                                 FACEBOOK_CAPS)
        return [PICTURE, head.text, tail.text]


def _facebook_caps() -> Any:
    from bots.facebook import FACEBOOK_CAPABILITIES
    return FACEBOOK_CAPABILITIES


FACEBOOK_CAPS = _facebook_caps()
MESSENGERS: list[Callable[[Any], Any]] = [Telegram, Viber, Facebook]


@pytest.fixture(params=MESSENGERS, ids=lambda m: m.name)
async def messenger(request) -> Any:
    kind = request.param
    async with kind.fake() as server:
        yield kind(server)


async def _broadcast(platform, messenger, fake_time: list[float]) -> int:
    """Start a picture + long text + button broadcast and deliver it, past any pause."""
    _, key = await create_key(platform.db, name="m", role="marketer",
                              now=platform.clock.now())
    content = {"text": LONG_TEXT, "image_url": PICTURE, "buttons": [BUTTON]}
    async with platform.http_client() as client:
        client.headers["Authorization"] = f"Bearer {key}"
        created = await client.post("/api/broadcasts", json={
            "name": "spring", "filter": {"channel": messenger.name},
            "variants": [{"name": "A", "percent": 100,
                          "messages": {"en": content, "uk": content}}]})
        assert created.status_code == 201, created.text
        broadcast_id = created.json()["id"]
        assert (await client.post(f"/api/broadcasts/{broadcast_id}/start")).status_code == 200
    for _ in range(10):  # past the retry_after pause / the transient backoff
        await platform.drain()
        fake_time[0] += 120
        platform.clock.advance(timedelta(minutes=2))
    await platform.drain()
    return broadcast_id


async def test_a_fault_on_part_two_delivers_each_part_once_and_counts_one_person(
        make_platform, messenger) -> None:
    fake_time = [1000.0]  # the rate limiter's clock: a retry_after pause ends when we say
    platform = await make_platform(
        bots=[messenger.bot()], limiter=MemoryRateLimiter(monotonic=lambda: fake_time[0]))
    await messenger.subscribe(platform)
    await platform.drain()
    before = messenger.calls()
    messenger.fail_send(before + 2)  # the broadcast's second call
    broadcast_id = await _broadcast(platform, messenger, fake_time)

    arrived = messenger.arrived(before)
    assert [what for what, ok in arrived if ok] == messenger.expected()  # once, in order
    assert [ok for _, ok in arrived].count(False) == 1  # the injected fault, retried once
    assert arrived[1][1] is False
    async with platform.db.session() as session:
        rows = (await session.scalars(select(Outbox).where(
            Outbox.broadcast_id == broadcast_id).order_by(Outbox.id))).all()
        assert [r.status for r in rows] == ["sent"] * len(messenger.expected())
        figures = await broadcasts.stats(session, await session.get(Broadcast, broadcast_id))
    assert figures["A"]["targeted"] == 1
    assert figures["A"]["sent"] == 1  # one person, not one per part
    assert figures["A"]["failed"] == {}


async def test_send_makes_exactly_one_call_per_fitted_part(make_platform, messenger) -> None:
    platform = await make_platform(bots=[messenger.bot()])
    channel = platform.channel(messenger.name, messenger.bot_id)
    messages = [
        Outgoing(text=LONG_TEXT, image_url=PICTURE, buttons=(Button(**BUTTON),)),
        Outgoing(text="x " * 4000, buttons=tuple(
            Button(title=f"b{n}", payload=f"p{n}") for n in range(5)),
            quick_replies=(QuickReply(title="Yes", payload="y"),)),
        Outgoing(text="Picks for you", cards=tuple(
            Card(title=f"Cream {n}", subtitle="29 EUR", image_url=PICTURE,
                 buttons=(Button(title="View", url="https://shop.example.com/c"),))
            for n in range(12))),
        Outgoing(image_url=PICTURE),
    ]
    for message in messages:
        parts = fit_message(message, channel.capabilities)
        for part in parts:
            before = messenger.calls()
            result = await channel.send(messenger.user, part)
            assert messenger.calls() == before + 1, part
            assert result.status == "sent", result.reason
    # A message that was not fitted is refused whole, not sent in pieces.
    before = messenger.calls()
    unfitted = Outgoing(text="y " * 4000, image_url=PICTURE)
    result = await channel.send(messenger.user, unfitted)
    assert (result.status, messenger.calls()) == ("failed", before)
    assert "not fitted" in (result.reason or "")


def test_fit_message_puts_a_picture_first_when_its_text_is_no_caption() -> None:
    from bots.telegram import TELEGRAM_CAPABILITIES
    from bots.viber import VIBER_CAPABILITIES

    button = (Button(**BUTTON),)
    short = Outgoing(text="Spring sale", image_url=PICTURE, buttons=button)
    for caps in (TELEGRAM_CAPABILITIES, VIBER_CAPABILITIES):
        assert fit_message(short, caps) == [short]  # a caption with its keyboard: one call
        long = short.model_copy(update={"text": LONG_TEXT})
        picture, text = fit_message(long, caps)
        assert (picture.image_url, picture.text, picture.buttons) == (PICTURE, "", ())
        assert (text.image_url, text.text, text.buttons) == (None, LONG_TEXT, button)
    # Facebook: a picture carries neither text nor buttons; a button template's text is
    # 640 characters at most, a plain text's 2,000.
    parts = fit_message(short.model_copy(update={"text": LONG_TEXT}), FACEBOOK_CAPS)
    assert [p.image_url for p in parts] == [PICTURE, None, None]
    assert [bool(p.buttons) for p in parts] == [False, False, True]
    assert len(parts[1].text) <= 2000 and len(parts[2].text) <= 640
    assert " ".join(p.text for p in parts[1:]) == LONG_TEXT
    # A Telegram caption counts UTF-16 units: 600 emoji are 1,200 units, too long.
    emoji = Outgoing(text="😀" * 600, image_url=PICTURE)
    assert len(fit_message(emoji, TELEGRAM_CAPABILITIES)) == 2


async def test_a_person_blocked_on_part_two_counts_once_as_failed(make_platform) -> None:
    async with FakeTelegramServer() as server:
        messenger = Telegram(server)
        fake_time = [1000.0]
        platform = await make_platform(bots=[messenger.bot()], limiter=MemoryRateLimiter(
            monotonic=lambda: fake_time[0]))
        await messenger.subscribe(platform)
        await platform.drain()
        server.fail_send(messenger.calls() + 2, status=403)  # blocked after the picture
        broadcast_id = await _broadcast(platform, messenger, fake_time)
        async with platform.db.session() as session:
            figures = await broadcasts.stats(session, await session.get(Broadcast,
                                                                        broadcast_id))
    assert figures["A"]["sent"] == 0
    assert sum(figures["A"]["failed"].values()) + sum(figures["A"]["skipped"].values()) == 1


def test_only_shared_messages_are_kept_fitted() -> None:
    """A message rendered once for many subscribers is fitted once per channel; one
    subscriber's own text is fitted and forgotten (no personal text kept in memory)."""
    from bot_platform import fitting

    caps = Capabilities()
    own = Outgoing(text="Hi Olena, your code is 4711")
    assert fit_message(own, caps) == fit_message(own, caps)
    assert all(entry[0] is not own for entry in fitting._FITTED.values())
    shared = Outgoing(text="Welcome to the shop")
    fitting.share(shared)
    first, again = fit_message(shared, caps), fit_message(shared, caps)
    assert first == again and first[0] is again[0]  # the same parts, fitted once
    assert any(entry[0] is shared for entry in fitting._FITTED.values())
