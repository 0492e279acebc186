"""The ASGI app: messenger webhooks (and, when installed, the admin API).

The webhook endpoint is the edge: it hands the raw request to the channel adapter, which
verifies and normalizes it; the engine handles the events before we answer, so a 200 means
the events are durably recorded (a messenger re-sends on anything else, and dedupe makes
that safe).
"""

from __future__ import annotations

import importlib
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from sqlalchemy import select, text, update

from bot_platform.channels import WebhookRequest
from bot_platform.errors import BadPayload, BadSignature, http_status_for
from bot_platform.models import Message, Outbox

if TYPE_CHECKING:
    from bot_platform.platform import Platform

log = logging.getLogger(__name__)

REPLY_HOLD = timedelta(seconds=10)

# Routers mounted when their package is importable (the core does not depend on them).
OPTIONAL_ROUTERS = ("admin_api:create_router",)


def create_app(platform: Platform) -> FastAPI:
    app = FastAPI(title="botp", version="0.1.0",
                  description="Multi-messenger retention chatbot platform")
    app.state.platform = platform

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        async with platform.db.session() as session:
            await session.execute(text("SELECT 1"))
        return {"status": "ok"}

    @app.get("/r/{token}", tags=["tracking"], summary="Count a click and redirect")
    async def tracked_redirect(token: str) -> Response:
        from bot_platform.catalog import register_click

        target = await register_click(platform.db, token, platform.clock.now())
        if target is None:
            return Response("unknown link", status_code=404)
        return Response(status_code=302, headers={"Location": target})

    @app.api_route("/webhooks/{channel}/{bot_id}", methods=["GET", "POST"], tags=["webhooks"],
                   include_in_schema=False)
    async def webhook(channel: str, bot_id: str, request: Request) -> Response:
        adapter = platform.channel(channel, bot_id)
        if adapter is None:
            log.warning("webhook for unknown bot %s/%s", channel, bot_id)
            return Response("unknown bot", status_code=404)
        call = WebhookRequest(
            method=request.method,
            headers={k.lower(): v for k, v in request.headers.items()},
            query=dict(request.query_params),
            body=await request.body(),
        )
        try:
            events = await adapter.parse(call)
        except BadSignature as error:
            log.warning("rejected webhook for %s/%s: %s", channel, bot_id, error)
            return Response("forbidden", status_code=http_status_for(error))
        except BadPayload as error:
            log.warning("malformed webhook for %s/%s: %s", channel, bot_id, error)
            return Response("bad request", status_code=400)
        reply_hook = getattr(adapter, "reply", None)
        # An adapter whose response may carry a queued message gets its messages held
        # back from the worker until it has chosen (then released at once).
        holds = getattr(adapter, "replies_carry_messages", False)
        hold = REPLY_HOLD if holds else None
        handled = [await platform.engine.handle(event, hold=hold) for event in events]
        if reply_hook is None:
            return Response("ok", media_type="text/plain")
        held = [i for h in handled for i in h.outbox_ids] if holds else []
        try:
            reply = await reply_hook(call, handled)
            if reply is not None and reply.consumed_outbox_ids and not await _take_over(
                    platform, reply.consumed_outbox_ids):
                reply = None  # the worker was faster (the hold expired): it sends them
        finally:
            if held:
                await platform.engine.release(held)
        if reply is None:
            return Response("ok", media_type="text/plain")
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    for target in OPTIONAL_ROUTERS:
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        factory = getattr(module, attribute, None)
        if factory is not None:
            app.include_router(factory(platform))
    return app


class _WorkerWasFaster(Exception):
    pass


async def _take_over(platform: Platform, outbox_ids: tuple[int, ...]) -> bool:
    """Mark outbox rows as sent in the webhook response, unless a worker claimed them."""
    now = platform.clock.now()
    try:
        async with platform.db.session() as session:
            result = await session.execute(update(Outbox).where(
                Outbox.id.in_(outbox_ids), Outbox.status == "pending").values(
                status="sent", sent_at=now, last_error=None))
            if result.rowcount != len(outbox_ids):
                raise _WorkerWasFaster
            messages = select(Outbox.message_id).where(Outbox.id.in_(outbox_ids))
            await session.execute(update(Message).where(
                Message.id.in_(messages.scalar_subquery())).values(status="sent",
                                                                  updated_at=now))
    except _WorkerWasFaster:
        return False
    return True
