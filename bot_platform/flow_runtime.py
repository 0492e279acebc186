"""Flows compiled into ``transitions`` state machines, one machine per flow definition.

No subscriber owns a machine: per event the engine loads the subscriber's position, binds a
throw-away model with ``add_model(model, initial=state)``, fires one trigger and removes the
model again (``add_model`` is linear in the number of models, so keeping one per subscriber
would not scale). Everything here is synchronous and pure: entering a state records
*effects* (messages, timers, flow starts) on a ``Turn``; the engine persists them in the
same transaction as the new position.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

from transitions import Machine, MachineError, State

from bot_platform.errors import FlowError, UnknownState
from bot_platform.flow_dsl import (
    AllCondition,
    AnyCondition,
    AttributeCondition,
    CaptureSpec,
    Condition,
    EndAction,
    EscalateAction,
    FlowSpec,
    NotCondition,
    PromoCodeAction,
    RecommendAction,
    ScoreAction,
    SetAction,
    SpinAction,
    SpinsLeftAction,
    StartFlowAction,
    StateSpec,
    TagAction,
    TagCondition,
    UntagAction,
    compile_pattern,
    parse_duration,
)
from bot_platform.i18n import Catalogs
from bot_platform.types import Button, Card, Outgoing, QuickReply

log = logging.getLogger(__name__)

MAX_HOPS = 32  # immediate goto/branch moves per event before we call it a loop


@dataclass
class Position:
    """Where a subscriber stands in one flow (mirrors a ``flow_states`` row)."""

    flow: str
    state: str
    version: int = 0
    status: str = "active"  # active | finished
    data: dict[str, Any] = field(default_factory=dict)
    updated_at: datetime | None = None
    changed: bool = False


@dataclass(frozen=True, slots=True)
class SendEffect:
    flow: str | None
    message: Outgoing
    # (delay, preferred channel): resend through another channel if still unread then
    fallback: tuple[timedelta, str | None] | None = None


@dataclass(frozen=True, slots=True)
class TimerEffect:
    flow: str
    state: str
    version: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class JobEffect:
    """Background work to schedule for this subscriber (an AI answer, for example)."""

    kind: str
    payload: dict[str, Any]
    due_at: datetime


@dataclass(frozen=True, slots=True)
class Escalation:
    """A request to hand the chat to humans, raised by a flow (or the AI fallback)."""

    reason: str
    summary: str | None
    data: dict[str, Any]


@dataclass
class Turn:
    """One event's working set: the subscriber's data as the flows change it, plus the
    effects to persist. Built and persisted by the engine."""

    subscriber_id: int
    contact_id: int
    channel: str
    locale: str
    now: datetime
    attributes: dict[str, Any]
    tags: set[str]
    profile: dict[str, Any]
    positions: dict[str, Position]
    original_tags: set[str] = field(default_factory=set)
    effects: list[SendEffect | TimerEffect | JobEffect] = field(default_factory=list)
    pending_starts: deque[str] = field(default_factory=deque)
    attributes_changed: bool = False
    escalation: Escalation | None = None
    answers: list[tuple[str, str, str]] = field(default_factory=list)  # flow, question, value
    session: Any = None  # the event's AsyncSession, for actions that need the database
    services: Any = None  # the engine, for actions that need platform services

    def lookup(self, name: str) -> Any:
        if name in ("locale", "channel"):
            return getattr(self, name)
        return self.attributes.get(name, self.profile.get(name))

    def variables(self, catalogs: Catalogs) -> dict[str, Any]:
        values: dict[str, Any] = {k: v for k, v in self.profile.items() if v is not None}
        values.update({k: v for k, v in self.attributes.items()
                       if isinstance(v, str | int | float)})
        if not values.get("first_name"):
            values["first_name"] = catalogs.format(self.locale, "default-name")
        values["referral_ref"] = f"rf-{self.contact_id}"  # a deep-link ref crediting them
        return values


# ---- button payloads -------------------------------------------------------------------

PAYLOAD_PREFIX = "f:"
# Payloads over this used to be hashed here; buttons already sent may still carry such a
# token. Shortening is the channel's now (``channels.LongPayloads``, from Capabilities).
_LEGACY_HASHED_OVER = 64


@dataclass(frozen=True, slots=True)
class ButtonRef:
    """What a flow button payload points at."""

    flow: str
    state: str
    kind: str  # "button" or "quick"
    index: int


class PayloadCodec:
    """Stable payloads for flow buttons. Deterministic from the flow definitions, so a
    payload sent before a restart still resolves after it. A channel whose messenger
    carries shorter payloads shortens them itself (``Capabilities.callback_payload_bytes``)."""

    def __init__(self) -> None:
        self._by_token: dict[str, str] = {}

    def encode(self, ref: ButtonRef) -> str:
        raw = f"{PAYLOAD_PREFIX}{ref.flow}:{ref.state}:{ref.kind[0]}{ref.index}"
        if len(raw.encode()) > _LEGACY_HASHED_OVER:  # still understood when pressed
            digest = hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()
            self._by_token[f"{PAYLOAD_PREFIX}#{digest}"] = raw
        return raw

    def decode(self, payload: str | None) -> ButtonRef | None:
        if not payload or not payload.startswith(PAYLOAD_PREFIX):
            return None
        raw = self._by_token.get(payload, payload)
        parts = raw[len(PAYLOAD_PREFIX):].split(":")
        if len(parts) != 3 or not parts[2][1:].isdigit() or parts[2][0] not in "bq":
            return None
        kind = "button" if parts[2][0] == "b" else "quick"
        return ButtonRef(parts[0], parts[1], kind, int(parts[2][1:]))


# ---- conditions and captures -----------------------------------------------------------


def _number(value: Any) -> float | None:
    try:
        return float(str(value).replace(",", "."))
    except (TypeError, ValueError):
        return None


def condition_holds(condition: Condition, turn: Turn) -> bool:
    """Evaluate a DSL condition against the turn's tags and attributes."""
    if isinstance(condition, TagCondition):
        return condition.tag in turn.tags
    if isinstance(condition, AllCondition):
        return all(condition_holds(c, turn) for c in condition.all)
    if isinstance(condition, AnyCondition):
        return any(condition_holds(c, turn) for c in condition.any)
    if isinstance(condition, NotCondition):
        return not condition_holds(condition.not_, turn)
    assert isinstance(condition, AttributeCondition)
    actual, expected, op = turn.lookup(condition.attribute), condition.value, condition.op
    if op == "exists":
        return (actual is not None) == (expected is not False)
    if op in ("in", "not_in"):
        found = actual in (expected or [])
        return found if op == "in" else not found
    if op == "contains":
        return actual is not None and str(expected).lower() in str(actual).lower()
    if op in ("eq", "ne"):
        left, right = _number(actual), _number(expected)
        same = left == right if left is not None and right is not None else actual == expected
        return same if op == "eq" else not same
    left, right = _number(actual), _number(expected)
    if left is None or right is None:
        return False
    return {"gt": left > right, "gte": left >= right, "lt": left < right,
            "lte": left <= right}[op]


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE = re.compile(r"^\+?\d{7,15}$")
# Customer text longer than this never validates against a pattern (an email, a phone, a
# number, a flow's regex, a choice): a bound on the work one message can cause, far above
# any value such a capture expects. Free ``text`` captures keep what they get.
MAX_MATCHED_CHARS = 1000


