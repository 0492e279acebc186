"""Bot secrets never leave the process: not in stored errors (outbox, messages), not in API
answers (``recent_messages[].error``, 422 echoes, bot listings), not in log lines.

The messenger endpoints here misbehave the ways that put a token into an error message: a
redirect loop (the client's error names the URL, and Telegram's and Facebook's URLs carry
the token), and error bodies that repeat the request's URL and headers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig, WorkerSettings
from bot_platform.models import Base, Outbox, Subscriber
from bot_platform.redaction import REDACTED, Redactor, redact_secrets, remember_secrets
from tests.fakes.leaky import LeakyMessenger
from tests.support.platform import wait_for
from tests.support.telegram import message_update

TG_TOKEN = "555666777:AAPollSecretTokenValue_abcdefghij"
TG_SECRET = "tg-webhook-secret-0123"
VB_TOKEN = "4a5b6c7d8e9f-viber-auth-token-value-0123456789"
FB_PAGE_TOKEN = "EAAGpageAccessTokenValue0123456789abcdef"
FB_APP_SECRET = "fb-app-secret-value-0123456789"
FB_VERIFY = "fb-verify-token-0123"
SECRETS = {
    "telegram": [TG_TOKEN, TG_TOKEN.partition(":")[2], TG_SECRET],
    "viber": [VB_TOKEN],
    "facebook": [FB_PAGE_TOKEN, FB_APP_SECRET, FB_VERIFY],
}


def bot_for(channel: str, api_base: str) -> BotConfig:
    if channel == "telegram":
        return BotConfig(id="b", channel="telegram", token=TG_TOKEN, secret=TG_SECRET,
                         api_base=api_base)
    if channel == "viber":
        return BotConfig(id="b", channel="viber", token=VB_TOKEN, api_base=api_base)
    return BotConfig(id="b", channel="facebook", token=FB_PAGE_TOKEN, secret=FB_APP_SECRET,
                     verify_token=FB_VERIFY, api_base=api_base)


async def customer_writes(platform: Any, channel: str) -> httpx.Response:
    """A customer's first message through the bot's real webhook (the bot answers it)."""
    headers = {"Content-Type": "application/json"}
    if channel == "telegram":
        raw = json.dumps(message_update(1, "/start")).encode()
        headers["X-Telegram-Bot-Api-Secret-Token"] = TG_SECRET
    elif channel == "viber":
        raw = json.dumps({"event": "message", "timestamp": 1457764197627, "message_token": 7,
                          "sender": {"id": "viber-user=", "name": "Olena", "language": "en"},
                          "message": {"type": "text", "text": "hello"}}).encode()
        headers["X-Viber-Content-Signature"] = hmac.new(
            VB_TOKEN.encode(), raw, hashlib.sha256).hexdigest()
    else:
        raw = json.dumps({"object": "page", "entry": [{"id": "1", "time": 1, "messaging": [{
            "sender": {"id": "PSID1"}, "recipient": {"id": "1"}, "timestamp": 1,
            "postback": {"title": "Get Started", "payload": "GET_STARTED", "mid": "m-1"}}]}]}
        ).encode()
        digest = hmac.new(FB_APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
        headers["X-Hub-Signature-256"] = f"sha256={digest}"
    async with platform.http_client() as client:
        return await client.post(f"/webhooks/{channel}/b", content=raw, headers=headers)


async def every_stored_value(platform: Any) -> str:
    """Every row of every table, as text."""
    rows = []
    async with platform.db.session() as session:
        for table in Base.metadata.sorted_tables:
            rows.extend(repr(tuple(row)) for row in (await session.execute(
                select(table))).all())
    return "\n".join(rows)


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join([caplog.text, *(f"{r.getMessage()} {r.exc_text or ''}"
                                     for r in caplog.records)])


def assert_no_secret(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret is in {where}: {text[:2000]}"


# What each channel's error said, unredacted, before: the token in the URL or an echo.
LEAKED_BEFORE = {("telegram", "redirect"), ("telegram", "json"), ("telegram", "text"),
                 ("facebook", "redirect"), ("facebook", "json"), ("viber", "json")}


@pytest.mark.parametrize("mode", ["redirect", "json", "text"])
@pytest.mark.parametrize("channel", ["telegram", "viber", "facebook"])
async def test_send_errors_are_stored_returned_and_logged_without_secrets(
        make_platform, caplog: pytest.LogCaptureFixture, channel: str, mode: str) -> None:
    secrets = SECRETS[channel]
    async with LeakyMessenger(mode) as server:
        platform = await make_platform(bots=[bot_for(channel, server.url)],
                                       worker=WorkerSettings(poll_interval=0.05,
                                                             max_attempts=1))
        _, key = await create_key(platform.db, name="admin", role="admin",
                                  now=platform.clock.now())
        with caplog.at_level(logging.DEBUG):
            response = await customer_writes(platform, channel)
            assert response.status_code == 200, response.text
            await platform.drain()
            assert server.calls > 0  # the bot did try to answer
            async with platform.db.session() as session:
                errors = (await session.scalars(select(Outbox.last_error))).all()
                subscriber_id = await session.scalar(select(Subscriber.id))
            async with platform.http_client() as client:
                auth = {"Authorization": f"Bearer {key}"}
                detail = await client.get(f"/api/subscribers/{subscriber_id}", headers=auth)
                bots = await client.get("/api/bots", headers=auth)

    # The failure is recorded and shown, with what went wrong, minus the secrets.
    assert errors and all(errors), errors
    assert detail.status_code == 200, detail.text
    shown = [m["error"] for m in detail.json()["recent_messages"] if m.get("error")]
    assert shown, detail.text
    if (channel, mode) in LEAKED_BEFORE:
        assert any(REDACTED in error for error in errors), errors
        assert any(REDACTED in error for error in shown), shown
    assert_no_secret(await every_stored_value(platform), secrets, "the database")
    assert_no_secret(detail.text, secrets, "GET /api/subscribers/{id}")
    assert bots.status_code == 200
    assert_no_secret(bots.text, secrets, "GET /api/bots")
    assert_no_secret(logged(caplog), secrets, "the log")


async def test_telegram_poller_logs_its_failures_without_the_token(
        make_platform, caplog: pytest.LogCaptureFixture) -> None:
    async with LeakyMessenger("redirect") as server:
        platform = await make_platform(bots=[BotConfig(
            id="poll", channel="telegram", token=TG_TOKEN, api_base=server.url)])
        adapter = platform.channel("telegram", "poll")
        with caplog.at_level(logging.WARNING):
            polling = asyncio.create_task(adapter.poll(platform.engine.handle))

            async def failed_once() -> bool:
                return any("getUpdates failed" in r.getMessage() for r in caplog.records)

            try:
                await wait_for(failed_once, what="a getUpdates failure")
            finally:
                polling.cancel()
                await asyncio.gather(polling, return_exceptions=True)
    [line] = [r.getMessage() for r in caplog.records if "getUpdates failed" in r.getMessage()]
    assert "TooManyRedirects" in line and f"/bot{REDACTED}/getUpdates" in line, line
    assert_no_secret(logged(caplog), SECRETS["telegram"], "the poller's log")


def test_a_redactor_removes_its_secrets_in_every_form_and_token_shaped_urls() -> None:
    redact = Redactor("555:AAsecret+value/1", None, "")
    text = ("url='https://api.telegram.org/bot555:AAsecret+value/1/sendMessage' "
            "q=access_token=555%3AAAsecret%2Bvalue%2F1&x=1 plus=555%3AAAsecret%2Bvalue%2F1 "
            "other=https://graph.facebook.com/v21.0/me/messages?access_token=EAAother&v=2 "
            "tg=/bot42:AAother-bots_token/getMe")
    clean = redact(text)
    assert "AAsecret" not in clean and "EAAother" not in clean and "AAother-bots" not in clean
    assert "access_token=[redacted]&v=2" in clean and "/bot[redacted]/getMe" in clean
    assert "https://graph.facebook.com/v21.0/me/messages" in clean  # the rest stays useful


def test_every_log_record_is_cleaned_of_known_secrets(
        caplog: pytest.LogCaptureFixture) -> None:
    """The safety net behind the adapters: any logger, message args and tracebacks."""
    secret = "third-party-adapter-secret-42"
    remember_secrets(secret)
    assert redact_secrets(f"x {secret} y") == f"x {REDACTED} y"
    with caplog.at_level(logging.INFO):
        logging.getLogger("some.library").info("calling with %s", secret)
        try:
            raise RuntimeError(f"request to https://x.example/{secret} failed")
        except RuntimeError:
            logging.getLogger("another.library").exception("it broke")
    assert secret not in caplog.text
    assert "calling with [redacted]" in caplog.text
    assert f"https://x.example/{REDACTED} failed" in caplog.text


ADMIN_TOKEN = "987654:XYZ-never-echo-this-token"
BODY_SECRET = "never-echo-this-secret"


@pytest.mark.parametrize("body", [
    {"channel": "telegram", "token": ADMIN_TOKEN, "secret": BODY_SECRET},  # no bot_id
    {"channel": "telegram", "bot_id": "bad id!", "token": ADMIN_TOKEN, "secret": BODY_SECRET},
    {"channel": "nope", "bot_id": "b", "token": ADMIN_TOKEN, "verify_token": BODY_SECRET},
    {"channel": "telegram", "bot_id": "b", "token": [ADMIN_TOKEN], "secret": {"v": BODY_SECRET}},
    {"channel": "telegram", "bot_id": "b", "token": ADMIN_TOKEN, "secret": BODY_SECRET,
     "messages_per_second": -1, "options": {"nested": {"token": ADMIN_TOKEN}}},
])
async def test_a_422_for_a_bot_never_echoes_its_secrets(make_platform, body: dict) -> None:
    platform = await make_platform()
    _, key = await create_key(platform.db, name="a", role="admin", now=platform.clock.now())
    auth = {"Authorization": f"Bearer {key}"}
    async with platform.http_client() as client:
        created = await client.post("/api/bots", headers=auth, json=body)
        updated = await client.patch("/api/bots/telegram/b", headers=auth, json={
            **{k: v for k, v in body.items() if k in ("token", "secret", "verify_token")},
            "messages_per_second": "fast"})
        broken = await client.post("/api/bots", headers={**auth, "Content-Type":
                                                         "application/json"},
                                   content=json.dumps(body)[:-5].encode())
    for response in (created, updated, broken):
        assert response.status_code == 422, response.text
        assert isinstance(response.json()["detail"], list)  # FastAPI's shape, kept
        assert_no_secret(response.text, [ADMIN_TOKEN, ADMIN_TOKEN.partition(":")[2],
                                         BODY_SECRET], "a 422")
    # What is not secret still helps the caller.
    [error, *_] = created.json()["detail"]
    assert error["loc"][0] == "body" and error["msg"]


async def test_the_bots_api_never_returns_a_secret(make_platform) -> None:
    platform = await make_platform(bots=[bot_for("viber", "http://127.0.0.1:9")])
    _, key = await create_key(platform.db, name="a", role="admin", now=platform.clock.now())
    auth = {"Authorization": f"Bearer {key}"}
    responses: list[httpx.Response] = []
    calls: list[Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]] = [
        lambda c: c.post("/api/bots", headers=auth, json={
            "channel": "facebook", "bot_id": "fb", "token": FB_PAGE_TOKEN,
            "secret": FB_APP_SECRET, "verify_token": FB_VERIFY,
            "api_base": "http://127.0.0.1:9"}),
        lambda c: c.get("/api/bots", headers=auth),
        lambda c: c.patch("/api/bots/facebook/fb", headers=auth, json={"token": TG_TOKEN}),
        lambda c: c.post("/api/bots/facebook/fb/webhook", headers=auth),
        lambda c: c.get("/api/bots", headers=auth),
    ]
    async with platform.http_client() as client:
        for call in calls:
            responses.append(await call(client))
    assert [r.status_code for r in responses] == [201, 200, 200, 200, 200], \
        [r.text for r in responses]
    for response in responses:
        assert_no_secret(response.text, [*SECRETS["facebook"], *SECRETS["viber"], TG_TOKEN],
                         str(response.request.url))


async def test_a_facebook_verify_token_in_a_logged_url_is_redacted(
        make_platform, caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn's access log line holds the query string of Facebook's handshake."""
    await make_platform(bots=[bot_for("facebook", "http://127.0.0.1:9")])
    access = logging.getLogger("uvicorn.access")
    # A uvicorn server started by an earlier test configures this logger not to propagate.
    access.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        access.info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1", "GET",
            f"/webhooks/facebook/b?hub.mode=subscribe&hub.verify_token={FB_VERIFY}"
            "&hub.challenge=1", "1.1", 200)
    access.removeHandler(caplog.handler)
    assert_no_secret(logged(caplog), [FB_VERIFY], "the access log")
    assert "hub.verify_token=[redacted]&hub.challenge=1" in caplog.text


async def test_viber_broadcast_results_carry_no_token() -> None:
    """``send_many`` (one call for many receivers) is redacted like ``send``."""
    import aiohttp

    from bot_platform.types import Outgoing
    from bots.viber import ViberChannel

    async with LeakyMessenger("json") as server, aiohttp.ClientSession() as http:
        channel = ViberChannel("b", token=VB_TOKEN, http=http, api_base=server.url)
        results = await channel.send_many(["u1", "u2"], Outgoing(text="hi"))
    assert set(results) == {"u1", "u2"}
    assert all(r.reason and REDACTED in r.reason for r in results.values()), results
    assert_no_secret(repr(results), [VB_TOKEN], "send_many results")
