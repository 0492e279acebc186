"""Actions: each one is declared once, as a model whose single key is the action's name
and whose ``run`` executes it. Defining a subclass of ``ActionSpec`` registers it in
``ACTIONS``; a flow using an unknown action is rejected at load.

The actions that reach the database (promo codes, recommendations, the prize wheel) live
in ``shop_actions``; ``spec`` imports both, so every action is known before a flow is
parsed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from bot_platform.flows.base import Spec, lenient_number
from bot_platform.flows.turn import Escalation, Position, Turn, interpolate
from bot_platform.statuses import PositionStatus

ACTIONS: dict[str, type[ActionSpec]] = {}  # action name -> its model (and executor)


class ActionSpec(Spec):
    """One action of a flow: a mapping with one key, the action's name."""

    name: ClassVar[str]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        fields = list(cls.model_fields)
        if len(fields) != 1:
            raise TypeError(f"{cls.__name__}: an action model has exactly one field")
        if fields[0] in ACTIONS:
            raise TypeError(f"{cls.__name__}: action {fields[0]!r} is declared twice")
        cls.name = fields[0]
        ACTIONS[cls.name] = cls

    @property
    def argument(self) -> Any:
        """The value under the action's key (e.g. the ``RecommendSpec``)."""
        return getattr(self, self.name)

    async def run(self, turn: Turn, position: Position) -> None:
        """Execute the action on the turn (every subclass implements it)."""
        raise NotImplementedError


class TagAction(ActionSpec):
    tag: str

    async def run(self, turn: Turn, position: Position) -> None:
        turn.tags.add(self.tag)


class UntagAction(ActionSpec):
    untag: str

    async def run(self, turn: Turn, position: Position) -> None:
        turn.tags.discard(self.untag)


class SetAction(ActionSpec):
    """Set attributes; string values may use ``{attribute}`` placeholders."""

    set: dict[str, Any]

    async def run(self, turn: Turn, position: Position) -> None:
        for key, value in self.set.items():
            turn.attributes[key] = interpolate(value, turn)
        turn.attributes_changed = True
        chosen = self.set.get("locale_chosen")
        if chosen and turn.services is not None:  # a language button: speak it at once
            turn.locale = turn.services.catalogs.resolve_locale(str(chosen))


class ScoreAction(ActionSpec):
    """Add numbers to numeric attributes (scores): ``score: {skin_dry: 2}``."""

    score: dict[str, float]

    async def run(self, turn: Turn, position: Position) -> None:
        for key, amount in self.score.items():
            total = (lenient_number(turn.attributes.get(key)) or 0) + amount
            turn.attributes[key] = int(total) if float(total).is_integer() else total
        turn.attributes_changed = True


class StartFlowAction(ActionSpec):
    start_flow: str

    async def run(self, turn: Turn, position: Position) -> None:
        turn.pending_starts.append(self.start_flow)


class EndAction(ActionSpec):
    end: Literal[True]

    async def run(self, turn: Turn, position: Position) -> None:
        position.status = PositionStatus.FINISHED


class EscalationSpec(Spec):
    """Hand the chat to humans: ``reason`` for the queue, a ``summary`` (``{attribute}``
    placeholders allowed) and the attributes to attach (the answers that led here)."""

    reason: str
    summary: str | None = None
    attach: list[str] = Field(default_factory=list)


class EscalateAction(ActionSpec):
    escalate: EscalationSpec

    async def run(self, turn: Turn, position: Position) -> None:
        spec = self.escalate
        summary = interpolate(spec.summary, turn) if spec.summary else None
        data = {name: turn.lookup(name) for name in spec.attach}
        turn.escalation = Escalation(spec.reason, summary, {"flow": position.flow, **data})


def _parse_action(value: Any) -> Any:
    if isinstance(value, Spec):
        return value
    if isinstance(value, str) and value in ACTIONS:  # "- end"
        value = {value: True}
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"an action is a mapping with one key, one of: {', '.join(ACTIONS)}")
    (name,) = value
    model = ACTIONS.get(name)
    if model is None:
        hint = difflib.get_close_matches(str(name), ACTIONS, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown action {name!r}{suggestion}; known: {', '.join(ACTIONS)}")
    return model.model_validate(value)


Action = Annotated[ActionSpec, BeforeValidator(_parse_action)]


async def run_actions(actions: Iterable[ActionSpec], turn: Turn, position: Position) -> None:
    """Run actions in order."""
    for action in actions:
        await action.run(turn, position)

