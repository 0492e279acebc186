"""The flow DSL: YAML files in ``flows/`` parsed into typed specs and validated eagerly.

Validation reports every problem with the file, the path inside it and the reason:
unknown states, bad durations, missing catalog keys (an error in the default locale, a
warning in the others, which fall back to it), unreachable states (a warning), unknown
actions and flows. ``docs/flows.md`` documents the language.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import re2
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bot_platform.errors import FlowIssue
from bot_platform.i18n import Catalogs

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,47}$"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)")
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: Any) -> timedelta:
    """``"1d"``, ``"1h30m"``, ``"45s"``, ``"2w"`` or a number of seconds -> timedelta."""
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        if not text or _DURATION_PART.sub("", text):
            raise ValueError(
                f"bad duration {value!r}: use numbers with w, d, h, m or s (e.g. 30m, 1d, 1h30m)"
            )
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    if seconds <= 0:
        raise ValueError(f"bad duration {value!r}: must be positive")
    return timedelta(seconds=seconds)


# Capture patterns run on customer text, so they are compiled with RE2, which matches in
# time linear in the input (no backtracking: ``(a+)+$`` cannot hang the event loop); the
# price is no backreferences or lookaround, and ``\w``, ``\d``, ``\b`` are ASCII (use
# ``\pL``, ``\pN`` for letters and digits of every script).
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is reported as a flow issue, not on stderr


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """A capture pattern compiled with RE2; raises ValueError with RE2's reason."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ValueError(f"bad pattern {pattern!r}: {reason} (patterns use RE2 syntax: "
                         "no backreferences or lookaround)") from error


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---- conditions ------------------------------------------------------------------------

Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists", "contains"]
OPS: tuple[str, ...] = Op.__args__
# Words people write for an op, for the suggestion in the error.
_OP_SYNONYMS = {
    "bigger": "gt", "greater": "gt", "greater_than": "gt", "more": "gt", "above": "gt",
    "over": "gt", ">": "gt", "gt_eq": "gte", "ge": "gte", ">=": "gte", "at_least": "gte",
    "smaller": "lt", "less": "lt", "less_than": "lt", "fewer": "lt", "below": "lt",
    "under": "lt", "<": "lt", "le": "lte", "lt_eq": "lte", "<=": "lte", "at_most": "lte",
    "=": "eq", "==": "eq", "equals": "eq", "equal": "eq", "is": "eq", "!=": "ne",
    "not_eq": "ne", "neq": "ne", "not_equal": "ne", "is_not": "ne", "one_of": "in",
    "not_one_of": "not_in", "nin": "not_in", "has": "contains", "includes": "contains",
    "exist": "exists", "present": "exists", "set": "exists",
}


def did_you_mean(value: Any, choices: Any, synonyms: dict[str, str] | None = None,
                 cutoff: float = 0.6) -> str:
    """`` (did you mean 'gt'?)`` when something close (or a known synonym) exists."""
    word = str(value).strip().lower()
    hint = (synonyms or {}).get(word) or next(
        iter(difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)), None)
    return f" (did you mean {hint!r}?)" if hint else ""


def _check_op(value: Any) -> Any:
    if isinstance(value, str) and value in OPS:
        return value
    raise ValueError(f"unknown op {value!r}{did_you_mean(value, OPS, _OP_SYNONYMS)}; "
                     f"ops: {', '.join(OPS)}")


class TagCondition(_Spec):
    """True when the subscriber has ``tag``."""

    tag: str


class AttributeCondition(_Spec):
    """Compares a subscriber attribute (or ``locale``/``channel``) with ``value``."""

    attribute: str
    op: Annotated[Op, BeforeValidator(_check_op)] = "eq"
    value: Any = None


class AllCondition(_Spec):
    all: list[ConditionField]


class AnyCondition(_Spec):
    any: list[ConditionField]


class NotCondition(_Spec):
    not_: ConditionField = Field(alias="not")


