"""Prometheus metrics: ``GET /metrics`` in the text exposition format.

Two kinds of figures, on purpose:

- **Counters of this process** (inbound events by channel and kind, webhook answers by
  status, send results, 429s), incremented in memory. With several processes each counts
  its own: Prometheus sums them over the scraped targets (``sum by (channel)``). A worker-
  only process (``botp worker``) has no HTTP server, so its send counters are not scraped;
  the database gauges below still show its work.
- **Gauges read from the database at scrape time** (outbox rows by status, rows due to
  send, jobs due, the lag of the oldest due job, the progress of running broadcasts): the
  same for every process and the truth with many of them. Each is one ``COUNT ... GROUP
  BY`` (or ``MIN``) over indexed columns, so a scrape stays cheap as tables grow.

Every platform has its own ``CollectorRegistry`` (not the process-global one), so several
platforms in one process (tests) never mix their figures.

Who may read it: figures such as queue sizes and broadcast reach are business data. With
``BOTP_METRICS_TOKEN`` set, a scrape must send ``Authorization: Bearer <token>``. Without
it, only direct callers from loopback or a private network are answered (a Prometheus
beside the server), and nothing that came through a proxy (``X-Forwarded-For`` /
``Forwarded`` present): the public URL, which messengers reach through the proxy, does not
show them.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select

from bot_platform.models import Broadcast, BroadcastRecipient, Job, Message, Outbox
from bot_platform.statuses import (
    BroadcastStatus,
    JobStatus,
    MessageStatus,
    OutboxStatus,
    RecipientStatus,
)
from bot_platform.types import SendResult, SendStatus

if TYPE_CHECKING:
    from starlette.requests import Request

    from bot_platform.platform import Platform

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

# Who may scrape without a token: the machine itself and private networks (RFC 1918, IPv6
# unique local), where a Prometheus beside the server sits.
LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7"))
BROADCASTS_SHOWN = 50  # running broadcasts with a progress series, newest first
SENT_STATUSES = (MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.READ)


class Metrics:
    """The in-process counters of one platform, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.channels: set[str] = set()  # label values allowed for webhook paths
        self.inbound = Counter(
            "botp_inbound_events", "Inbound events handled, by channel and kind "
            "(re-deliveries included)", ["channel", "kind"], registry=self.registry)
        self.webhook_responses = Counter(
            "botp_webhook_responses", "Answers to messenger webhooks, by channel and HTTP "
            "status", ["channel", "status"], registry=self.registry)
        self.sends = Counter(
            "botp_sends", "Send results recorded by delivery, by channel and result (sent, "
            "retry_after, transient, failed, blocked, outside_window, skipped)",
            ["channel", "result"], registry=self.registry)
        self.rate_limited = Counter(
            "botp_rate_limited", "Sends the messenger answered with 429 / retry_after",
            ["channel"], registry=self.registry)

    def inbound_event(self, channel: str, kind: str) -> None:
        self.inbound.labels(channel, kind).inc()

    def send_result(self, channel: str, result: SendResult, skipped: bool = False) -> None:
        self.sends.labels(channel, "skipped" if skipped else str(result.status)).inc()
        if result.status == SendStatus.RETRY_AFTER:
            self.rate_limited.labels(channel).inc()

    def webhook_answer(self, path: str, status: int) -> None:
        """Count an answer to ``/webhooks/{channel}/...``; a channel nobody configured
        (anyone can put anything in a path) is counted as "unknown", so the number of
        series stays bounded."""
        parts = path.split("/", 3)
        channel = parts[2] if len(parts) > 2 else ""
        self.webhook_responses.labels(channel if channel in self.channels else "unknown",
                                      str(status)).inc()


def metrics_of(platform: Platform) -> Metrics:
    """The platform's metrics, created on first use and handed to its engine and delivery
    (every app built for the platform shares them)."""
    metrics = platform.metrics
    if metrics is None:
        metrics = platform.metrics = Metrics()
    metrics.channels = {channel for channel, _ in platform.bots}
    platform.engine.metrics = metrics  # engine and worker both exist once started
    platform.worker.delivery.metrics = metrics
    return metrics


