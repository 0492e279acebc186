"""Flows compiled into ``transitions`` state machines, one machine per flow definition.

No subscriber owns a machine: per event the engine loads the subscriber's position and
fires one trigger of the machine on a throw-away model that holds it (``Event.trigger``
on the model: the model is never added to the machine, as ``add_model`` would bind a
method per trigger and state to it on every event, and keeping one model per subscriber
would not scale). The machine's callbacks only record steps; the flow then executes them:
entering a state runs its actions (some of which reach the database) and records
*effects* (messages, timers, flow starts) on the ``Turn``, which the engine persists in the
same transaction as the new position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from transitions import Machine, MachineError, State

from bot_platform.errors import FlowError, UnknownState
from bot_platform.fitting import share
from bot_platform.flows.actions import ActionSpec, run_actions
from bot_platform.flows.base import parse_duration
from bot_platform.flows.captures import validate_capture
from bot_platform.flows.conditions import condition_holds
from bot_platform.flows.payloads import ButtonRef, PayloadCodec
from bot_platform.flows.spec import FlowSpec, StateSpec
from bot_platform.flows.turn import (
    Position,
    SendEffect,
    TimerEffect,
    Turn,
    fill_url,
    has_placeholders,
)
from bot_platform.i18n import Catalogs
from bot_platform.statuses import PositionStatus
from bot_platform.types import Button, Outgoing, QuickReply

log = logging.getLogger(__name__)

MAX_HOPS = 32  # immediate goto/branch moves per event before we call it a loop


@dataclass(frozen=True, slots=True)
class _RunActions:
    actions: list[ActionSpec]


@dataclass(frozen=True, slots=True)
class _Enter:
    state: str


@dataclass(frozen=True, slots=True)
class _Answer:
    question: str
    value: Any


class _Model:
    """The throw-away model bound to the flow's machine for one trigger. The machine's
    callbacks only record steps here; the flow executes them afterwards (asynchronously,
    since actions may touch the database)."""

    __slots__ = ("captured", "position", "state", "steps", "turn")

    def __init__(self, turn: Turn, position: Position) -> None:
        self.turn = turn
        self.position = position
        self.state = position.state  # where the machine reads and moves the position
        self.captured: Any = None
        self.steps: list[_RunActions | _Enter | _Answer] = []


class CompiledFlow:
    """One flow definition as a ``transitions`` machine shared by all subscribers."""

    def __init__(self, spec: FlowSpec, catalogs: Catalogs, codec: PayloadCodec) -> None:
        self.spec = spec
        self.name = spec.flow
        self.catalogs = catalogs
        self.codec = codec
        self.payloads: dict[tuple[str, str, int], str] = {}
        # (state, locale) -> (the catalogs' bundles it was rendered with, the messages)
        self._rendered: dict[tuple[str, str], tuple[object, tuple[Outgoing, ...]]] = {}
        states = [State(name, on_enter=[self._on_enter]) for name in spec.states]
        self.machine = Machine(
            model=None, states=states, initial=spec.start, auto_transitions=False,
            send_event=True, ignore_invalid_triggers=False,
        )
        for name, state in spec.states.items():
            self._add_transitions(name, state)
        self._plain = self._plain_moves()

    def _plain_moves(self) -> dict[tuple[str, str], str | None]:
        """(trigger, source state) -> destination (None: stay) for every move the machine
        would make with no condition and no callback but entering the destination: its
        steps are known without running the machine (``transition``), which cost more
        than the rest of a timer's turn (a wave of timers fires thousands of them)."""
        machine = self.machine
        hooks = ("before_state_change", "after_state_change", "prepare_event",
                 "finalize_event", "on_exception", "on_final")
        if any(getattr(machine, hook, None) for hook in hooks):
            return {}
        plain: dict[tuple[str, str], str | None] = {}
        for trigger, event in machine.events.items():
            for source, moves in event.transitions.items():
                if len(moves) != 1:
                    continue
                move = moves[0]
                if move.conditions or move.before or move.after or move.prepare:
                    continue
                if move.dest is not None:
                    left, entered = machine.get_state(source), machine.get_state(move.dest)
                    if left.on_exit or entered.on_enter != [self._on_enter] or getattr(
                            entered, "final", False):
                        continue
                plain[(trigger, source)] = move.dest
        return plain

    def _add_transitions(self, name: str, state: StateSpec) -> None:
        add = self.machine.add_transition
        for kind, items in (("button", state.buttons), ("quick", state.quick_replies)):
            for index, item in enumerate(items):
                if getattr(item, "url", None):
                    continue
                self.payloads[(name, kind, index)] = self.codec.encode(
                    ButtonRef(self.name, name, kind, index))
                if item.goto or item.actions:
                    before = [self._actions_callback(item.actions)]
                    if state.question:
                        before.insert(0, self._answer_callback(
                            state.question, item.value or item.label))
                    add(f"{kind}_{index}", name, item.goto,  # dest None: stay (actions only)
                        before=before)
        if state.capture:
            add("captured", name, state.capture.goto,
                conditions=[self._capture_ok], before=[self._store_capture])
        if state.after:
            add("timeout", name, state.after.goto)
        for event, target in state.on_event.items():
            add(f"event:{event}", name, target)
        for rule in state.branch:
            condition = rule.when
            conditions = [] if condition is None else [
                lambda event, c=condition: condition_holds(c, event.model.turn)]
            add("next", name, rule.goto, conditions=conditions)
        if state.goto:
            add("next", name, state.goto)

    # -- callbacks (send_event=True: each gets the transitions EventData) --

    def _actions_callback(self, actions: list[ActionSpec]) -> Callable[[Any], None]:
        def callback(event: Any) -> None:
            event.model.steps.append(_RunActions(actions))
        return callback

    def _answer_callback(self, question: str, value: str) -> Callable[[Any], None]:
        def callback(event: Any) -> None:
            event.model.steps.append(_Answer(question, value))
        return callback

    def _capture_ok(self, event: Any) -> bool:
        spec = self.spec.states[event.model.position.state].capture
        assert spec is not None
        ok, value = validate_capture(spec, event.kwargs.get("text", ""))
        event.model.captured = value
        return ok

    def _store_capture(self, event: Any) -> None:
        state = self.spec.states[event.model.position.state]
        assert state.capture is not None
        event.model.turn.attributes[state.capture.attribute] = event.model.captured
        event.model.turn.attributes_changed = True
        if state.question:
            event.model.steps.append(_Answer(state.question, event.model.captured))

    def _on_enter(self, event: Any) -> None:
        event.model.steps.append(_Enter(event.state.name))

    # -- entering a state --

    async def enter(self, turn: Turn, position: Position, name: str) -> None:
        """Do everything that entering ``name`` does."""
        state = self.spec.states[name]
        position.state = name
        position.version += 1
        position.status = PositionStatus.ACTIVE
        position.changed = True
        position.updated_at = turn.now
        await run_actions(state.actions, turn, position)
        specs = state.say
        for index, message in enumerate(self.render(name, turn)):
            fallback = specs[index].fallback if index < len(specs) else None
            turn.effects.append(SendEffect(self.name, message, None if fallback is None else (
                parse_duration(fallback.after), fallback.channel)))
        if state.after:
            turn.effects.append(TimerEffect(self.name, name, position.version,
                                            turn.now + state.after.duration))
        if state.end:
            position.status = PositionStatus.FINISHED

    def render(self, name: str, turn: Turn) -> list[Outgoing]:
        """The state's messages in the turn's locale; buttons go on the last one. Messages
        the same for every subscriber (plain texts, links without placeholders) are
        rendered once per catalogs and locale: a timer wave sends thousands of them."""
        key = (name, turn.locale)
        cached = self._rendered.get(key)
        if cached is not None and cached[0] is self.catalogs.bundles:
            return list(cached[1])
        messages = self._render(name, turn)
        if self._fixed(name, turn.locale):
            if len(self._rendered) >= 4096:  # states x locales; a bound all the same
                self._rendered.clear()
            self._rendered[key] = (self.catalogs.bundles, tuple(messages))
            for message in messages:
                share(message)
        return messages

    def _fixed(self, name: str, locale: str) -> bool:
        """Whether the state's messages depend on nothing but the locale."""
        state = self.spec.states[name]
        fixed = self.catalogs.fixed
        return (all(fixed(locale, m.text) is not None for m in state.say)
                and all(fixed(locale, b.label) is not None
                        and not (b.url and has_placeholders(b.url)) for b in state.buttons)
                and all(fixed(locale, q.label) is not None for q in state.quick_replies))

    def _render(self, name: str, turn: Turn) -> list[Outgoing]:
        state = self.spec.states[name]
        variables = turn.variables(self.catalogs)
        fmt = self.catalogs.format
        messages = [Outgoing(text=fmt(turn.locale, m.text, variables), image_url=m.image)
                    for m in state.say]
        if not messages:
            return []
        buttons = []
        for i, b in enumerate(state.buttons):
            title = fmt(turn.locale, b.label, variables)
            if not b.url:
                buttons.append(Button(title=title, payload=self.payloads[(name, "button", i)]))
            elif (url := fill_url(b.url, turn)) is not None:
                buttons.append(Button(title=title, url=url))
        quick = tuple(
            QuickReply(title=fmt(turn.locale, q.label, variables),
                       payload=self.payloads.get((name, "quick", i), ""), request=q.request)
            for i, q in enumerate(state.quick_replies))
        messages[-1] = messages[-1].model_copy(update={"buttons": tuple(buttons),
                                                       "quick_replies": quick})
        return messages

    def label_index(self, name: str, text: str, turn: Turn) -> tuple[str, int] | None:
        """Match typed text against the state's button/quick-reply labels (a reply keyboard
        or a user typing the label sends the label back as text)."""
        state = self.spec.states.get(name)
        if state is None:
            return None
        wanted = text.strip().casefold()
        variables = turn.variables(self.catalogs)
        for kind, items in (("quick", state.quick_replies), ("button", state.buttons)):
            for index, item in enumerate(items):
                if getattr(item, "url", None):
                    continue
                label = self.catalogs.format(turn.locale, item.label, variables)
                if label.strip().casefold() == wanted:
                    return kind, index
        return None

    # -- firing triggers --

    async def start(self, turn: Turn, position: Position) -> None:
        """Enter the start state (restarting the flow if it was already running)."""
        await self.enter(turn, position, self.spec.start)
        await self._settle(turn, position)

    async def fire(self, turn: Turn, position: Position, trigger: str, **kwargs: Any) -> bool:
        """Fire ``trigger`` from the stored state; False if it did not apply."""
        if position.state not in self.spec.states:
            raise UnknownState(f"flow {self.name!r} has no state {position.state!r}")
        steps = self.transition(turn, position, trigger, **kwargs)
        if steps is None:
            return False
        await self._execute(turn, position, steps)
        await self._settle(turn, position)
        return True

    async def _settle(self, turn: Turn, position: Position) -> None:
        """Follow immediate goto/branch moves until a state waits (or the flow ended)."""
        for _ in range(MAX_HOPS):
            state = self.spec.states[position.state]
            if position.status != PositionStatus.ACTIVE or not (state.goto or state.branch):
                return
            steps = self.transition(turn, position, "next")
            if steps is None:
                log.warning("flow %s: no branch of %s applies; waiting there",
                            self.name, position.state)
                return
            await self._execute(turn, position, steps)
        raise FlowError(f"flow {self.name!r}: more than {MAX_HOPS} immediate moves "
                        f"(a goto/branch loop?) at state {position.state!r}")

    async def _execute(self, turn: Turn, position: Position,
                       steps: list[_RunActions | _Enter | _Answer]) -> None:
        for step in steps:
            if isinstance(step, _Enter):
                await self.enter(turn, position, step.state)
            elif isinstance(step, _Answer):
                # Recorded for analytics and kept as an attribute of the same name.
                turn.answers.append((self.name, step.question, str(step.value)[:255]))
                turn.attributes[step.question] = step.value
                turn.attributes_changed = True
            else:
                await run_actions(step.actions, turn, position)

    def transition(self, turn: Turn, position: Position, trigger: str,
                   **kwargs: Any) -> list[_RunActions | _Enter | _Answer] | None:
        """Ask the machine where ``trigger`` leads from the stored state, on a throw-away
        model. Returns the steps to execute, None if the trigger does not apply there."""
        key = (trigger, position.state)
        if key in self._plain:  # what the machine would answer (``_plain_moves``)
            destination = self._plain[key]
            return [] if destination is None else [_Enter(destination)]
        event = self.machine.events.get(trigger)
        if event is None:
            return None
        model = _Model(turn, position)
        try:
            if not event.trigger(model, **kwargs):
                return None
        except MachineError:
            return None
        return model.steps

    def waits_for_choice(self, name: str) -> bool:
        """The state asks a question answered by one of its buttons or quick replies."""
        state = self.spec.states.get(name)
        return bool(state and not state.end and (
            any(not b.url for b in state.buttons) or state.quick_replies))


