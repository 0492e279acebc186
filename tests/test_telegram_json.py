"""Telegram sends posted as JSON (``bots.telegram_json``): every Bot API answer becomes the
``SendResult`` kind aiogram's own classification gave, against the strict fake, and no
result carries the token."""

from __future__ import annotations

import socket

import pytest
from aiogram.exceptions import ClientDecodeError, TelegramRetryAfter, TelegramServerError

from bot_platform.channels import ChannelDeps
from bot_platform.config import BotConfig
from bot_platform.types import Button, Outgoing, QuickReply, SendStatus
from bots import telegram
from bots.telegram_json import read_answer
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.telegram import TOKEN


class Memory:
    """The key-value seam in a dict (long callback payloads)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.values.get(key)

    async def set(self, key: str, value: str) -> None:
        self.values[key] = value


def channel_for(api_base: str) -> telegram.TelegramChannel:
    return telegram.build(BotConfig(id="shop", channel="telegram", token=TOKEN,
                                    api_base=api_base), ChannelDeps(http=None, kv=Memory()))


@pytest.fixture
async def channel(fake: FakeTelegramServer):
    built = channel_for(fake.url)
    yield built
    await built.close()


def no_token(reason: str | None) -> bool:
    return TOKEN not in (reason or "") and TOKEN.partition(":")[2] not in (reason or "")


async def test_a_send_is_one_json_post_with_the_message_id_back(channel, fake) -> None:
    result = await channel.send("1111", Outgoing(text="Tom & <Jerry>", buttons=(
        Button(title="Shop", url="https://shop.example.com"), Button(title="Later"))))
    assert result.status == SendStatus.SENT and result.message_id.isdigit()
    call = fake.sent(1111)[-1]
    assert call.params == {"chat_id": 1111, "parse_mode": "HTML", "text": "Tom &amp; &lt;Jerry&gt;",
                           "reply_markup": {"inline_keyboard": [
                               [{"text": "Shop", "url": "https://shop.example.com"}],
                               [{"text": "Later", "callback_data": "Later"}]]}, "_ok": True}
    await channel.send("1111", Outgoing(text="Phone?", quick_replies=(
        QuickReply(title="Send", request="phone"), QuickReply(title="No", payload="n"))))
    assert fake.sent(1111)[-1].params["reply_markup"] == {
        "keyboard": [[{"text": "Send", "request_contact": True}, {"text": "No"}]],
        "resize_keyboard": True, "one_time_keyboard": True}
    await channel.send("1111", Outgoing(text="Bye", extras={"remove_keyboard": True}))
    assert fake.sent(1111)[-1].params["reply_markup"] == {"remove_keyboard": True}
    await channel.send("1111", Outgoing(image_url="https://img.example.com/p.jpg"))
    photo = fake.sent(1111)[-1]
    assert photo.method == "sendPhoto" and "caption" not in photo.params
    assert fake.refused() == []


async def test_a_429_is_a_retry_after_with_telegrams_delay(channel, fake) -> None:
    fake.rate_limit(per_second=0, retry_after=7)
    result = await channel.send("1", Outgoing(text="x"))
    assert (result.status, result.retry_after) == (SendStatus.RETRY_AFTER, 7.0)
    assert "Retry in 7 seconds" in result.reason


async def test_a_blocked_chat_is_blocked(channel, fake) -> None:
    fake.block(7)
    result = await channel.send("7", Outgoing(text="x"))
    assert (result.status, result.reason) == (SendStatus.BLOCKED,
                                              "Forbidden: bot was blocked by the user")


async def test_a_refused_token_fails_without_the_token(channel, fake, caplog) -> None:
    fake.revoke(TOKEN)
    result = await channel.send("1", Outgoing(text="x"))
    assert (result.status, result.reason) == (SendStatus.FAILED, "unauthorized: Unauthorized")
    assert "the bot token was rejected" in caplog.text and TOKEN not in caplog.text


@pytest.mark.parametrize("status", [400, 404])
async def test_bad_requests_fail(channel, fake, status: int) -> None:
    fake.fail_next(1, status=status)
    result = await channel.send("1", Outgoing(text="x"))
    assert (result.status, result.reason) == (SendStatus.FAILED, "Error")
    assert (await channel.send("-5", Outgoing(text="x"))).reason == \
        "Bad Request: chat not found"


@pytest.mark.parametrize("status", [500, 502, 409, 418])
async def test_server_errors_and_other_statuses_are_transient(channel, fake, status) -> None:
    fake.fail_next(1, status=status)
    result = await channel.send("1", Outgoing(text="x"))
    assert result.status == SendStatus.TRANSIENT and no_token(result.reason)
    assert (await channel.send("1", Outgoing(text="x"))).status == SendStatus.SENT


async def test_an_unreachable_api_is_transient_without_the_token() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    channel = channel_for(f"http://127.0.0.1:{port}")
    try:
        result = await channel.send("1", Outgoing(text="x"))
    finally:
        await channel.close()
    assert result.status == SendStatus.TRANSIENT
    assert result.reason.startswith("TelegramNetworkError: HTTP Client says - ")
    assert no_token(result.reason)


async def test_a_timeout_is_transient(channel, fake) -> None:
    assert channel.sends.http is not None
    channel.sends.http.timeout = 0.05
    fake.delay = 1.0
    result = await channel.send("1", Outgoing(text="x"))
    assert (result.status, result.reason) == (
        SendStatus.TRANSIENT, "TelegramNetworkError: HTTP Client says - Request timeout error")


def test_answers_that_are_not_bot_api_envelopes_are_decode_errors() -> None:
    params = {"chat_id": 5, "text": "x"}
    for raw in (b"<html>502 Bad Gateway</html>", b"[1]", b'{"result": {"message_id": 1}}',
                b'{"ok": true, "result": {"chat": {}}}', b'{"ok": true}'):
        with pytest.raises(ClientDecodeError):
            read_answer("sendMessage", params, 200, raw)
    assert read_answer("sendMessage", params, 200,
                       b'{"ok": true, "result": {"message_id": 9}}') == {"message_id": 9}
    with pytest.raises(TelegramRetryAfter) as retry:
        read_answer("sendMessage", params, 429, b'{"ok": false, "error_code": 429, '
                    b'"description": "Too Many Requests", "parameters": {"retry_after": 2}}')
    assert retry.value.retry_after == 2 and "'SendMessage' in chat 5" in retry.value.message
    with pytest.raises(TelegramServerError):  # ok with an error status is an error
        read_answer("sendMessage", params, 502, b'{"ok": true, "result": {"message_id": 1}}')


async def test_a_session_through_a_proxy_posts_on_aiohttp(channel, fake) -> None:
    """Our connections do not go through proxies: such a bot sends on aiogram's client."""
    channel.sends.http = None
    assert (await channel.send("1111", Outgoing(text="a & b"))).status == SendStatus.SENT
    assert fake.sent(1111)[-1].params["text"] == "a &amp; b"
    fake.block(7)
    assert (await channel.send("7", Outgoing(text="x"))).status == SendStatus.BLOCKED
