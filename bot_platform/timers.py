"""Flow timers and read fallbacks: the jobs a turn schedules, and what they do when due.

A flow state with ``after`` schedules a ``flow_timer`` job for the state instance it
entered (flow, state, version); leaving the state cancels it (``Turns.save``), and a
timer that fires for a state the subscriber has since left is "stale". A message with a
channel ``fallback`` schedules a ``read_fallback`` job: unread by then, it goes out again
on the customer's other messenger. Both run inside the job's transaction, which the
scheduler isolates per subscriber (``Turns.isolated``), or inside a savepoint of a batch's
transaction (``job_batches``), whose turns were loaded together (``turn_batches``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.fitting import fit_message
from bot_platform.flows.machine import FlowSet
from bot_platform.flows.turn import SendEffect
from bot_platform.handoff import open_conversation
from bot_platform.models import Job, Message, Outbox, Subscriber
from bot_platform.statuses import MessageStatus, PositionStatus, SubscriberStatus
from bot_platform.types import Capabilities, Outgoing

if TYPE_CHECKING:
    from bot_platform.inbound import Engine


def may_have_timer(flows: FlowSet, flow: str, state: str) -> bool:
    """Whether a subscriber in ``state`` may have a pending timer: only states with
    ``after`` schedule one (a state unknown to the flow's current version may too)."""
    if flow not in flows:
        return True
    spec = flows[flow].spec.states.get(state)
    return spec is None or spec.after is not None


def schedule_fallbacks(session: AsyncSession, subscriber: Subscriber,
                       effects: list[SendEffect], queued: list[tuple[int, Outgoing]],
                       now: datetime, caps: Capabilities) -> None:
    """A job per message with a channel fallback, pointing at its first queued part."""
    position = 0
    for effect in effects:
        parts = len(fit_message(effect.message, caps))
        first_outbox_id = queued[position][0]
        position += parts
        if effect.fallback is None:
            continue
        delay, channel = effect.fallback
        session.add(Job(kind="read_fallback", subscriber_id=subscriber.id,
                        flow=effect.flow, due_at=now + delay, created_at=now, payload={
                            "outbox_id": first_outbox_id, "channel": channel,
                            "message": effect.message.model_dump(mode="json")}))


class Timers:
    """The job handlers for ``flow_timer`` and ``read_fallback``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def run_flow_timer(self, session: AsyncSession, job: Job) -> str:
        """Fire a flow timer inside the caller's transaction; returns what happened."""
        engine = self.engine
        # A batch of timers loaded its subscribers' turns together (turn_batches); the
        # import is here because turn_batches builds on turns, which imports this module.
        from bot_platform.turn_batches import save_later, take_preloaded

        work = take_preloaded(session, job.subscriber_id)
        batched = work is not None
        if work is None:
            work = await engine.turns.load(session, job.subscriber_id)
        if isinstance(work, str):
            return work
        turn = work.turn
        position = turn.positions.get(job.flow or "")
        payload = job.payload
        if (position is None or position.status != PositionStatus.ACTIVE
                or position.state != payload.get("state")
                or position.version != payload.get("version")
                or job.flow not in engine.flows):
            return "stale"
        if not await engine.flows[job.flow].fire(turn, position, "timeout"):
            return "not-applicable"
        await engine.router.run_pending_starts(turn)
        if not (batched and save_later(work)):  # a batch saves its turns together
            await work.save()
        return "fired"

    async def run_read_fallback(self, session: AsyncSession, job: Job) -> str:
        """The fallback timer: resend through another channel unless the message was read
        (or answered or clicked, where the messenger reports no reads)."""
        original = await session.get(Outbox, job.payload.get("outbox_id"))
        subscriber = await session.get(Subscriber, job.subscriber_id)
        if original is None or subscriber is None:
            return "gone"
        message = await session.get(Message, original.message_id)
        engaged = message is not None and (message.status == MessageStatus.READ or (
            subscriber.last_inbound_at is not None
            and subscriber.last_inbound_at > message.created_at))
        if engaged:
            return "read"
        preferred = job.payload.get("channel")
        other = await session.scalar(
            select(Subscriber).where(
                Subscriber.contact_id == subscriber.contact_id, Subscriber.id != subscriber.id,
                Subscriber.status == SubscriberStatus.SUBSCRIBED)
            .order_by((Subscriber.channel == (preferred or "")).desc(),
                      (Subscriber.channel != subscriber.channel).desc(),
                      Subscriber.last_inbound_at.desc().nulls_last(), Subscriber.id)
            .limit(1))
        if other is None:
            return "no-other-channel"
        if await open_conversation(session, other.id) is not None:
            return "suppressed"
        await self.engine.outbox.enqueue(session, other, [(job.flow, Outgoing.model_validate(
            job.payload["message"]))])
        return f"sent-via-{other.channel}"