class FlowSet:
    """Every loaded flow, compiled, with trigger look-ups."""

    def __init__(self, specs: Iterable[FlowSpec], catalogs: Catalogs) -> None:
        self.catalogs = catalogs
        self.codec = PayloadCodec()
        self.flows: dict[str, CompiledFlow] = {
            spec.flow: CompiledFlow(spec, catalogs, self.codec) for spec in specs}

    def __contains__(self, name: str) -> bool:
        return name in self.flows

    def __getitem__(self, name: str) -> CompiledFlow:
        return self.flows[name]

    def inactivity_triggers(self) -> list[tuple[str, int]]:
        """(flow, days) for every flow started by inactivity (the win-back scan)."""
        return [(name, trigger.days) for name, flow in self.flows.items()
                for trigger in flow.spec.triggers if trigger.on == "inactive" and trigger.days]

    def triggered_by(self, on: str, value: str | None = None) -> list[str]:
        """Flows whose triggers match (``on`` = start/subscribed/ref/keyword/event)."""
        matches = []
        for name, flow in self.flows.items():
            for trigger in flow.spec.triggers:
                if trigger.on != on:
                    continue
                if on == "ref" and trigger.ref != value:
                    continue
                if on == "event" and trigger.event != value:
                    continue
                if on == "keyword" and (value or "").strip().casefold() not in {
                        k.casefold() for k in trigger.keywords}:
                    continue
                matches.append(name)
                break
        return matches