def validate_capture(spec: CaptureSpec, text: str) -> tuple[bool, Any]:
    """Check free text against a capture spec; returns (ok, normalized value)."""
    text = text.strip()
    if not text:
        return False, None
    if spec.type != "text" and len(text) > MAX_MATCHED_CHARS:
        return False, None
    if spec.type == "email":
        return (True, text.lower()) if _EMAIL.match(text) else (False, None)
    if spec.type == "phone":
        digits = re.sub(r"[\s\-().]", "", text)
        return (True, digits) if _PHONE.match(digits) else (False, None)
    if spec.type == "number":
        number = _number(text)
        if number is None or (spec.min is not None and number < spec.min) or (
            spec.max is not None and number > spec.max
        ):
            return False, None
        return True, int(number) if number.is_integer() else number
    if spec.type == "regex":
        # RE2: linear time, whatever the pattern (validated at load with the same engine).
        matched = compile_pattern(spec.pattern or "").fullmatch(text)
        return (True, text) if matched else (False, None)
    if spec.type == "choice":
        for choice in spec.choices:
            if choice.casefold() == text.casefold():
                return True, choice
        return False, None
    return True, text


# ---- actions ---------------------------------------------------------------------------


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _placeholder_value(turn: Turn, name: str) -> str:
    """An attribute as placeholder text; a missing one is empty (0 stays "0")."""
    value = turn.lookup(name)
    return "" if value is None else str(value)


