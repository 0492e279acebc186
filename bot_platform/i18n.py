"""Message catalogs (Project Fluent): ``locales/<locale>/*.ftl``.

Fluent gets plural categories of uk, pl and ar right. Fluent's own bidi isolation
(``use_isolating``) is off: it would wrap every placeable, and the invisible FSI/PDI would
end up inside links and copied promo codes. Instead ``format`` isolates each string value
that can change the direction of the text around it (a name with Arabic letters or a
RIGHT-TO-LEFT OVERRIDE), and starts a right-to-left message whose
first placeable puts a Latin word first with a RIGHT-TO-LEFT MARK, so the messenger does
not lay it out left to right (see ``bot_platform.text``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fluent.runtime import FluentBundle
from fluent.runtime.resolver import Placeable, TextElement
from fluent.syntax import FluentParser
from fluent.syntax import ast as ftl

from bot_platform.errors import FlowIssue
from bot_platform.text import is_rtl_locale, isolate, needs_isolation, rtl_start

log = logging.getLogger(__name__)

LOCALE_PATTERN = r"^[a-z]{2,3}(-[a-z0-9]{2,8})*$"


def _line(source: str, offset: int) -> int:
    return source.count("\n", 0, offset) + 1


@functools.lru_cache(maxsize=512)
def _parse(source: str) -> ftl.Resource:
    """One text's syntax tree, parsed once per process: catalogs are rebuilt from the same
    texts at every start, flow check and flow version, and parsing was most of that work.
    Bundles only read the tree (their compiler copies it), so one tree serves them all."""
    return FluentParser().parse(source)


def parse_ftl(sources: list[tuple[str, str]]) -> tuple[list[ftl.Resource], list[FlowIssue]]:
    """Parse one locale's ``(file, text)`` sources; every syntax error (a Junk entry) and
    every key defined twice (in one file or across the locale's files) is an issue named
    ``file:line``. Fluent itself would skip the broken entry and keep the first
    definition, silently: a text would fall back to the default locale or stay old."""
    resources, issues = [], []
    seen: dict[str, str] = {}
    for file, source in sources:
        resource = _parse(source)
        resources.append(resource)
        for entry in resource.body:
            if isinstance(entry, ftl.Junk):
                # The entry's first line (the parser notices the error later, often on
                # the next line), with the parser's reason.
                first = entry.content.strip().splitlines()[0][:60] if entry.content else ""
                reasons = "; ".join(note.message for note in entry.annotations) or "cannot parse"
                issues.append(FlowIssue(f"{file}:{_line(source, entry.span.start)}", "",
                                        f"syntax error in {first!r}: {reasons}"))
            elif isinstance(entry, ftl.Message | ftl.Term):
                key = ("-" if isinstance(entry, ftl.Term) else "") + entry.id.name
                where = f"{file}:{_line(source, entry.span.start if entry.span else 0)}"
                if key in seen:
                    issues.append(FlowIssue(where, key, f"duplicate key {key!r} (first "
                                                        f"defined at {seen[key]})"))
                else:
                    seen[key] = where
    return resources, issues


class Catalogs:
    """All locales' messages; formatting falls back to the default locale per key."""

    def __init__(self, bundles: Mapping[str, FluentBundle], default_locale: str,
                 sources: Mapping[str, list[tuple[str, str]]] | None = None,
                 issues: list[FlowIssue] | None = None) -> None:
        self.bundles = dict(bundles)
        self.default_locale = default_locale
        # Per locale, the (file, text) it was built from, so texts uploaded with a flow
        # version can be laid over it (``with_texts``).
        self.sources = {locale: list(items) for locale, items in (sources or {}).items()}
        self.issues = list(issues or [])  # syntax errors and duplicate keys (file:line)
        # (locale, key) -> the text, for messages that are plain text (no placeable): the
        # same for everyone, so formatted once (a timer wave renders them thousands of
        # times). Emptied when the bundles change (``adopt``).
        self._fixed: dict[tuple[str, str], str | None] = {}

    @classmethod
    def load(cls, directory: Path, default_locale: str = "en") -> Catalogs:
        """Every ``<locale>/*.ftl`` under ``directory``; problems are kept in ``issues``
        (the platform refuses to start with them, ``botp flows validate`` prints them)."""
        sources: dict[str, list[tuple[str, str]]] = {}
        if directory.is_dir():
            for locale_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
                sources[locale_dir.name] = [
                    (str(file), file.read_text(encoding="utf-8"))
                    for file in sorted(locale_dir.glob("*.ftl"))]
        return cls.build(sources, default_locale)

    @classmethod
    def build(cls, sources: Mapping[str, list[tuple[str, str]]], default_locale: str,
              overrides: Mapping[str, list[tuple[str, str]]] | None = None) -> Catalogs:
        """Catalogs from per-locale sources; ``overrides`` (texts of flow versions) are
        added last and replace keys of the same name."""
        bundles: dict[str, FluentBundle] = {}
        issues: list[FlowIssue] = []
        overrides = overrides or {}
        for locale in sorted({*sources, *overrides, default_locale}):
            bundle = FluentBundle([locale], use_isolating=False)
            resources, found = parse_ftl(sources.get(locale, []))
            issues += found
            for resource in resources:
                bundle.add_resource(resource)
            extra, found = parse_ftl(overrides.get(locale, []))
            issues += found
            for resource in extra:
                bundle.add_resource(resource, allow_overrides=True)
            bundles[locale] = bundle
        return cls(bundles, default_locale, sources, issues)

    def with_texts(self, texts: Mapping[str, list[tuple[str, str]]]) -> Catalogs:
        """These catalogs plus ``texts`` (locale -> [(origin, Fluent text)]) on top."""
        return Catalogs.build(self.sources, self.default_locale, texts)

    def adopt(self, other: Catalogs) -> None:
        """Take ``other``'s messages in place: the engine, the flows and the API hold this
        object, and all see the new texts at once."""
        self.bundles = other.bundles
        self._fixed = {}

    @property
    def locales(self) -> list[str]:
        return sorted(self.bundles)

    def keys(self, locale: str) -> list[str]:
        """The message keys of ``locale`` (for suggestions)."""
        bundle = self.bundles.get(locale)
        return sorted(bundle._messages) if bundle is not None else []

    def has(self, locale: str, key: str) -> bool:
        bundle = self.bundles.get(locale)
        return bundle is not None and bundle.has_message(key)

    def resolve_locale(self, language: str | None) -> str:
        """Map a messenger language code ("uk-UA", "pt_BR") to a catalog we have."""
        if language:
            code = language.replace("_", "-").lower()
            if code in self.bundles:
                return code
            base = code.split("-")[0]
            if base in self.bundles:
                return base
        return self.default_locale

    def fixed(self, locale: str, key: str) -> str | None:
        """What ``format`` gives for ``key`` whatever the variables (a plain-text message),
        or None when its text depends on them (or the key is missing)."""
        if (locale, key) in self._fixed:
            return self._fixed[(locale, key)]
        found = self._message(locale, key)
        fixed = None
        if found is not None and isinstance(found[3].value, TextElement):
            fixed = self._format(*found, None)
        self._fixed[(locale, key)] = fixed
        return fixed

    def _message(self, locale: str, key: str) -> tuple[str, Any, Any, Any] | None:
        """(locale, key, bundle, message) of ``key`` in ``locale``, else in the default
        locale; None when neither has it with a value."""
        for candidate in (locale, self.default_locale):
            bundle = self.bundles.get(candidate)
            if bundle is None or not bundle.has_message(key):
                continue
            message = bundle.get_message(key)
            if message.value is not None:
                return candidate, key, bundle, message
        return None

    def format(self, locale: str, key: str, variables: Mapping[str, Any] | None = None) -> str:
        """The message ``key`` in ``locale``, else in the default locale, else the key."""
        text = self.fixed(locale, key)
        if text is not None:
            return text
        found = self._message(locale, key)
        if found is not None:
            return self._format(*found, variables)
        log.warning("missing catalog key %r in %s and %s", key, locale, self.default_locale)
        return key

    @staticmethod
    def _format(locale: str, key: str, bundle: FluentBundle, message: Any,
                variables: Mapping[str, Any] | None) -> str:
        text, errors = bundle.format_pattern(message.value, _isolated(variables))
        if errors:
            log.warning("catalog %s/%s: %s", locale, key, errors[0])
        # A plain text compiles to one TextElement, anything else to a Pattern.
        elements = getattr(message.value, "elements", [message.value])
        if elements and isinstance(elements[0], Placeable) and is_rtl_locale(locale):
            text = rtl_start(text)
        return text


def _isolated(variables: Mapping[str, Any] | None) -> dict[str, Any]:
    """The variables with every string that could reorder its surroundings isolated."""
    return {name: isolate(value) if isinstance(value, str) and needs_isolation(value)
            else value for name, value in (variables or {}).items()}