Condition = TagCondition | AttributeCondition | AllCondition | AnyCondition | NotCondition
_CONDITIONS: dict[str, type[_Spec]] = {"tag": TagCondition, "attribute": AttributeCondition,
                                       "all": AllCondition, "any": AnyCondition,
                                       "not": NotCondition}


def _parse_condition(value: Any) -> Any:
    """Pick the condition's kind by its key, so a mistake gives one message about that
    kind (not one per kind of the union)."""
    if isinstance(value, _Spec):
        return value
    kinds = [key for key in value if key in _CONDITIONS] if isinstance(value, dict) else []
    if len(kinds) != 1:
        keys = list(value) if isinstance(value, dict) else []
        hint = next((did_you_mean(k, _CONDITIONS) for k in keys if did_you_mean(
            k, _CONDITIONS)), "")
        raise ValueError(f"a condition has one of the keys {', '.join(_CONDITIONS)} "
                         f"(got {', '.join(map(str, keys)) or repr(value)}){hint}")
    return _CONDITIONS[kinds[0]].model_validate(value)


ConditionField = Annotated[Any, BeforeValidator(_parse_condition)]
for _model in (AllCondition, AnyCondition, NotCondition):
    _model.model_rebuild()


# ---- actions ---------------------------------------------------------------------------


class TagAction(_Spec):
    tag: str


class UntagAction(_Spec):
    untag: str


class SetAction(_Spec):
    """Set attributes; string values may use ``{attribute}`` placeholders."""

    set: dict[str, Any]


class ScoreAction(_Spec):
    """Add numbers to numeric attributes (scores): ``score: {skin_dry: 2}``."""

    score: dict[str, float]


class StartFlowAction(_Spec):
    start_flow: str


class EndAction(_Spec):
    end: Literal[True]


class PromoCodeSpec(_Spec):
    """Draw a unique code from ``pool`` into ``attribute`` (None when the pool is empty);
    a contact gets the same code again unless ``once_per_contact`` is false."""

    pool: str
    attribute: str = "promo_code"
    once_per_contact: bool = True


class PromoCodeAction(_Spec):
    promo_code: PromoCodeSpec


class RecommendSpec(_Spec):
    """Show a carousel of up to ``limit`` in-stock products the contact has not bought:
    co-purchases first (when ``co_purchase``), then products matching ``category`` and
    ``tags`` (plus tags read from the attributes in ``tags_from``, e.g. a quiz result)."""

    limit: int = Field(default=3, ge=1, le=10)
    category: str | None = None
    tags: list[str] = Field(default_factory=list)
    tags_from: list[str] = Field(default_factory=list)
    use_subscriber_tags: bool = False
    co_purchase: bool = True
    say: str | None = None  # catalog key of the text above the carousel
    button: str | None = None  # catalog key of each card's button label
    empty: str | None = None  # catalog key sent when there is nothing to recommend
    attribute: str = "recommended"  # the skus shown, for conditions and analytics
    campaign: str | None = None  # utm_campaign (default: the flow's name)

    def catalog_keys(self) -> list[tuple[str, str]]:
        return [(f, k) for f, k in (("say", self.say), ("button", self.button),
                                     ("empty", self.empty)) if k]


class RecommendAction(_Spec):
    recommend: RecommendSpec


class PrizeSpec(_Spec):
    """One sector of the wheel. ``pool``: paid out as a code from that pool (in stock while
    it has free codes); ``stock``: at most this many wins; ``label``: catalog key."""

    name: str = Field(pattern=NAME_PATTERN)
    weight: float = Field(ge=0)
    label: str
    pool: str | None = None
    stock: int | None = Field(default=None, ge=0)


