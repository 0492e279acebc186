"""Reading flows: YAML text, a file, or a folder of files, parsed and checked
(``validation``) into ``FlowSpec``s."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from bot_platform.errors import FlowIssue
from bot_platform.flows.spec import FlowSpec
from bot_platform.flows.validation import (
    check_cross_flow,
    check_flow,
    dedupe,
    validate_leniently,
)
from bot_platform.i18n import Catalogs


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
    spec, issues = validate_leniently(raw, file)
    if spec is None:
        return None, dedupe(issues)
    issues += check_flow(spec, file, catalogs)
    if any(issue.severity == "error" for issue in issues):
        return None, dedupe(issues)
    return spec, issues


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
