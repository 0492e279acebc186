"""The brand's knowledge for AI answers: FAQ files per locale (YAML or Markdown) and the
product catalog, ranked with BM25 in plain Python (no model downloads, no network)."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot_platform.catalog import catalog_stamp
from bot_platform.database import Database
from bot_platform.models import Product

log = logging.getLogger(__name__)

FAQ_SUFFIXES = (".yaml", ".yml", ".md")
_WORD = re.compile(r"\w+", re.UNICODE)
# Words longer than this are cut to it: a cheap stemmer for inflected languages (Polish
# "dostawa", "dostawy", "dostawę" and Ukrainian "доставка", "доставку" meet).
STEM = 6
# Arabic: the article and the particles fused in front of it ("والتوصيل" = "and the
# delivery"), longest first.
_AR_PREFIXES = ("وال", "بال", "فال", "كال", "لل", "ال")
# Letters NFKD leaves whole; Arabic tatweel (a stretch), taa marbuta as haa, alef maqsura
# as yaa (spelled both ways).
_FOLD = str.maketrans({"ł": "l", "ø": "o", "đ": "d", "ß": "ss", "\u0640": "",
                       "\u0629": "\u0647", "\u0649": "\u064a"})


def _fold(word: str) -> str:
    """Case, accents and Arabic letter variants folded, so "dostawe" finds "dostawę" and
    "أسعار" finds "اسعار": NFKD, combining marks (also Arabic vowel signs) dropped."""
    decomposed = unicodedata.normalize("NFKD", word.casefold().translate(_FOLD))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _stem(word: str) -> str:
    for prefix in _AR_PREFIXES:
        if word.startswith(prefix) and len(word) - len(prefix) >= 2:
            word = word[len(prefix):]
            break
    return word[:STEM]


# One-letter words are dropped anyway; these are the common longer ones.
_STOP = {_fold(w) for w in (
    "the", "an", "is", "are", "do", "does", "you", "my", "to", "of", "and", "in", "on",
    "for", "can", "how", "what", "ви", "на", "чи", "як", "що", "jak", "czy", "się", "do",
    "na", "jest", "mój", "moje", "هل", "في", "من", "ما", "على", "عن")}


def tokens(text: str) -> list[str]:
    """The search terms of a text in any of the locales' scripts."""
    words = (_fold(w) for w in _WORD.findall(text))
    return [_stem(w) for w in words if w not in _STOP and len(w) > 1]


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
                if file.suffix in FAQ_SUFFIXES:
                    faq.setdefault(file.stem, []).extend(load_faq(file))
        items = [Passage(p["title"], _product_text(p), "product", dict(p)) for p in products]
        return cls(faq, items, default_locale)

    def adopt(self, other: Knowledge) -> None:
        """Take over a newer build in place, so whoever holds this object searches it."""
        vars(self).update(vars(other))

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


async def load_products(session: AsyncSession) -> list[dict[str, Any]]:
    """The in-stock products as the knowledge reads them."""
    return [{"sku": p.sku, "title": p.title, "price": p.price, "currency": p.currency,
             "url": p.url, "description": ", ".join(p.tags or [])}
            for p in (await session.scalars(select(Product).where(
                Product.in_stock.is_(True)).order_by(Product.id))).all()]


class LiveKnowledge:
    """A ``Knowledge`` kept current in every process. Before a search, at most every
    ``every`` seconds, it compares the catalog's stamp (``catalog.catalog_stamp``) and the
    FAQ files' sizes and modification times with those it was built from, and rebuilds
    when either moved: a price changed through any process's API is in the next prompt
    within seconds. A rebuild that fails (a broken FAQ file) keeps the last good one."""

    def __init__(self, db: Database, folder: Path, default_locale: str, every: float,
                 clock: Any) -> None:
        self.db = db
        self.folder = folder
        self.default_locale = default_locale
        self.every = every
        self.clock = clock
        self.knowledge = Knowledge({}, (), default_locale)
        self._stamp: tuple[Any, ...] | None = None
        self._checked: datetime | None = None
        self._lock = asyncio.Lock()

    def faq_stamp(self) -> tuple[tuple[str, int, int, int, int], ...]:
        """Each file's name, size, modification time, inode and change time: a file
        renamed over the old one with the same size and modification time (rsync -a,
        cp -p) is a new inode with a new change time."""
        if not self.folder.is_dir():
            return ()
        return tuple((file.name, stat.st_mtime_ns, stat.st_size, stat.st_ino,
                      stat.st_ctime_ns)
                     for file in sorted(self.folder.iterdir())
                     if file.suffix in FAQ_SUFFIXES for stat in (file.stat(),))

    def _due(self, now: datetime) -> bool:
        return self._checked is None or (now - self._checked).total_seconds() >= self.every

    async def refresh(self, *, force: bool = False) -> bool:
        """Rebuild if the catalog or the FAQ changed; True when it did. ``force`` (at
        start-up) checks now and lets a failure raise."""
        if not force and not self._due(self.clock.now()):
            return False
        async with self._lock:
            now = self.clock.now()
            if not force and not self._due(now):
                return False  # another search checked while this one waited
            self._checked = now
            try:
                return await self._rebuild_if_changed()
            except Exception:
                if force:
                    raise
                log.exception("ai: the knowledge could not be rebuilt; the last one stays")
                return False

    async def _rebuild_if_changed(self) -> bool:
        # Stamps before contents: a change in between only causes one more rebuild.
        faq = self.faq_stamp()
        async with self.db.session() as session:
            stamp = (await catalog_stamp(session), faq)
            if stamp == self._stamp:
                return False
            products = await load_products(session)
        built = await asyncio.to_thread(Knowledge.load, self.folder, products,
                                        self.default_locale)
        self.knowledge.adopt(built)
        self._stamp = stamp
        log.info("ai: knowledge built: %d products, FAQ %s", len(products),
                 ", ".join(sorted(built.indexes)) or "-")
        return True