def _interpolate(value: Any, turn: Turn) -> Any:
    if not isinstance(value, str):
        return value
    return _PLACEHOLDER.sub(lambda m: _placeholder_value(turn, m.group(1)), value)


def fill_url(url: str, turn: Turn) -> str | None:
    """A button URL with its ``{attribute}`` placeholders filled like texts fill them
    (a missing attribute is empty), each value percent-encoded as one URL component, so
    an order id like ``A&B 1/2`` cannot add query parameters or path segments. A URL
    that starts with a placeholder takes the value as the URL's start, unencoded (a link
    the shop sent, e.g. ``{cart_updated_url}``). None when the result is not an http(s)
    URL: the button is left out rather than the message refused by the messenger."""
    def component(match: re.Match[str]) -> str:
        text = _placeholder_value(turn, match.group(1))
        return text if match.start() == 0 else quote(text, safe="")

    filled = _PLACEHOLDER.sub(component, url)
    if urlsplit(filled).scheme.lower() not in ("http", "https") or any(
            c.isspace() or ord(c) < 32 for c in filled):
        log.warning("button URL %r is %r after filling placeholders; button left out",
                    url, filled)
        return None
    return filled


def _do_tag(turn: Turn, position: Position, action: TagAction) -> None:
    turn.tags.add(action.tag)


def _do_untag(turn: Turn, position: Position, action: UntagAction) -> None:
    turn.tags.discard(action.untag)


def _do_set(turn: Turn, position: Position, action: SetAction) -> None:
    for key, value in action.set.items():
        turn.attributes[key] = _interpolate(value, turn)
    turn.attributes_changed = True
    chosen = action.set.get("locale_chosen")
    if chosen and turn.services is not None:  # a language button: speak it at once
        turn.locale = turn.services.catalogs.resolve_locale(str(chosen))


def _do_score(turn: Turn, position: Position, action: ScoreAction) -> None:
    for key, amount in action.score.items():
        total = (_number(turn.attributes.get(key)) or 0) + amount
        turn.attributes[key] = int(total) if float(total).is_integer() else total
    turn.attributes_changed = True


def _do_start_flow(turn: Turn, position: Position, action: StartFlowAction) -> None:
    turn.pending_starts.append(action.start_flow)


def _do_end(turn: Turn, position: Position, action: EndAction) -> None:
    position.status = "finished"


def _do_escalate(turn: Turn, position: Position, action: EscalateAction) -> None:
    spec = action.escalate
    summary = _interpolate(spec.summary, turn) if spec.summary else None
    data = {name: turn.lookup(name) for name in spec.attach}
    turn.escalation = Escalation(spec.reason, summary, {"flow": position.flow, **data})


async def _do_promo_code(turn: Turn, position: Position, action: PromoCodeAction) -> None:
    from bot_platform.promo import draw_code

    spec = action.promo_code
    code = await draw_code(
        turn.session, pool=_interpolate(spec.pool, turn), contact_id=turn.contact_id,
        subscriber_id=turn.subscriber_id, now=turn.now, once_per_contact=spec.once_per_contact)
    turn.attributes[spec.attribute] = code
    turn.attributes_changed = True


async def _do_recommend(turn: Turn, position: Position, action: RecommendAction) -> None:
    from bot_platform.catalog import recommend, tracked_link

    spec = action.recommend
    tags = [*spec.tags, *(str(turn.lookup(a)) for a in spec.tags_from if turn.lookup(a))]
    if spec.use_subscriber_tags:
        tags.extend(turn.tags)
    products = await recommend(turn.session, contact_id=turn.contact_id, limit=spec.limit,
                               category=spec.category, tags=tags,
                               co_purchase=spec.co_purchase)
    turn.attributes[spec.attribute] = [p.sku for p in products]
    turn.attributes_changed = True
    catalogs = turn.services.catalogs
    variables = turn.variables(catalogs)
    if not products:
        if spec.empty:
            text = catalogs.format(turn.locale, spec.empty, variables)
            turn.effects.append(SendEffect(position.flow, Outgoing(text=text)))
        return
    label = catalogs.format(turn.locale, spec.button, variables) if spec.button else None
    cards = []
    for product in products:
        link = await tracked_link(
            turn.session, url=product.url, subscriber_id=turn.subscriber_id,
            channel=turn.channel, campaign=spec.campaign or position.flow, now=turn.now,
            public_url=turn.services.public_url, sku=product.sku, flow=position.flow)
        price = (f"{product.price:.2f} {product.currency or ''}".strip()
                 if product.price is not None else None)
        cards.append(Card(title=product.title, subtitle=price, image_url=product.image_url,
                          url=link, buttons=(Button(title=label or product.title, url=link),)))
    text = catalogs.format(turn.locale, spec.say, variables) if spec.say else ""
    turn.effects.append(SendEffect(position.flow, Outgoing(text=text, cards=tuple(cards))))


