"""What the platform adds to a model's answer: the facts themselves, from the knowledge.

The model's text may only phrase (``grounding``); prices, links and codes the customer
needs are appended here from the cited sources and the catalog, formatted for the
customer's locale, never copied from the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from babel.numbers import format_currency, is_currency

from bot_platform.ai.grounding import Facts, Source, currency_code, extract, mentions


def format_money(amount: float, currency: str | None, locale: str) -> str:
    """29.0 EUR as the locale writes it: "€29.00" (en), "29,00 EUR" (uk), "29,00 €" (pl)."""
    code = currency_code(currency)
    if code is None:
        return f"{amount:.2f}"
    if not is_currency(code):
        return f"{amount:.2f} {code}"
    try:
        return format_currency(amount, code, locale=locale.replace("-", "_"))
    except (ValueError, LookupError):
        return f"{amount:.2f} {code}"


def facts_lines(answer: str, cited: Sequence[Source], catalog: Sequence[Source],
                locale: str, limit: int = 3) -> list[str]:
    """What the platform adds to an answer: each product it cites or names with its
    price and link, and each cited FAQ entry's links, emails, phones and codes the answer
    leaves out. Values come from the knowledge, never from the model's text."""
    products = [p for p in cited if p.product]
    products += [p for p in catalog if p.product and p not in products and
                 mentions(answer, p)]
    lines = []
    for product in products[:limit]:
        parts = [product.title]
        if product.price is not None:
            parts.append(format_money(product.price, product.currency, locale))
        if product.url:
            parts.append(product.url)
        lines.append(" — ".join(parts))
    said = Facts([Source("", answer)])
    for source in (s for s in cited if not s.product):
        for found in extract(source.text):
            wanted = found.kind in ("url", "email", "phone") or found.cued  # not "NOTE"
            if wanted and not said.supports(found) and found.text not in lines:
                lines.append(found.text)
    return lines
