"""The ``ai_reply`` job: text no flow expected, answered by the model.

Routing queues the job (``Router.text_fallback_job``, set by ``Platform`` when AI replies
are on). ``AiReplyJob`` is a ``PreparedJobHandler``: the model is asked in ``prepare``,
outside any transaction, so no database lock is held while it thinks; ``apply`` then runs
in the subscriber's unit of work (``turns``) and turns the decision into the turn's
effects: an answer, a flow start, a hand-off to a human, a clarifying question or the
usual off-script re-ask."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.ai.assistant import Assistant, Decision, mask_pii
from bot_platform.ai.knowledge import LiveKnowledge
from bot_platform.flows.turn import Escalation, SendEffect
from bot_platform.inbound import Engine
from bot_platform.models import Job, Subscriber
from bot_platform.types import Outgoing

JOB_KIND = "ai_reply"
RATE_LIMITED = "rate_limited"  # the reason, and the job's result "fallback:rate_limited"


class AiReplyJob:
    def __init__(self, engine: Engine, assistant: Assistant,
                 knowledge: LiveKnowledge | None = None) -> None:
        self.engine = engine
        self.assistant = assistant
        self.knowledge = knowledge

    def intents(self) -> dict[str, str]:
        """Flows that declared an ``intent`` can be started by the model."""
        return {name: flow.spec.intent for name, flow in self.engine.flows.flows.items()
                if flow.spec.intent}

    async def prepare(self, job: Job) -> Decision:
        async with self.engine.db.session() as session:
            subscriber = await session.get(Subscriber, job.subscriber_id)
            limited = subscriber is not None and await self.over_rate(session, job)
        if subscriber is None:
            return Decision("fallback", reason="no_subscriber")
        if limited:
            return Decision("fallback", reason=RATE_LIMITED)
        if self.knowledge is not None:
            await self.knowledge.refresh()
        return await self.assistant.decide(
            str(job.payload.get("text", "")), locale=str(job.payload.get("locale", "en")),
            intents=self.intents(), bot_id=f"{subscriber.channel}:{subscriber.bot_id}",
            now=self.engine.clock.now())

    async def over_rate(self, session: AsyncSession, job: Job) -> bool:
        """Whether this subscriber's earlier questions of the last hour (those not turned
        away here themselves) reach ``answers_per_hour``. Counting the jobs before this
        one, finished or not, keeps the limit when several workers hold one person's
        questions at once."""
        limit = self.assistant.settings.answers_per_hour
        if not limit:
            return False
        since = self.engine.clock.now() - timedelta(hours=1)
        earlier = await session.scalar(select(func.count(Job.id)).where(
            Job.kind == JOB_KIND, Job.subscriber_id == job.subscriber_id, Job.id < job.id,
            Job.created_at >= since,
            or_(Job.result.is_(None), Job.result != f"fallback:{RATE_LIMITED}")))
        return (earlier or 0) >= limit

    async def apply(self, session: AsyncSession, job: Job, prepared: Any) -> str:
        decision = prepared if isinstance(prepared, Decision) else Decision(
            "fallback", reason="not_prepared")
        engine = self.engine
        work = await engine.turns.load(session, job.subscriber_id)
        if isinstance(work, str):
            return "suppressed" if work == "suppressed" else "unsubscribed"
        turn = work.turn
        text = str(job.payload.get("text", ""))
        if decision.kind == "answer" and decision.text:
            turn.effects.append(SendEffect(None, Outgoing(text=decision.text)))
        elif decision.kind == "route" and decision.flow in engine.flows:
            turn.pending_starts.append(decision.flow)
            await engine.router.run_pending_starts(turn)
        elif decision.kind == "escalate":
            turn.escalation = Escalation(f"ai:{decision.reason}", mask_pii(text)[:500],
                                         {"text": text})
        elif decision.reason == "low_confidence" and engine.catalogs.has(
                engine.catalogs.default_locale, "ai-clarify"):
            clarify = engine.catalogs.format(turn.locale, "ai-clarify",
                                             turn.variables(engine.catalogs))
            turn.effects.append(SendEffect(None, Outgoing(text=clarify)))
        else:
            turn.effects.extend(engine.router.off_script(turn))
        await work.save()
        return f"{decision.kind}:{decision.reason or decision.flow or 'ok'}"[:32]