class SpinSpec(_Spec):
    """Spin the wheel of ``game``: sets ``attribute`` to the prize's name (``no_spins``
    once the allowance is used, ``already_won`` once the contact has won ``max_wins``
    prizes, ``out_of_prizes`` when nothing is left), and ``<attribute>_label``,
    ``<attribute>_pool`` and ``<attribute>_code`` (the code reserved for the win, drawn
    before the outcome is announced).

    A prize with neither ``pool`` nor ``stock`` is a blank ("nothing this time"): it does
    not count as a win."""

    game: str = Field(pattern=NAME_PATTERN)
    prizes: list[PrizeSpec] = Field(min_length=1)
    max_spins: int = Field(default=3, ge=0)
    # Extra spins per new subscriber who came through the contact's referral link; the
    # referred friend gets the same bonus once.
    referral_bonus: int = Field(default=1, ge=0)
    max_wins: int | None = Field(default=1, ge=1)  # prizes per contact; null: no limit
    attribute: str = "prize"

    def catalog_keys(self) -> list[tuple[str, str]]:
        return [(f"prizes[{i}].label", p.label) for i, p in enumerate(self.prizes)]


class SpinAction(_Spec):
    spin: SpinSpec


class SpinsLeftSpec(_Spec):
    """Put the contact's spins left on the wheel of ``game`` (spun by a ``spin`` action of
    the same flow, whose allowance it uses) into ``attribute``; 0 once a win used up
    ``max_wins``."""

    game: str = Field(pattern=NAME_PATTERN)
    attribute: str = "spins_left"


class SpinsLeftAction(_Spec):
    spins_left: SpinsLeftSpec


class EscalationSpec(_Spec):
    """Hand the chat to humans: ``reason`` for the queue, a ``summary`` (``{attribute}``
    placeholders allowed) and the attributes to attach (the answers that led here)."""

    reason: str
    summary: str | None = None
    attach: list[str] = Field(default_factory=list)


class EscalateAction(_Spec):
    escalate: EscalationSpec


# Action name -> model. Later capabilities (recommend, escalate, ...) register here and in
# the engine's executor table; a flow using an unknown action is rejected at load.
ACTIONS: dict[str, type[_Spec]] = {
    "tag": TagAction,
    "untag": UntagAction,
    "set": SetAction,
    "score": ScoreAction,
    "start_flow": StartFlowAction,
    "end": EndAction,
    "escalate": EscalateAction,
    "promo_code": PromoCodeAction,
    "recommend": RecommendAction,
    "spin": SpinAction,
    "spins_left": SpinsLeftAction,
}


def _parse_action(value: Any) -> Any:
    if isinstance(value, _Spec):
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


Action = Annotated[Any, BeforeValidator(_parse_action)]


# ---- messages, inputs, timers ----------------------------------------------------------


class ButtonSpec(_Spec):
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


class QuickReplySpec(_Spec):
    """A suggested reply; ``request: phone`` asks the messenger for the user's number."""

    label: str
    goto: str | None = None
    request: Literal["phone"] | None = None
    actions: list[Action] = Field(default_factory=list)
    value: str | None = None


class FallbackSpec(_Spec):
    """If the message is not read (or, where the messenger has no read receipts, answered
    or clicked) within ``after``, send it through another channel of the same contact."""

    after: str | float
    channel: str | None = None  # preferred channel; default: any other one


class MessageSpec(_Spec):
    text: str  # catalog key
    image: str | None = None
    fallback: FallbackSpec | None = None


def _as_messages(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str | dict):
        value = [value]
    return [{"text": item} if isinstance(item, str) else item for item in value]


class CaptureSpec(_Spec):
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


class TimerSpec(_Spec):
    """A durable timer started on entry: leave for ``goto`` after ``delay``.

    ``delay`` is checked by ``check_flow`` (not here) so that a bad duration is reported
    together with the flow's other problems instead of hiding them."""

    delay: str | float
    goto: str

    @property
    def duration(self) -> timedelta:
        return parse_duration(self.delay)


class BranchRule(_Spec):
    """One rule of a branch; the first whose ``when`` holds wins; no ``when`` = else."""

    when: ConditionField | None = None
    goto: str


class StateSpec(_Spec):
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


class TriggerSpec(_Spec):
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


class FlowSpec(_Spec):
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
            for _, action in _state_actions(state):
                if isinstance(action, SpinAction) and action.spin.game == game:
                    return action.spin
        return None


