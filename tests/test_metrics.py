"""/metrics after real conversations (webhook -> engine -> delivery -> Telegram fake), who
may scrape it, and the JSON log lines (context fields, never a token)."""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bot_platform.config import BotConfig
from bot_platform.logs import JsonFormatter, log_context
from bot_platform.models import Broadcast, BroadcastRecipient, Job, Message, Subscriber
from tests.support.telegram import SECRET, TOKEN, callback_update, message_update, post


async def scrape(platform, client: httpx.AsyncClient | None = None,
                 **headers: str) -> dict[tuple[str, frozenset], float]:
    if client is None:
        async with platform.http_client() as client:
            response = await client.get("/metrics", headers=headers)
    else:
        response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_a_conversation_moves_the_counters_and_gauges(telegram, fake) -> None:
    before = await scrape(telegram)
    assert value(before, "botp_inbound_events_total", channel="telegram", kind="start") == 0

    assert (await post(telegram, message_update(1, "/start"))).status_code == 200
    queued = await scrape(telegram)  # not sent yet: waiting in the outbox, due now
    assert value(queued, "botp_outbox_rows", status="pending") == 1
    assert value(queued, "botp_outbox_due", channel="telegram") == 1
    await telegram.drain()
    [greeting] = fake.sent(1111)
    payload = greeting.params["reply_markup"]["inline_keyboard"][1][0]["callback_data"]
    assert (await post(telegram, callback_update(2, payload))).status_code == 200
    assert (await post(telegram, message_update(1, "/start"))).status_code == 200  # again
    assert (await post(telegram, message_update(3, "hi"), secret="wrong")).status_code == 401
    await telegram.drain()

    after = await scrape(telegram)
    assert value(after, "botp_inbound_events_total", channel="telegram", kind="start") == 2
    assert value(after, "botp_inbound_events_total", channel="telegram", kind="button") == 1
    assert value(after, "botp_webhook_responses_total", channel="telegram", status="200") == 3
    assert value(after, "botp_webhook_responses_total", channel="telegram", status="401") == 1
    sent = len(fake.sent(1111))
    assert sent == 2
    assert value(after, "botp_sends_total", channel="telegram", result="sent") == sent
    assert value(after, "botp_outbox_rows", status="sent") == sent
    assert value(after, "botp_outbox_rows", status="pending") == 0
    assert value(after, "botp_outbox_due", channel="telegram") == 0
    assert value(after, "botp_rate_limited_total", channel="telegram") == 0

    # The messenger answers 429: counted as a retry_after result and as a 429.
    fake.rate_limit(per_second=0, retry_after=5)
    assert (await post(telegram, message_update(4, "/start", uid=2222))).status_code == 200
    await telegram.drain()
    assert fake.too_many_requests == 1
    limited = await scrape(telegram)
    assert value(limited, "botp_rate_limited_total", channel="telegram") == 1
    assert value(limited, "botp_sends_total", channel="telegram", result="retry_after") == 1
    assert value(limited, "botp_outbox_rows", status="pending") == 1
    assert value(limited, "botp_outbox_due", channel="telegram") == 0  # waits 5 s


async def test_webhook_paths_of_unknown_channels_share_one_series(telegram) -> None:
    async with telegram.http_client() as client:
        for channel in ("nope", "x" * 50, "telegram"):
            await client.post(f"/webhooks/{channel}/other", content=b"{}")
    samples = await scrape(telegram)
    assert value(samples, "botp_webhook_responses_total", channel="unknown", status="404") == 2
    assert value(samples, "botp_webhook_responses_total", channel="telegram", status="404") == 1
    assert not [key for key in samples if ("channel", "nope") in key[1]]


async def test_job_lag_queue_depth_and_broadcast_progress(make_platform, fake,
                                                          db_url) -> None:
    telegram = await make_platform(database_url=db_url, bots=[BotConfig(
        id="shop", channel="telegram", token=TOKEN, secret=SECRET, api_base=fake.url)])
    now = telegram.clock.now()
    await post(telegram, message_update(1, "/start"))
    await post(telegram, message_update(2, "/start", uid=2222))
    await telegram.drain()
    async with telegram.db.session() as session:
        first, second = (await session.scalars(
            Subscriber.__table__.select().with_only_columns(Subscriber.id)
            .order_by(Subscriber.id))).all()
        session.add_all([
            Job(kind="timer", subscriber_id=first, due_at=now - timedelta(seconds=90),
                status="pending", payload={}, created_at=now),
            Job(kind="timer", subscriber_id=second, due_at=now - timedelta(seconds=30),
                status="pending", payload={}, created_at=now),
            Job(kind="timer", subscriber_id=second, due_at=now + timedelta(hours=1),
                status="pending", payload={}, created_at=now),
        ])
        broadcast = Broadcast(name="spring", status="running", segment={}, variants=[],
                              created_at=now)
        session.add(broadcast)
        await session.flush()
        session.add_all([
            BroadcastRecipient(broadcast_id=broadcast.id, subscriber_id=first, variant="a",
                               status="queued"),
            BroadcastRecipient(broadcast_id=broadcast.id, subscriber_id=second, variant="a",
                               status="skipped", reason="unsubscribed"),
            Message(subscriber_id=first, channel="telegram", direction="out", kind="text",
                    status="delivered", broadcast_id=broadcast.id, created_at=now,
                    updated_at=now)])
    samples = await scrape(telegram)
    assert value(samples, "botp_job_lag_seconds") == 90
    assert value(samples, "botp_jobs_due", kind="timer") == 2
    progress = {state: value(samples, "botp_broadcast_recipients",
                             broadcast_id=str(broadcast.id), state=state)
                for state in ("targeted", "queued", "sent")}
    assert progress == {"targeted": 2, "queued": 1, "sent": 1}


