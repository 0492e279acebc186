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

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fluent.runtime import FluentBundle, FluentResource
from fluent.runtime.resolver import Placeable

from bot_platform.text import is_rtl_locale, isolate, needs_isolation, rtl_start

log = logging.getLogger(__name__)


class Catalogs:
    """All locales' messages; formatting falls back to the default locale per key."""

    def __init__(self, bundles: Mapping[str, FluentBundle], default_locale: str) -> None:
        self.bundles = dict(bundles)
        self.default_locale = default_locale

    @classmethod
    def load(cls, directory: Path, default_locale: str = "en") -> Catalogs:
        bundles: dict[str, FluentBundle] = {}
        if directory.is_dir():
            for locale_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
                bundle = FluentBundle([locale_dir.name], use_isolating=False)
                for file in sorted(locale_dir.glob("*.ftl")):
                    bundle.add_resource(FluentResource(file.read_text(encoding="utf-8")))
                bundles[locale_dir.name] = bundle
        if default_locale not in bundles:
            bundles[default_locale] = FluentBundle([default_locale], use_isolating=False)
        return cls(bundles, default_locale)

    @property
    def locales(self) -> list[str]:
        return sorted(self.bundles)

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

    def format(self, locale: str, key: str, variables: Mapping[str, Any] | None = None) -> str:
        """The message ``key`` in ``locale``, else in the default locale, else the key."""
        for candidate in (locale, self.default_locale):
            bundle = self.bundles.get(candidate)
            if bundle is None or not bundle.has_message(key):
                continue
            message = bundle.get_message(key)
            if message.value is None:
                continue
            text, errors = bundle.format_pattern(message.value, _isolated(variables))
            if errors:
                log.warning("catalog %s/%s: %s", candidate, key, errors[0])
            # A plain text compiles to one TextElement, anything else to a Pattern.
            elements = getattr(message.value, "elements", [message.value])
            if elements and isinstance(elements[0], Placeable) and is_rtl_locale(candidate):
                text = rtl_start(text)
            return text
        log.warning("missing catalog key %r in %s and %s", key, locale, self.default_locale)
        return key


def _isolated(variables: Mapping[str, Any] | None) -> dict[str, Any]:
    """The variables with every string that could reorder its surroundings isolated."""
    return {name: isolate(value) if isinstance(value, str) and needs_isolation(value)
            else value for name, value in (variables or {}).items()}