# ---- semantic checks -------------------------------------------------------------------


def _format_loc(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(
            ("function-", "tagged-union")
        ):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def state_edges(state: StateSpec) -> Iterator[tuple[str, str]]:
    """Every (path suffix, target state) a state can move to."""
    for i, button in enumerate(state.buttons):
        if button.goto:
            yield f"buttons[{i}].goto", button.goto
    for i, reply in enumerate(state.quick_replies):
        if reply.goto:
            yield f"quick_replies[{i}].goto", reply.goto
    if state.capture:
        yield "capture.goto", state.capture.goto
    if state.after:
        yield "after.goto", state.after.goto
    for event, target in state.on_event.items():
        yield f"on_event.{event}", target
    for i, rule in enumerate(state.branch):
        yield f"branch[{i}].goto", rule.goto
    if state.goto:
        yield "goto", state.goto


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
    for path, action in _state_actions(state):
        name = next(iter(type(action).model_fields))
        spec = getattr(action, name)
        if hasattr(spec, "catalog_keys"):  # actions that send catalog messages
            for field, key in spec.catalog_keys():
                yield f"{path}.{name}.{field}", key


def _state_actions(state: StateSpec) -> Iterator[tuple[str, Any]]:
    for i, action in enumerate(state.actions):
        yield f"actions[{i}]", action
    for i, button in enumerate(state.buttons):
        for j, action in enumerate(button.actions):
            yield f"buttons[{i}].actions[{j}]", action
    for i, reply in enumerate(state.quick_replies):
        for j, action in enumerate(reply.actions):
            yield f"quick_replies[{i}].actions[{j}]", action


def check_flow(spec: FlowSpec, file: str, catalogs: Catalogs) -> list[FlowIssue]:
    """Semantic checks that need the whole flow (and the catalogs)."""
    issues: list[FlowIssue] = []
    names = list(spec.states)

    def unknown(path: str, target: str) -> FlowIssue:
        hint = difflib.get_close_matches(target, names, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return FlowIssue(file, path, f"unknown state {target!r}{suggestion} "
                                     f"(states: {', '.join(names)})")

    if spec.start not in spec.states:
        issues.append(unknown("start", spec.start))
    for name, state in spec.states.items():
        if state.after is not None:
            try:
                state.after.duration  # noqa: B018 - parsing is the check
            except ValueError as error:
                issues.append(FlowIssue(file, f"states.{name}.after.delay", str(error)))
        for index, message in enumerate(state.say):
            if message.fallback is not None:
                try:
                    parse_duration(message.fallback.after)
                except ValueError as error:
                    issues.append(FlowIssue(
                        file, f"states.{name}.say[{index}].fallback.after", str(error)))
        for suffix, target in state_edges(state):
            if target not in spec.states:
                issues.append(unknown(f"states.{name}.{suffix}", target))
        for suffix, action in _state_actions(state):
            if isinstance(action, SpinsLeftAction) and spec.spin_spec(
                    action.spins_left.game) is None:
                issues.append(FlowIssue(
                    file, f"states.{name}.{suffix}.spins_left.game",
                    f"no spin action of game {action.spins_left.game!r} in this flow"))
        for suffix, key in catalog_keys(state):
            path = f"states.{name}.{suffix}"
            if not catalogs.has(catalogs.default_locale, key):
                hint = did_you_mean(key, catalogs.keys(catalogs.default_locale), cutoff=0.85)
                issues.append(FlowIssue(
                    file, path,
                    f"unknown catalog key {key!r} in the default locale "
                    f"{catalogs.default_locale!r} (locales/{catalogs.default_locale}/*.ftl)"
                    f"{hint}"))
                continue
            missing = [loc for loc in catalogs.locales
                       if loc != catalogs.default_locale and not catalogs.has(loc, key)]
            if missing:
                issues.append(FlowIssue(
                    file, path, f"catalog key {key!r} missing in {', '.join(missing)}: "
                                f"falls back to {catalogs.default_locale!r}", "warning"))

    # Reachability from the start state (and from nothing else: triggers enter at start).
    if spec.start in spec.states:
        seen = {spec.start}
        frontier = [spec.start]
        while frontier:
            current = spec.states[frontier.pop()]
            for _, target in state_edges(current):
                if target in spec.states and target not in seen:
                    seen.add(target)
                    frontier.append(target)
        for name in names:
            if name not in seen:
                issues.append(FlowIssue(
                    file, f"states.{name}",
                    f"state {name!r} is unreachable from start {spec.start!r}", "warning"))
    return issues


def check_cross_flow(specs: dict[str, tuple[FlowSpec, str]]) -> list[FlowIssue]:
    """Checks between flows: ``start_flow`` targets exist; flow names are unique."""
    issues: list[FlowIssue] = []
    for spec, file in specs.values():
        for name, state in spec.states.items():
            for suffix, action in _state_actions(state):
                if isinstance(action, StartFlowAction) and action.start_flow not in specs:
                    issues.append(FlowIssue(
                        file, f"states.{name}.{suffix}.start_flow",
                        f"unknown flow {action.start_flow!r} (flows: {', '.join(sorted(specs))})"))
    return issues


class _FlowLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so keys like ``on`` and answers like ``no`` stay
    strings (YAML 1.1 would read them as booleans)."""


_FlowLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_FlowLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_FlowLoader)


def parse_flow_file(path: Path, catalogs: Catalogs) -> tuple[FlowSpec | None, list[FlowIssue]]:
    """Read, parse and check one flow file; the spec is None when it has errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        return None, [FlowIssue(str(path), "", f"cannot read: {error}")]
    return parse_flow_text(text, str(path), catalogs)


def parse_flow_text(text: str, file: str,
                    catalogs: Catalogs) -> tuple[FlowSpec | None, list[FlowIssue]]:
    """Parse and check a flow given as text (``file`` names it in the messages)."""
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        reason = " ".join(str(getattr(error, "problem", None) or error).split())
        context = getattr(error, "context", None)
        return None, [FlowIssue(where, "", f"cannot read YAML: {reason}"
                                           + (f" ({context})" if context else ""))]
    if not isinstance(raw, dict):
        return None, [FlowIssue(file, "", "a flow file is a mapping with flow, start, states")]
    spec, issues = _validate_leniently(raw, file)
    if spec is None:
        return None, _dedupe(issues)
    issues += check_flow(spec, file, catalogs)
    if any(issue.severity == "error" for issue in issues):
        return None, _dedupe(issues)
    return spec, issues


def _field_names() -> list[str]:
    names: set[str] = set()
    todo: list[type[BaseModel]] = [_Spec]
    while todo:
        model = todo.pop()
        todo.extend(model.__subclasses__())
        for name, field in model.model_fields.items():
            names.add(field.alias or name)
    return sorted(names)


def _message(item: Any, data_key: Any) -> str:
    """Pydantic's message in the words of the flow file, with a suggestion where one
    fits."""
    kind = item["type"]
    if kind == "extra_forbidden":
        return f"unknown field {data_key!r}{did_you_mean(data_key, _field_names())}"
    if kind == "missing":
        return "required field is missing"
    return item["msg"].removeprefix("Value error, ")


def _walk(data: Any, loc: tuple[Any, ...]) -> list[tuple[Any, Any]]:
    """The (container, key) steps of ``loc`` that exist in ``data`` (pydantic's own parts,
    such as union or validator names, are skipped)."""
    steps, current = [], data
    for part in loc:
        if (isinstance(current, dict) and isinstance(part, str) and part in current) or (
                isinstance(current, list) and isinstance(part, int)
                and 0 <= part < len(current)):
            steps.append((current, part))
            current = current[part]
    return steps


def _prune(data: dict[str, Any], steps: list[tuple[Any, Any]], extra: bool) -> bool:
    """Take out the smallest part holding an error, so the rest can be checked: the
    unknown key, a list item, a state's field, the state (emptied, so references to it
    still resolve); returns whether anything changed."""
    if extra and steps:
        container, key = steps[-1]
        del container[key]
        return True
    states = data.get("states")
    for depth in range(len(steps) - 1, -1, -1):
        container, key = steps[depth]
        if isinstance(container, list):
            container[key] = _PRUNED
            return True
        if container is states and depth == 1:
            if states[key] == {}:
                return False
            states[key] = {}
            return True
        if depth == 2 and steps[1][0] is states:
            del container[key]
            return True
    if not steps:
        return False
    key = steps[0][1]
    if key == "states" and isinstance(states, dict):
        bad = [name for name in states if not re.match(NAME_PATTERN, str(name))]
        for name in bad:
            del states[name]
        return bool(bad)
    if key == "flow":
        data["flow"] = "unnamed"
        return True
    if key in ("description", "intent", "triggers"):
        del data[key]
        return True
    return False


_PRUNED = object()


def _drop_pruned(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_pruned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_drop_pruned(v) for v in value if v is not _PRUNED]
    return value


def _validate_leniently(raw: dict[str, Any], file: str) -> tuple[FlowSpec | None,
                                                                  list[FlowIssue]]:
    """Validate the flow; on errors, report them, take the broken parts out and validate
    again, so one run reports every problem (and the semantic checks still run on the
    rest). Returns a spec only when the file had no such errors (or the pruned one, with
    the errors, for ``check_flow``)."""
    data = copy.deepcopy(raw)
    issues: list[FlowIssue] = []
    pruned: list[str] = []
    for _ in range(200):
        try:
            spec = FlowSpec.model_validate(_drop_pruned(data) if pruned else data)
        except ValidationError as error:
            changed = False
            for item in error.errors():
                path = _format_loc(item["loc"])
                steps = _walk(data, item["loc"])
                extra = item["type"] == "extra_forbidden"
                # After a prune, an error on a part that held the pruned one is its echo.
                if not any(p == path or p.startswith((f"{path}.", f"{path}["))
                           for p in pruned):
                    issues.append(FlowIssue(file, path, _message(
                        item, steps[-1][1] if steps else None)))
                if _prune(data, steps, extra):
                    changed = True
                    pruned.append(path)
            if not changed:
                return None, issues
            continue
        if issues:
            return (spec if "start" in raw and "states" in raw else None), issues
        return spec, issues
    return None, issues


def _dedupe(issues: list[FlowIssue]) -> list[FlowIssue]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for issue in issues:
        if (issue.path, issue.message) not in seen:
            seen.add((issue.path, issue.message))
            unique.append(issue)
    return unique


def flow_files(path: Path) -> list[Path]:
    """The flow files at ``path`` (a file, or every *.yaml / *.yml in a folder)."""
    if path.is_file():
        return [path]
    return sorted([*path.glob("*.yaml"), *path.glob("*.yml")])


def validate_paths(
    path: Path, catalogs: Catalogs
) -> tuple[dict[str, tuple[FlowSpec, str]], list[FlowIssue]]:
    """Parse and check every flow file under ``path``; returns the valid specs (by flow
    name, with their file) and every issue found, cross-flow ones included."""
    specs: dict[str, tuple[FlowSpec, str]] = {}
    issues: list[FlowIssue] = []
    if not path.exists():
        return specs, [FlowIssue(str(path), "", "no such file or folder")]
    for file in flow_files(path):
        spec, found = parse_flow_file(file, catalogs)
        issues.extend(found)
        if spec is None:
            continue
        if spec.flow in specs:
            other = specs[spec.flow][1]
            issues.append(FlowIssue(str(file), "flow", f"flow name {spec.flow!r} used by {other}"))
            continue
        specs[spec.flow] = (spec, str(file))
    cross = check_cross_flow(specs)
    issues.extend(cross)
    for issue in cross:
        for name, (_, file) in list(specs.items()):
            if file == issue.file:
                specs.pop(name)
    return specs, issues
