"""Checking a flow: every problem with the file, the path inside it and the reason, in one
run. Pydantic's errors are put in the flow file's words and the broken part is taken out
so the rest is still checked; then the checks that need the whole flow (unknown states,
bad durations, catalog keys: an error in the default locale, a warning in the others,
which fall back to it; unreachable states: a warning) and those between flows."""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from bot_platform.errors import FlowIssue
from bot_platform.flows.actions import StartFlowAction
from bot_platform.flows.base import NAME_PATTERN, Spec, did_you_mean, parse_duration
from bot_platform.flows.graph import reachable, state_edges
from bot_platform.flows.shop_actions import SpinsLeftAction
from bot_platform.flows.spec import FlowSpec, catalog_keys, state_actions
from bot_platform.i18n import Catalogs


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
        for suffix, action in state_actions(state):
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
        seen = reachable(spec)
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
            for suffix, action in state_actions(state):
                if isinstance(action, StartFlowAction) and action.start_flow not in specs:
                    issues.append(FlowIssue(
                        file, f"states.{name}.{suffix}.start_flow",
                        f"unknown flow {action.start_flow!r} (flows: {', '.join(sorted(specs))})"))
    return issues


def _field_names() -> list[str]:
    names: set[str] = set()
    todo: list[type[BaseModel]] = [Spec]
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
        names = _field_names()
        if str(data_key) in names:  # the hint would be the key itself
            return f"unknown field {data_key!r} here (a field of another part of a flow)"
        return f"unknown field {data_key!r}{did_you_mean(data_key, names)}"
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


def validate_leniently(raw: dict[str, Any], file: str) -> tuple[FlowSpec | None,
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


def dedupe(issues: list[FlowIssue]) -> list[FlowIssue]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for issue in issues:
        if (issue.path, issue.message) not in seen:
            seen.add((issue.path, issue.message))
            unique.append(issue)
    return unique