class WebhookCounter:
    """Pure ASGI middleware: counts the status of every answer to a webhook path (an
    exception that escapes counts as 500, the answer the server then gives)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/webhooks/"):
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counting_send(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                self.metrics.webhook_answer(path, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            if not status:
                self.metrics.webhook_answer(path, 500)
            raise


# ---- who may scrape ---------------------------------------------------------------------

def may_scrape(request: Request, token: str | None) -> bool:
    """With a token: the bearer token must match. Without: a direct caller from loopback
    or a private network (not through a proxy)."""
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode())
    if "x-forwarded-for" in request.headers or "forwarded" in request.headers:
        return False
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in LOCAL_NETWORKS)


# ---- figures from the database ----------------------------------------------------------

async def database_families(platform: Platform, now: datetime) -> list[Metric]:
    """The gauges read at scrape time: a handful of grouped counts on indexed columns."""
    outbox = GaugeMetricFamily("botp_outbox_rows", "Outbox rows by status (all processes)",
                               labels=["status"])
    due = GaugeMetricFamily("botp_outbox_due", "Outbox rows ready to send now, by channel "
                            "(the delivery queue's depth)", labels=["channel"])
    jobs = GaugeMetricFamily("botp_jobs_due", "Pending jobs (timers, broadcasts, scans) "
                             "already due, by kind", labels=["kind"])
    lag = GaugeMetricFamily("botp_job_lag_seconds", "How late the oldest due pending job "
                            "is (now - due_at); 0 when none is due")
    progress = GaugeMetricFamily("botp_broadcast_recipients", "Progress of running and "
                                 "paused broadcasts: people targeted, queued and sent to",
                                 labels=["broadcast_id", "state"])
    async with platform.db.session() as session:
        for status, count in (await session.execute(select(
                Outbox.status, func.count()).group_by(Outbox.status))).all():
            outbox.add_metric([status], count)
        for channel, count in (await session.execute(select(
                Outbox.channel, func.count()).where(
                Outbox.status == OutboxStatus.PENDING, Outbox.next_attempt_at <= now).group_by(
                Outbox.channel))).all():
            due.add_metric([channel], count)
        oldest = None
        for kind, count, first in (await session.execute(select(
                Job.kind, func.count(), func.min(Job.due_at)).where(
                Job.status == JobStatus.PENDING, Job.due_at <= now).group_by(Job.kind))).all():
            jobs.add_metric([kind], count)
            oldest = first if oldest is None else min(oldest, first)
        lag.add_metric([], max(0.0, (now - _aware(oldest, now)).total_seconds())
                       if oldest is not None else 0.0)
        running = (await session.scalars(select(Broadcast.id).where(
            Broadcast.status.in_((BroadcastStatus.RUNNING, BroadcastStatus.PAUSED))).order_by(
            Broadcast.id.desc()).limit(BROADCASTS_SHOWN))).all()
        if running:
            figures = {(b, state): 0 for b in running
                       for state in ("targeted", "queued", "sent")}
            for broadcast_id, status, count in (await session.execute(select(
                    BroadcastRecipient.broadcast_id, BroadcastRecipient.status,
                    func.count()).where(BroadcastRecipient.broadcast_id.in_(running))
                    .group_by(BroadcastRecipient.broadcast_id,
                              BroadcastRecipient.status))).all():
                figures[broadcast_id, "targeted"] += count
                if status == RecipientStatus.QUEUED:
                    figures[broadcast_id, "queued"] += count
            for broadcast_id, count in (await session.execute(select(
                    Message.broadcast_id, func.count(func.distinct(Message.subscriber_id)))
                    .where(Message.broadcast_id.in_(running),
                           Message.status.in_(SENT_STATUSES))
                    .group_by(Message.broadcast_id))).all():
                figures[broadcast_id, "sent"] = count
            for (broadcast_id, state), count in figures.items():
                progress.add_metric([str(broadcast_id), state], count)
    return [outbox, due, jobs, lag, progress]


def _aware(moment: datetime, like: datetime) -> datetime:
    """SQLite hands back naive datetimes: read them in the clock's zone."""
    if moment.tzinfo is None and like.tzinfo is not None:
        return moment.replace(tzinfo=like.tzinfo)
    return moment


class _Fixed:
    """A collector of families computed beforehand (the database figures of one scrape)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


async def exposition(platform: Platform, metrics: Metrics) -> tuple[bytes, str]:
    """The scrape body: this process's counters, then the database gauges."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_Fixed(await database_families(platform, platform.clock.now())))
    return generate_latest(metrics.registry) + generate_latest(scrape), CONTENT_TYPE_LATEST
