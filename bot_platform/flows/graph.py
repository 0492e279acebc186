"""Where a flow's states lead: the edges of each state, what is reachable from the start,
and the Mermaid state diagram ``botp flows graph`` prints."""

from __future__ import annotations

from collections.abc import Iterator

from bot_platform.flows.spec import FlowSpec, StateSpec


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


def reachable(spec: FlowSpec) -> set[str]:
    """The states reachable from the start state (triggers enter only there)."""
    if spec.start not in spec.states:
        return set()
    seen = {spec.start}
    frontier = [spec.start]
    while frontier:
        current = spec.states[frontier.pop()]
        for _, target in state_edges(current):
            if target in spec.states and target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def mermaid(spec: FlowSpec) -> str:
    """The flow as a Mermaid ``stateDiagram-v2``."""
    lines = [f"%% flow {spec.flow}", "stateDiagram-v2", f"    [*] --> {spec.start}"]
    for name, state in spec.states.items():
        for path, target in state_edges(state):
            label = path.split(".")[0].replace("[", " ").replace("]", "")
            if state.after and path == "after.goto":
                label = f"after {state.after.delay}"
            lines.append(f"    {name} --> {target} : {label}")
        if state.end:
            lines.append(f"    {name} --> [*]")
    return "\n".join(lines)