# ---- who may scrape -----------------------------------------------------------------------

def client_from(platform, host: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=platform.app(),
                                                           client=(host, 40000)),
                             base_url="http://testserver")


async def test_without_a_token_only_direct_local_callers_may_scrape(telegram) -> None:
    async with client_from(telegram, "93.184.216.34") as public:
        assert (await public.get("/metrics")).status_code == 404
    async with client_from(telegram, "127.0.0.1") as local:
        proxied = await local.get("/metrics", headers={"X-Forwarded-For": "93.184.216.34"})
        assert proxied.status_code == 404
        assert "botp_" not in proxied.text
        await scrape(telegram, local)
    async with client_from(telegram, "10.1.2.3") as private:
        await scrape(telegram, private)


async def test_with_a_token_a_bearer_is_required_from_everywhere(make_platform) -> None:
    platform = await make_platform(metrics_token="scrape-me-1234")
    async with client_from(platform, "127.0.0.1") as local:
        assert (await local.get("/metrics")).status_code == 404
        for wrong in ("Bearer nope", "Basic scrape-me-1234", "scrape-me-1234"):
            assert (await local.get("/metrics", headers={"Authorization": wrong})
                    ).status_code == 404
    async with client_from(platform, "93.184.216.34") as public:
        await scrape(platform, public, Authorization="Bearer scrape-me-1234")


async def test_each_platform_has_its_own_registry(make_platform, telegram) -> None:
    other = await make_platform()
    await post(telegram, message_update(1, "/start"))
    assert value(await scrape(telegram), "botp_inbound_events_total", channel="telegram",
                 kind="start") == 1
    assert value(await scrape(other), "botp_inbound_events_total", channel="telegram",
                 kind="start") == 0


# ---- JSON log lines -----------------------------------------------------------------------

def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_context_and_never_a_token() -> None:
    from bot_platform.redaction import remember_secrets

    secret = "987654:JSON-log-secret-token-xyz"
    remember_secrets(secret)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("botp.test_json_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("outside any event")
        with log_context(bot="shop", channel="telegram"), log_context(subscriber_id=42):
            logger.warning("calling https://api.example/bot%s/sendMessage", secret)
            try:
                raise RuntimeError(f"token {secret} refused")
            except RuntimeError:
                logger.exception("send failed")
        logger.info("after it")
    finally:
        logger.removeHandler(handler)
    outside, call, failure, after = json_lines(stream)
    assert set(outside) == {"time", "level", "logger", "message"}
    assert outside["logger"] == "botp.test_json_logs" and outside["level"] == "INFO"
    assert outside["time"].endswith("Z")
    assert call["level"] == "WARNING"
    assert (call["bot"], call["channel"], call["subscriber_id"]) == ("shop", "telegram", 42)
    assert call["message"] == "calling https://api.example/bot[redacted]/sendMessage"
    assert "RuntimeError: token [redacted] refused" in failure["exc"]
    assert failure["subscriber_id"] == 42
    assert "bot" not in after
    assert secret not in stream.getvalue()


async def test_the_inbound_chain_sets_bot_channel_and_subscriber(telegram, fake) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bot_platform")
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.DEBUG
    original = telegram.engine.step_flows

    async def step_flows(context, call_next) -> None:
        logging.getLogger("bot_platform.inbound").info("flows step")
        await original(context, call_next)

    telegram.engine.steps[telegram.engine.steps.index(original)] = step_flows
    try:
        await post(telegram, message_update(1, "/start"))
        await post(telegram, message_update(1, "/start"))  # a duplicate: logged, no subscriber
    finally:
        logger.removeHandler(handler)
        logger.level = old_level
    seen = json_lines(stream)
    [flows] = [line for line in seen if line["message"] == "flows step"]
    [duplicate] = [line for line in seen if line["message"].startswith("duplicate")]
    async with telegram.db.session() as session:
        from sqlalchemy import select

        subscriber_id = await session.scalar(select(Subscriber.id))
    assert (flows["bot"], flows["channel"], flows["subscriber_id"]) == (
        "shop", "telegram", subscriber_id)
    assert (duplicate["bot"], duplicate["channel"]) == ("shop", "telegram")
    assert "subscriber_id" not in duplicate
    assert TOKEN not in stream.getvalue()


async def test_a_worker_serves_its_own_counters(telegram, fake) -> None:
    """``botp worker`` with BOTP_METRICS_PORT serves this app: only /metrics, with the
    worker's send counters (a web process sends nothing in a scaled-out set-up)."""
    from bot_platform.app import create_metrics_app

    await post(telegram, message_update(1, "/start"))
    await telegram.drain()
    transport = httpx.ASGITransport(app=create_metrics_app(telegram))
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        samples = await scrape(telegram, client)
        assert (await client.get("/docs")).status_code == 404
        assert (await client.get("/webhooks/telegram/shop")).status_code == 404
    assert value(samples, "botp_sends_total", channel="telegram", result="sent") == 1
    assert value(samples, "botp_outbox_rows", status="sent") == 1


def test_the_command_line_logs_json_lines_when_asked(tmp_path) -> None:
    """``botp``'s logging set-up with BOTP_LOG_FORMAT=json: every line a JSON object."""
    import os
    import subprocess
    import sys

    from tests.support.platform import ROOT

    script = ("import logging; from bot_platform.cli import _setup_logging; "
              "from bot_platform.config import Settings; "
              "_setup_logging(Settings(_env_file=None)); "
              "logging.getLogger('botp').info('ready %s', 42)")
    env = {**os.environ, "BOTP_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=True)
    [line] = [json.loads(line) for line in done.stderr.splitlines()]
    assert (line["logger"], line["level"], line["message"]) == ("botp", "INFO", "ready 42")
