"""Which flow an inbound event moves: the routing rules of a turn.

A start or referral starts the flows its ref (or ``start``) triggers; a button acts on
the flow and state that showed it (an older message's button still works); typed text
asks for a human, picks a button by its label, answers a capture, or starts a
keyword-triggered flow, in that order. Text that fits nothing goes to the AI job when
one is set (``text_fallback_job``), else the customer is asked again (``off_script``).
Flow starts chain (a flow may start another) up to ``MAX_FLOW_STARTS`` per event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from bot_platform.flows.turn import Escalation, JobEffect, Position, SendEffect, Turn
from bot_platform.statuses import PositionStatus
from bot_platform.types import Inbound, InboundKind, Outgoing

if TYPE_CHECKING:
    from bot_platform.inbound import Engine

log = logging.getLogger(__name__)

MAX_FLOW_STARTS = 8  # start_flow chains per event before we call it a loop


class Router:
    """Fires flow triggers for what happened in a turn."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # A job kind that answers unexpected text (AI); None: the catalog's fallback.
        self.text_fallback_job: str | None = None
        # What the text goes through before it is stored with that job (PII masking).
        self.text_fallback_mask: Callable[[str], str] = str

    async def route_inbound(self, turn: Turn, inbound: Inbound) -> None:
        """Decide which flow trigger an inbound event fires."""
        flows = self.engine.flows
        kind = inbound.kind
        if kind in (InboundKind.START, InboundKind.REFERRAL):
            names = flows.triggered_by("ref", inbound.ref) if inbound.ref else []
            if not names and kind == InboundKind.START:
                names = flows.triggered_by("start")
            turn.pending_starts.extend(names)
        elif kind == InboundKind.SUBSCRIBED:
            turn.pending_starts.extend(flows.triggered_by("subscribed"))
        elif kind == InboundKind.BUTTON:
            await self._route_button(turn, inbound.payload)
        elif kind == InboundKind.TEXT:
            await self._route_text(turn, inbound.text or "")
        elif kind == InboundKind.CONTACT and inbound.profile.phone:
            await self._route_capture(turn, inbound.profile.phone, only_type="phone")
        await self.run_pending_starts(turn)

    async def _route_button(self, turn: Turn, payload: str | None) -> None:
        flows = self.engine.flows
        ref = flows.codec.decode(payload)
        if ref is None or ref.flow not in flows:
            log.info("button payload %r matches no flow; ignored", payload)
            return
        flow = flows[ref.flow]
        if ref.state not in flow.spec.states:
            log.info("button of removed state %s/%s ignored", ref.flow, ref.state)
            return
        position = turn.positions.setdefault(ref.flow, Position(ref.flow, ref.state))
        # An older message's button still works: it acts from the state that showed it.
        position.state = ref.state
        await flow.fire(turn, position, f"{ref.kind}_{ref.index}")

    def active(self, turn: Turn) -> list[Position]:
        """The turn's active flow positions, most recently moved first."""
        flows = self.engine.flows
        active = [p for p in turn.positions.values()
                  if p.status == PositionStatus.ACTIVE and p.flow in flows]
        return sorted(active, key=lambda p: p.updated_at or turn.now, reverse=True)

    async def _route_capture(self, turn: Turn, text: str,
                             only_type: str | None = None) -> bool:
        catalogs = self.engine.catalogs
        for position in self.active(turn):
            flow = self.engine.flows[position.flow]
            state = flow.spec.states.get(position.state)
            if state is None or state.capture is None:
                continue
            if only_type and state.capture.type != only_type:
                continue
            if not await flow.fire(turn, position, "captured", text=text):
                retry = catalogs.format(turn.locale, state.capture.retry,
                                        turn.variables(catalogs))
                turn.effects.append(SendEffect(position.flow, Outgoing(text=retry)))
            return True
        return False

    async def _route_text(self, turn: Turn, text: str) -> None:
        if self.engine.handoff.asks_for_human(turn.locale, text):
            turn.escalation = Escalation("asked_for_human", text[:500], {"text": text})
            return
        for position in self.active(turn):
            flow = self.engine.flows[position.flow]
            match = flow.label_index(position.state, text, turn)
            if match is not None:
                await flow.fire(turn, position, f"{match[0]}_{match[1]}")
                return
        if await self._route_capture(turn, text):
            return
        names = self.engine.flows.triggered_by("keyword", text)
        if names:
            turn.pending_starts.extend(names)
            return
        if self.text_fallback_job is not None:
            # Answered outside this transaction (it may call a model): see jobs.py.
            turn.effects.append(JobEffect(self.text_fallback_job, {
                "text": self.text_fallback_mask(text), "locale": turn.locale}, turn.now))
            return
        turn.effects.extend(self.off_script(turn))

    def off_script(self, turn: Turn) -> list[SendEffect]:
        """Text that fits nothing. Mid-question the customer is asked again (the question
        with its buttons, and how to reach a person) instead of being sent back to the
        start; outside any question, the catalog's fallback."""
        active = self.active(turn)
        if active:
            position = active[0]
            flow = self.engine.flows[position.flow]
            messages = flow.render(position.state, turn) if flow.waits_for_choice(
                position.state) else []
            if messages:
                question = messages[-1]
                hint = self.reask_hint(turn)
                if question.text and not question.image_url:
                    return [SendEffect(position.flow, question.model_copy(
                        update={"text": f"{hint}\n\n{question.text}"}))]
                return [SendEffect(None, Outgoing(text=hint)),
                        SendEffect(position.flow, question)]
        return [SendEffect(None, self.fallback_message(turn))]

    def reask_hint(self, turn: Turn) -> str:
        """"Please choose one of the options", naming a word that reaches a person."""
        catalogs = self.engine.catalogs
        words = self.engine.handoff.words(turn.locale)
        variables = {**turn.variables(catalogs)}
        if words:
            variables["keyword"] = words[0]
            return catalogs.format(turn.locale, "common-reask", variables)
        return catalogs.format(turn.locale, "common-reask-plain", variables)

    def fallback_message(self, turn: Turn) -> Outgoing:
        """The localized "I did not get that"."""
        catalogs = self.engine.catalogs
        return Outgoing(text=catalogs.format(turn.locale, "common-fallback",
                                             turn.variables(catalogs)))

    async def run_pending_starts(self, turn: Turn) -> None:
        """Start the flows the turn asked for, in order; a loop of starts is cut off."""
        flows = self.engine.flows
        for _ in range(MAX_FLOW_STARTS):
            if not turn.pending_starts:
                return
            name = turn.pending_starts.popleft()
            if name not in flows:
                log.warning("start of unknown flow %r ignored", name)
                continue
            flow = flows[name]
            position = turn.positions.setdefault(name, Position(name, flow.spec.start))
            await flow.start(turn, position)
        if turn.pending_starts:
            log.warning("more than %d flow starts in one event; the rest were dropped",
                        MAX_FLOW_STARTS)
            turn.pending_starts.clear()
