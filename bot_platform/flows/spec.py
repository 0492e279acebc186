"""The models of a flow file: states with their messages, buttons, inputs, timers and
moves, the triggers that start a flow, and the flow itself. Parsing a file into these
is ``loading``'s job; the checks that need the whole flow are ``validation``'s."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from bot_platform.flows.actions import Action, ActionSpec
from bot_platform.flows.base import NAME_PATTERN, Spec, compile_pattern, parse_duration
from bot_platform.flows.conditions import ConditionField
from bot_platform.flows.shop_actions import SpinAction, SpinSpec


class ButtonSpec(Spec):
    """An inline button: leads to a state (``goto``), opens a URL, or only runs actions."""

    label: str  # catalog key
    goto: str | None = None
    url: str | None = None
    actions: list[Action] = Field(default_factory=list)
    value: str | None = None  # the answer recorded for the state's question (default: label)

    @model_validator(mode="after")
    def _one_target(self) -> ButtonSpec:
        if self.url and (self.goto or self.actions):
            raise ValueError("a URL button cannot also have goto or actions")
        if not (self.url or self.goto or self.actions):
            raise ValueError("a button needs goto, url or actions")
        return self


class QuickReplySpec(Spec):
    """A suggested reply; ``request: phone`` asks the messenger for the user's number."""

    label: str
    goto: str | None = None
    request: Literal["phone"] | None = None
    actions: list[Action] = Field(default_factory=list)
    value: str | None = None


class FallbackSpec(Spec):
    """If the message is not read (or, where the messenger has no read receipts, answered
    or clicked) within ``after``, send it through another channel of the same contact."""

    after: str | float
    channel: str | None = None  # preferred channel; default: any other one


class MessageSpec(Spec):
    text: str  # catalog key
    image: str | None = None
    fallback: FallbackSpec | None = None


def _as_messages(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str | dict):
        value = [value]
    return [{"text": item} if isinstance(item, str) else item for item in value]


class CaptureSpec(Spec):
    """Free-text input saved into an attribute after validation."""

    attribute: str
    type: Literal["text", "email", "phone", "number", "regex", "choice"] = "text"
    pattern: str | None = None  # for type regex
    choices: list[str] = Field(default_factory=list)  # for type choice (case-insensitive)
    min: float | None = None  # for type number
    max: float | None = None
    retry: str  # catalog key sent when the input does not validate
    goto: str

    @model_validator(mode="after")
    def _type_arguments(self) -> CaptureSpec:
        if self.type == "regex":
            if not self.pattern:
                raise ValueError("type regex needs a pattern")
            compile_pattern(self.pattern)
        if self.type == "choice" and not self.choices:
            raise ValueError("type choice needs choices")
        return self


class TimerSpec(Spec):
    """A durable timer started on entry: leave for ``goto`` after ``delay``.

    ``delay`` is checked by ``check_flow`` (not here) so that a bad duration is reported
    together with the flow's other problems instead of hiding them."""

    delay: str | float
    goto: str

    @property
    def duration(self) -> timedelta:
        return parse_duration(self.delay)


class BranchRule(Spec):
    """One rule of a branch; the first whose ``when`` holds wins; no ``when`` = else."""

    when: ConditionField | None = None
    goto: str


class StateSpec(Spec):
    """What happens on entering a state, in order: actions, messages, timer, then an
    immediate ``goto``/``branch`` if present; otherwise the state waits for the user."""

    actions: list[Action] = Field(default_factory=list)
    say: Annotated[list[MessageSpec], BeforeValidator(_as_messages)] = Field(default_factory=list)
    buttons: list[ButtonSpec] = Field(default_factory=list)
    quick_replies: list[QuickReplySpec] = Field(default_factory=list)
    capture: CaptureSpec | None = None
    after: TimerSpec | None = None
    on_event: dict[str, str] = Field(default_factory=dict)  # event name -> state
    branch: list[BranchRule] = Field(default_factory=list)
    goto: str | None = None
    end: bool = False
    question: str | None = None  # record answers given here under this id (analytics)

    @model_validator(mode="after")
    def _consistent(self) -> StateSpec:
        if self.goto and self.branch:
            raise ValueError("a state has either goto or branch, not both")
        moves_on = bool(self.goto or self.branch or self.end)
        if moves_on and (self.capture or self.after or self.on_event):
            raise ValueError("a state that moves on at once (goto/branch/end) cannot wait "
                             "for input, a timer or an event")
        if (self.buttons or self.quick_replies) and not self.say:
            raise ValueError("buttons and quick_replies need a message in say")
        return self


class TriggerSpec(Spec):
    """What starts the flow: ``start`` (new chat / start command without a matching ref),
    ``subscribed``, ``ref`` (deep link), ``keyword`` (typed text), ``event`` (shop event)."""

    on: Literal["start", "subscribed", "ref", "keyword", "event", "inactive"]
    ref: str | None = None
    keywords: list[str] = Field(default_factory=list)
    event: str | None = None
    days: int | None = Field(default=None, ge=1)  # for inactive: days without a message

    @model_validator(mode="after")
    def _arguments(self) -> TriggerSpec:
        needed = {"ref": self.ref, "keyword": self.keywords, "event": self.event,
                  "inactive": self.days}
        if self.on in needed and not needed[self.on]:
            field = {"keyword": "keywords", "inactive": "days"}.get(self.on, self.on)
            raise ValueError(f"trigger on {self.on} needs {field}")
        return self


class FlowSpec(Spec):
    """One flow file."""

    flow: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    intent: str | None = None  # what a customer says to want this flow (AI intent routing)
    triggers: list[TriggerSpec] = Field(default_factory=list)
    start: str
    states: dict[str, StateSpec]

    @field_validator("states")
    @classmethod
    def _state_names(cls, states: dict[str, StateSpec]) -> dict[str, StateSpec]:
        bad = [name for name in states if not re.match(NAME_PATTERN, name)]
        if bad:
            raise ValueError(f"state names must match {NAME_PATTERN}: {', '.join(bad)}")
        if not states:
            raise ValueError("a flow needs at least one state")
        return states

    def spin_spec(self, game: str) -> SpinSpec | None:
        """The first ``spin`` action of ``game`` in this flow (its allowance rules)."""
        for state in self.states.values():
            for _, action in state_actions(state):
                if isinstance(action, SpinAction) and action.spin.game == game:
                    return action.spin
        return None


def state_actions(state: StateSpec) -> Iterator[tuple[str, ActionSpec]]:
    """Every (path suffix, action) of a state: on entry, on its buttons and replies."""
    for i, action in enumerate(state.actions):
        yield f"actions[{i}]", action
    for i, button in enumerate(state.buttons):
        for j, action in enumerate(button.actions):
            yield f"buttons[{i}].actions[{j}]", action
    for i, reply in enumerate(state.quick_replies):
        for j, action in enumerate(reply.actions):
            yield f"quick_replies[{i}].actions[{j}]", action


def catalog_keys(state: StateSpec) -> Iterator[tuple[str, str]]:
    """Every (path suffix, catalog key) a state uses."""
    for i, message in enumerate(state.say):
        yield f"say[{i}].text", message.text
    for i, button in enumerate(state.buttons):
        yield f"buttons[{i}].label", button.label
    for i, reply in enumerate(state.quick_replies):
        yield f"quick_replies[{i}].label", reply.label
    if state.capture:
        yield "capture.retry", state.capture.retry
    for path, action in state_actions(state):
        argument = action.argument
        if hasattr(argument, "catalog_keys"):  # actions that send catalog messages
            for field, key in argument.catalog_keys():
                yield f"{path}.{action.name}.{field}", key
