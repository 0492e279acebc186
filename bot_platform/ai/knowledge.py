"""The brand's knowledge for AI answers: FAQ files per locale (YAML or Markdown) and the
product catalog, ranked with BM25 in plain Python (no model downloads, no network)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_WORD = re.compile(r"\w+", re.UNICODE)
# One-letter words are dropped anyway; these are the common longer ones.
_STOP = {"the", "an", "is", "are", "do", "does", "you", "my", "to", "of", "and", "in", "on",
         "for", "can", "how", "what", "ви", "на", "чи", "як", "що", "jak", "czy", "się"}


def tokens(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.casefold()) if w not in _STOP and len(w) > 1]


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrievable piece of knowledge."""

    title: str
    text: str
    source: str  # "faq" or "product"
    # A product's catalog row (title, price, currency, url): the facts the platform
    # states itself and checks the model's answer against.
    product: dict[str, Any] | None = field(default=None, compare=False)


class Bm25:
    """Okapi BM25 over a fixed list of passages."""

    def __init__(self, passages: list[Passage], k1: float = 1.4, b: float = 0.75) -> None:
        self.passages = passages
        self.k1, self.b = k1, b
        self.docs = [Counter(tokens(f"{p.title} {p.title} {p.text}")) for p in passages]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.average = (sum(self.lengths) / len(self.lengths)) if self.lengths else 0.0
        frequency: Counter[str] = Counter()
        for doc in self.docs:
            frequency.update(doc.keys())
        n = len(passages)
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in
                    frequency.items()}

    def search(self, query: str, k: int) -> list[tuple[float, Passage]]:
        terms = tokens(query)
        scored = []
        for index, doc in enumerate(self.docs):
            score = 0.0
            for term in terms:
                tf = doc.get(term, 0)
                if tf:
                    norm = self.k1 * (1 - self.b + self.b * self.lengths[index] / self.average)
                    score += self.idf[term] * tf * (self.k1 + 1) / (tf + norm)
            if score > 0:
                scored.append((score, self.passages[index]))
        scored.sort(key=lambda item: -item[0])
        return scored[:k]


def load_faq(path: Path) -> list[Passage]:
    """A YAML list of {question, answer} or Markdown with ``## question`` headings."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        items = yaml.safe_load(text) or []
        return [Passage(str(i["question"]), str(i["answer"]), "faq") for i in items
                if isinstance(i, dict) and i.get("question") and i.get("answer")]
    passages, title, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if title and "".join(lines).strip():
                passages.append(Passage(title, "\n".join(lines).strip(), "faq"))
            title, lines = line[3:].strip(), []
        elif title is not None:
            lines.append(line)
    if title and "".join(lines).strip():
        passages.append(Passage(title, "\n".join(lines).strip(), "faq"))
    return passages


class Knowledge:
    """FAQ per locale (falling back to the default locale's) plus products."""

    def __init__(self, faq: dict[str, list[Passage]], products: Iterable[Passage] = (),
                 default_locale: str = "en") -> None:
        self.default_locale = default_locale
        self.products = list(products)
        self.indexes = {locale: Bm25(passages + self.products)
                        for locale, passages in faq.items()}
        if default_locale not in self.indexes:
            self.indexes[default_locale] = Bm25(self.products)

    @classmethod
    def load(cls, folder: Path, products: Iterable[dict[str, Any]] = (),
             default_locale: str = "en") -> Knowledge:
        faq: dict[str, list[Passage]] = {}
        if folder.is_dir():
            for file in sorted(folder.iterdir()):
                if file.suffix in (".yaml", ".yml", ".md"):
                    faq.setdefault(file.stem, []).extend(load_faq(file))
        items = [Passage(p["title"], _product_text(p), "product", dict(p)) for p in products]
        return cls(faq, items, default_locale)

    def search(self, text: str, locale: str, k: int = 3,
               min_ratio: float = 0.5) -> list[Passage]:
        """The best passages, at most ``k``: only those scoring at least ``min_ratio`` of
        the best one, so a weakly related entry does not ride along with the answer."""
        index = self.indexes.get(locale) or self.indexes[self.default_locale]
        found = index.search(text, k)
        if not found and index is not self.indexes[self.default_locale]:
            found = self.indexes[self.default_locale].search(text, k)
        best = found[0][0] if found else 0.0
        return [passage for score, passage in found if score >= best * min_ratio]


def _product_text(product: dict[str, Any]) -> str:
    price = product.get("price")
    parts = [product.get("description") or "", product.get("url") or ""]
    if price is not None:
        parts.insert(0, f"Price: {float(price):.2f} {product.get('currency') or ''}".strip())
    return ". ".join(p for p in parts if p)
