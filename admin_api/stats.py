"""Figures for flows, quizzes and NPS (broadcast figures live with the broadcasts)."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import func, select

from admin_api.security import EVERYONE, MARKETING, PlatformDep, roles
from bot_platform.models import Answer, FlowState
from bot_platform.statuses import PositionStatus
from bot_platform.text import text

router = APIRouter(prefix="/stats", tags=["stats"])


class FlowStats(BaseModel):
    flow: str
    entered: int  # subscribers who ever entered the flow
    completed: int  # of them, those who reached an end
    waiting_at: dict[str, int]  # where the others stopped (drop-off per step)
    answers: dict[str, dict[str, int]]  # question -> answer -> count (quizzes, surveys)


class NpsWeek(BaseModel):
    week_start: str
    responses: int
    promoters: int
    passives: int
    detractors: int
    score: float  # % promoters - % detractors


@router.get("/flows/{flow}", response_model=FlowStats, **roles(MARKETING))
async def flow_stats(platform: PlatformDep, flow: text(64, min_length=1)) -> FlowStats:
    if flow not in platform.flows:
        raise HTTPException(404, f"no flow {flow!r}")
    async with platform.db.session() as session:
        states = (await session.execute(select(FlowState.state, FlowState.status, func.count())
                                        .where(FlowState.flow == flow)
                                        .group_by(FlowState.state, FlowState.status))).all()
        answers = (await session.execute(select(Answer.question, Answer.value, func.count())
                                         .where(Answer.flow == flow)
                                         .group_by(Answer.question, Answer.value))).all()
    waiting: dict[str, int] = {}
    completed = 0
    for state, status, count in states:
        if status == PositionStatus.FINISHED:
            completed += count
        else:
            waiting[state] = waiting.get(state, 0) + count
    distribution: dict[str, dict[str, int]] = defaultdict(dict)
    for question, value, count in answers:
        distribution[question][value] = count
    return FlowStats(flow=flow, entered=sum(c for *_, c in states), completed=completed,
                     waiting_at=waiting, answers=dict(distribution))


@router.get("/nps", response_model=list[NpsWeek], **roles(MARKETING))
async def nps(platform: PlatformDep,
              weeks: int = Query(12, ge=1, le=104), question: text(64) = "nps") -> list[NpsWeek]:
    """The NPS per week (Monday-based), from the answers to the NPS question."""
    since = platform.clock.now() - timedelta(weeks=weeks)
    async with platform.db.session() as session:
        rows = (await session.execute(select(Answer.value, Answer.created_at).where(
            Answer.question == question, Answer.created_at >= since))).all()
    buckets: dict[str, list[int]] = defaultdict(list)
    for value, created_at in rows:
        try:
            score = int(value)
        except ValueError:
            continue
        monday = (created_at - timedelta(days=created_at.weekday())).date().isoformat()
        buckets[monday].append(score)
    result = []
    for week in sorted(buckets):
        scores = buckets[week]
        promoters = sum(s >= 9 for s in scores)
        detractors = sum(s <= 6 for s in scores)
        result.append(NpsWeek(
            week_start=week, responses=len(scores), promoters=promoters,
            passives=len(scores) - promoters - detractors, detractors=detractors,
            score=round(100 * (promoters - detractors) / len(scores), 1)))
    return result


class SlaRow(BaseModel):
    day: str
    agent_id: str | None
    agent: str | None
    conversations: int
    resolved: int
    avg_first_reply_seconds: float | None  # from escalation to the agent's first reply
    avg_resolve_seconds: float | None  # from escalation to resolution


@router.get("/support", response_model=list[SlaRow], **roles(EVERYONE))
async def support_sla(platform: PlatformDep, days: int = Query(30, ge=1, le=366)) -> list[SlaRow]:
    """Handoff service levels per agent and day (by the day a chat was escalated)."""
    from bot_platform.models import ApiKey, Conversation

    since = platform.clock.now() - timedelta(days=days)
    async with platform.db.session() as session:
        rows = (await session.scalars(select(Conversation).where(
            Conversation.created_at >= since))).all()
        names = dict((await session.execute(select(ApiKey.id, ApiKey.name))).all())
    groups: dict[tuple[str, str | None], list[Any]] = defaultdict(list)
    for row in rows:
        groups[(row.created_at.date().isoformat(), row.agent_id)].append(row)

    def average(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 1) if values else None

    result = []
    for (day, agent_id), items in sorted(groups.items(), key=lambda kv: (kv[0][0],
                                                                           kv[0][1] or "")):
        first = [(c.first_reply_at - c.created_at).total_seconds() for c in items
                 if c.first_reply_at]
        done = [(c.resolved_at - c.created_at).total_seconds() for c in items
                if c.resolved_at]
        result.append(SlaRow(
            day=day, agent_id=agent_id,
            agent=names.get(int(agent_id)) if agent_id and agent_id.isdigit() else None,
            conversations=len(items), resolved=len(done),
            avg_first_reply_seconds=average(first), avg_resolve_seconds=average(done)))
    return result