async def _do_spin(turn: Turn, position: Position, action: SpinAction) -> None:
    from bot_platform import games

    spec, name = action.spin, action.spin.attribute
    outcome = await games.spin(turn.session, contact_id=turn.contact_id,
                               subscriber_id=turn.subscriber_id, spec=spec,
                               rng=turn.services.random, now=turn.now)
    turn.attributes_changed = True
    turn.attributes[name] = outcome.result
    turn.attributes[f"{name}_pool"] = outcome.prize.pool if outcome.prize else None
    if outcome.code is not None:
        # Kept until the next win: an old "get my code" button shows this same code.
        turn.attributes[f"{name}_code"] = outcome.code
    if outcome.prize is not None:
        turn.attributes[f"{name}_label"] = turn.services.catalogs.format(
            turn.locale, outcome.prize.label, turn.variables(turn.services.catalogs))


async def _do_spins_left(turn: Turn, position: Position, action: SpinsLeftAction) -> None:
    from bot_platform import games

    spec = turn.services.flows[position.flow].spec.spin_spec(action.spins_left.game)
    if spec is None:  # check_flow rejects this at load
        raise FlowError(f"flow {position.flow!r} has no spin of {action.spins_left.game!r}")
    turn.attributes[action.spins_left.attribute] = await games.spins_left(
        turn.session, turn.contact_id, spec)
    turn.attributes_changed = True


# Action model -> executor; later capabilities add their own entries.
ACTION_EXECUTORS: dict[type, Callable[[Turn, Position, Any], None]] = {
    TagAction: _do_tag,
    UntagAction: _do_untag,
    SetAction: _do_set,
    ScoreAction: _do_score,
    StartFlowAction: _do_start_flow,
    EndAction: _do_end,
    EscalateAction: _do_escalate,
    PromoCodeAction: _do_promo_code,
    RecommendAction: _do_recommend,
    SpinAction: _do_spin,
    SpinsLeftAction: _do_spins_left,
}


async def run_actions(actions: Iterable[Any], turn: Turn, position: Position) -> None:
    """Run actions in order; an executor may be a plain or an async function (async ones
    use ``turn.session`` and ``turn.services`` to reach the database)."""
    for action in actions:
        executor = ACTION_EXECUTORS.get(type(action))
        if executor is None:
            raise FlowError(f"no executor for action {type(action).__name__}")
        result = executor(turn, position, action)
        if inspect.isawaitable(result):
            await result


# ---- the compiled flow -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RunActions:
    actions: list[Any]


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

    def __init__(self, turn: Turn, position: Position) -> None:
        self.turn = turn
        self.position = position
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
        states = [State(name, on_enter=[self._on_enter]) for name in spec.states]
        self.machine = Machine(
            model=None, states=states, initial=spec.start, auto_transitions=False,
            send_event=True, ignore_invalid_triggers=False,
        )
        for name, state in spec.states.items():
            self._add_transitions(name, state)

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

    def _actions_callback(self, actions: list[Any]) -> Callable[[Any], None]:
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
        position.status = "active"
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
            position.status = "finished"

    def render(self, name: str, turn: Turn) -> list[Outgoing]:
        """The state's messages in the turn's locale; buttons go on the last one."""
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
            if position.status != "active" or not (state.goto or state.branch):
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
        """Ask the machine where ``trigger`` leads from the stored state: bind a
        throw-away model, fire, unbind. Returns the steps to execute, None if the trigger
        does not apply there."""
        if trigger not in self.machine.events:
            return None
        model = _Model(turn, position)
        self.machine.add_model(model, initial=position.state)
        try:
            if not model.trigger(trigger, **kwargs):
                return None
        except MachineError:
            return None
        finally:
            self.machine.remove_model(model)
        return model.steps

    def waits_for_choice(self, name: str) -> bool:
        """The state asks a question answered by one of its buttons or quick replies."""
        state = self.spec.states.get(name)
        return bool(state and not state.end and (
            any(not b.url for b in state.buttons) or state.quick_replies))

    def waits_for_text(self, name: str) -> bool:
        state = self.spec.states.get(name)
        return bool(state and (state.capture or state.buttons or state.quick_replies))


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
