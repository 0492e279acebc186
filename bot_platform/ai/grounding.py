# ruff: noqa: RUF001, RUF002, RUF003 - Cyrillic, Arabic digits and signs are the point here
"""Grounding: which facts in a model's answer the cited knowledge supports.

The model may phrase, never assert. Every money amount, percentage, code-like token, link,
phone number and email address in its own text must be a fact of a passage it cited (or
of a product it names); anything else is a claim the platform refuses. Prices are compared
as amounts of a currency ("29" == "29.00" == "29,00" == "٢٩٫٠٠"), and a price is true only
as the price of a product in scope of its sentence, or as an amount of a cited FAQ entry
the sentence is about: "50" in the delivery answer is no price of a cream.

Pure functions without I/O, so the rules can be property-tested (tests/test_ai.py).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# ISO code -> how customers and models write the currency (symbols, codes, words in
# en/uk/pl/ar, inflected forms listed because Slavic words change their endings).
_CURRENCIES: dict[str, tuple[str, ...]] = {
    "EUR": ("€", "eur", "euro", "euros", "євро", "евро", "eura", "يورو"),
    "USD": ("$", "usd", "dollar", "dollars", "долар", "долари", "доларів", "долара",
            "dolar", "dolary", "dolarów", "dolara", "دولار", "دولارات"),
    "UAH": ("₴", "uah", "грн", "гривня", "гривні", "гривень", "гривню", "гривнi", "hrywna",
            "hrywny", "hrywien", "hryvnia", "hryvnias", "هريفنيا"),
    "PLN": ("zł", "pln", "zl", "złoty", "złote", "złotych", "zloty", "zlotys", "злотий",
            "злотих", "злоті", "زلوتي"),
    "GBP": ("£", "gbp", "pound", "pounds", "фунт", "фунти", "фунтів", "funt", "funty",
            "funtów", "جنيه"),
}
_CURRENCY_OF = {form: code for code, forms in _CURRENCIES.items() for form in forms}


_NO_LETTER_BEFORE = r"(?<![^\W\d_])"
_NO_LETTER_AFTER = r"(?![^\W\d_])"


def _currency_pattern() -> str:
    forms = sorted(_CURRENCY_OF, key=len, reverse=True)
    words = [re.escape(f) for f in forms if f[0].isalpha()]
    symbols = [re.escape(f) for f in forms if not f[0].isalpha()]
    # Letters must not touch a word ("Europe" is no euro) but digits may ("29EUR").
    return rf"(?:{'|'.join(symbols)}|{_NO_LETTER_BEFORE}(?:{'|'.join(words)}){_NO_LETTER_AFTER})"


_CUR = _currency_pattern()
# A number in any script the locales use: Latin and Arabic-Indic digits, "." "," "٫" "٬"
# separators, and spaces as thousands separators only before exactly three digits. It
# starts only where a number starts, so a long run of digits costs linear time.
_NUM = (r"(?<![\d.,\u066b\u066c])\d+"
        r"(?:(?:[.,\u066b\u066c'\u2019\u00a0\u202f]|[ ](?=\d{3}(?!\d)))\d+)*")
_MONEY = re.compile(rf"(?P<pre>{_CUR})[ \u00a0\u202f]?(?P<n1>{_NUM})"
                    rf"|(?P<n2>{_NUM})[ \u00a0\u202f]?(?P<post>{_CUR})", re.IGNORECASE)
_PERCENT = re.compile(
    rf"(?P<n1>{_NUM})[ \u00a0\u202f]?(?:%|٪|％|{_NO_LETTER_BEFORE}(?:per ?cent|pct|"
    rf"відсот\w*|процент\w*|procent\w*){_NO_LETTER_AFTER}|(?:بال|في ال)(?:مئة|مائة))"
    rf"|(?:%|٪)[ \u00a0\u202f]?(?P<n2>{_NUM})", re.IGNORECASE)
# "fifty euros", "двадцять відсотків": an amount in words cannot be compared with the
# catalog, so a number word right before a currency or a percent sign is always a claim.
_NUMBER_WORD = (
    r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|"
    r"forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand|million|half|"
    r"од[иі]н|одна|дв|три|чотир|п['’ʼ]?ят|шіст|шість|сім|вісім|дев['’ʼ]?ят|десят|сорок|"
    r"сто|трист|тисяч|мільйон|половин|"
    r"jed|dw|trzy|trzech|czter|pięć|pięt|sześ|szes|siedem|siedm|osiem|osm|dziewię|"
    r"dziesię|sto|tysi|milion|pół|"
    r"واحد|اثن|ثلاث|أربع|اربع|خمس|ست|سبع|ثمان|تسع|عشر|مئ|مائ|ألف|الف|مليون|نصف)"
    r"[\w'’ʼ]*")
_AMOUNT_IN_WORDS = re.compile(
    rf"(?<![\w'’ʼ]){_NUMBER_WORD}[ \u00a0-]?(?:(?P<cur>{_CUR})|%|٪|"
    rf"{_NO_LETTER_BEFORE}(?:per ?cent|pct|відсот\w*|процент\w*|procent\w*)"
    rf"{_NO_LETTER_AFTER}|(?:بال|في ال)(?:مئة|مائة))", re.IGNORECASE)
# "costs 50", "ціна 50": a price without a currency is still a price.
_PRICE_WORD = re.compile(
    rf"(?<!\w)(?:costs?|priced?|prices|коштує|коштують|коштуватиме|ціна|ціною|вартість|"
    rf"kosztuje|kosztują|cena|ceną|koszt|يكلف|تكلف|بسعر|سعر|السعر|سعره|سعرها)(?!\w)"
    rf"\W{{0,3}}(?:[^\W\d]+\W{{1,3}}){{0,6}}?(?P<n>{_NUM})", re.IGNORECASE)
# A quoted local part ("refunds"@example.com) is an address as well.
# "now only 50!", "лише 50": a number after such a word is a price, unless a duration or
# a quantity follows ("in just 2 days", "only 3 left").
_PRICE_CUE = re.compile(
    rf"(?<!\w)(?:only|just|лише|тільки|всього|усього|tylko|jedyne|zaledwie|فقط)\W{{1,3}}"
    rf"(?P<n>{_NUM})(?!\d|[.,\u066b\u066c]\d)(?![ \u00a0]?\d)(?![ \u00a0]?(?:[-–]|to\b|"
    rf"days?|hours?|h\b|hrs?|weeks?|months?|years?|min|ml|g\b|kg|pcs|pieces?|items?|"
    rf"left|times?|people|customers|дн|доб|год|тиж|міс|рок|мл|г\b|шт|раз|"
    rf"dni|dzie|godz|tydz|tygod|miesi|lat|szt|raz|يوم|أيام|ايام|ساع|أسبوع|اسبوع|شهر|مل|قطع))",
    re.IGNORECASE)
# Only from the start of a run of name characters: linear on a 20,000-letter word.
_EMAIL = re.compile(r"(?<![\w.+-])(?:\"[^\"\s]{1,64}\"|[\w.+-]+)@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(
    r"(?:https?://|www\.)[^\s<>\"'«»()\[\]]+"
    # A bare domain, also internationalised (магазин.рф, ціни.укр).
    r"|(?<![\w@.-])(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,}(?![\w@-])"
    r"(?:/[^\s<>\"'«»()\[\]]*)?", re.IGNORECASE)
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d(?:[\s().\-]{0,2}\d){6,}")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*")
_UNIT = re.compile(r"^\d+(?:st|nd|rd|th|h|hrs?|min|ml|l|g|kg|mg|cm|mm|m|x|pcs|мл|г|кг|шт|"
                   r"год|хв|см|мм)$", re.IGNORECASE)
_CODE_WORDS = {"code", "codes", "coupon", "promo", "promocode", "voucher", "код", "коду",
               "кодом", "промокод", "промокоду", "промокодом", "купон", "kod", "kodem",
               "kodu", "kupon", "kuponu", "رمز", "كود", "الكود", "الرمز", "كوبون", "قسيمة"}
_CODE_FILLERS = {"the", "a", "an", "our", "this", "your", "promo", "discount", "is", "code",
                 "з", "ze", "z", "rabatowy", "rabatowego", "знижки"}
_NOT_CODES = {"at", "when", "below", "above", "during", "in", "on", "for", "you", "your",
              "from", "to", "with", "and", "or", "will", "that", "which", "only", "once",
              "here", "there", "field", "box", "checkout", "applies", "works", "expires",
              "is", "was", "can", "cannot", "not", "must", "should", "if", "as"}
# Words that say nothing about which FAQ entry a sentence is about.
_GENERIC = {"cost", "costs", "price", "prices", "priced", "only", "just", "much", "many",
            "how", "what", "the", "and", "for", "with", "this", "that", "it", "its", "is",
            "are", "our", "your", "you", "today", "now", "week", "коштує", "ціна", "вартість",
            "лише", "тільки", "скільки", "kosztuje", "cena", "koszt", "tylko", "ile", "سعر",
            "يكلف", "فقط", "كم"}
_SENTENCE_END = re.compile(r"(?<=[.!?؟;\n])\s+|\n+")


@dataclass(frozen=True, slots=True)
class Source:
    """A piece of knowledge the model was shown: an FAQ entry, or a product with its
    price (``title`` names it in answers)."""

    title: str
    text: str
    price: float | None = None
    currency: str | None = None
    url: str | None = None
    product: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    """One fact the model asserted that the knowledge does not support."""

    kind: str  # money, percent, code, url, email, phone
    text: str


def parse_number(raw: str) -> Decimal | None:
    """"1 299,00", "1,299.00", "29", "٢٩٫٥" as a Decimal (None when not a number)."""
    chars = []
    for ch in raw:
        if ch.isdigit():
            chars.append(str(unicodedata.decimal(ch, 0)))
        elif ch in ".\u066b":
            chars.append(".")
        elif ch in ",\u066c":
            chars.append(",")
    text = "".join(chars)
    dots, commas = text.count("."), text.count(",")
    if dots and commas:
        decimal_sep = "." if text.rfind(".") > text.rfind(",") else ","
        text = text.replace("," if decimal_sep == "." else ".", "").replace(",", ".")
    elif dots + commas:
        sep = "." if dots else ","
        tail = text.rsplit(sep, 1)[1]
        if dots + commas > 1 or len(tail) == 3:
            text = text.replace(sep, "")  # thousands: "1,299", "1.299.000"
        else:
            text = text.replace(",", ".")
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def currency_code(text: str | None) -> str | None:
    """"€", "euros", "євро", "EUR" -> "EUR"; an unknown currency keeps its upper case."""
    if not text:
        return None
    return _CURRENCY_OF.get(text.strip().casefold(), text.strip().upper())


# Persian letters Arabic spells otherwise (یورو = يورو).
_PERSIAN = str.maketrans({"\u06cc": "\u064a", "\u06a9": "\u0643"})


# O, o, l, I (Latin and Cyrillic) inside a run with at least one digit and no other letter.
_LOOKALIKE = str.maketrans("OoОоlIІ", "0000111")
_LOOKALIKE_RUN = re.compile(r"(?<![^\W\d_])[\dOoОоlIІ]*\d[\dOoОоlIІ]*(?![^\W\d_])")


def plain(text: str, *, fold: bool = False) -> str:
    """``text`` as the customer would see it and the checks read it: NFKC (fullwidth
    "２９" and "＠" become "29" and "@"), without control and format characters (NUL,
    zero-width spaces and joiners, bidi overrides, soft hyphens) or lone surrogates, which
    can hide a fact from a pattern or break a messenger. Newlines and tabs stay. ``fold``
    also spells Persian letters the Arabic way and reads letters standing in for digits
    in a run of digits as digits ("5O EUR", "+44 2O 7946 O958"), for matching only."""
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    if not fold:
        return text
    text = _LOOKALIKE_RUN.sub(lambda m: m.group().translate(_LOOKALIKE), text)
    return text.translate(_PERSIAN)


@dataclass(frozen=True, slots=True)
class _Found:
    kind: str
    text: str
    start: int
    value: Decimal | None = None
    currency: str | None = None
    cued: bool = False  # a code with a digit or after a code word: surely meant as one


def _mask(text: str, start: int, end: int) -> str:
    return text[:start] + "\x00" * (end - start) + text[end:]


def extract(text: str) -> list[_Found]:
    """Every fact-like span of ``text``, longest kinds first so a URL's digits are no phone
    and a price is no phone either."""
    text = plain(text, fold=True)
    found: list[_Found] = []
    for kind, pattern in (("email", _EMAIL), ("url", _URL)):
        for m in pattern.finditer(text):
            raw = m.group().rstrip(".,;:!?")
            found.append(_Found(kind, raw, m.start()))
            text = _mask(text, m.start(), m.start() + len(raw))
    for m in _MONEY.finditer(text):
        value = parse_number(m.group("n1") or m.group("n2"))
        found.append(_Found("money", m.group(), m.start(), value,
                            currency_code(m.group("pre") or m.group("post"))))
        text = _mask(text, m.start(), m.end())
    for m in _PERCENT.finditer(text):
        found.append(_Found("percent", m.group(), m.start(),
                            parse_number(m.group("n1") or m.group("n2"))))
        text = _mask(text, m.start(), m.end())
    for m in _AMOUNT_IN_WORDS.finditer(text):
        found.append(_Found("money" if m.group("cur") else "percent", m.group(), m.start()))
        text = _mask(text, m.start(), m.end())
    for pattern in (_PRICE_WORD, _PRICE_CUE):
        for m in pattern.finditer(text):
            found.append(_Found("money", m.group(), m.start(), parse_number(m.group("n"))))
            text = _mask(text, m.start("n"), m.end("n"))
    for m in _PHONE.finditer(text):
        if not _DATE.match(m.group()):
            found.append(_Found("phone", m.group(), m.start()))
            text = _mask(text, m.start(), m.end())
    tokens = list(_TOKEN.finditer(text))
    for index, m in enumerate(tokens):
        cued = _after_code_word(tokens, index) or (
            _code_like(m.group()) and any(c.isdigit() for c in m.group()))
        if cued or _code_like(m.group()):
            found.append(_Found("code", m.group(), m.start(), cued=cued))
    return sorted(found, key=lambda f: f.start)


def _code_like(token: str) -> bool:
    letters = [c for c in token if c.isalpha()]
    if not letters or len(token) < 4:
        return False
    if any(c.isdigit() for c in token):
        return not _UNIT.match(token)
    if len(letters) >= 4 and all(c.isupper() for c in letters):
        return True  # BEAUTYVIP, GIFTFORYOU
    return re.search(r"[a-zа-яіїєґ][A-ZА-ЯІЇЄҐ]", token) is not None  # GiftForYou


def _after_code_word(tokens: list[re.Match[str]], index: int) -> bool:
    """"use the code giftforyou": the token after a code word (skipping fillers)."""
    token = tokens[index].group()
    if len(token) < 3 or token.casefold() in _NOT_CODES | _CODE_FILLERS | _CODE_WORDS:
        return False
    back = index - 1
    while back >= 0 and tokens[back].group().casefold() in _CODE_FILLERS and \
            tokens[back].group().casefold() not in _CODE_WORDS:
        back -= 1
    return back >= 0 and index - back <= 3 and tokens[back].group().casefold() in _CODE_WORDS


def _stems(text: str) -> set[str]:
    """Content words, cut to five letters so inflected forms meet (доставка, доставки)."""
    return {w[:5] for w in re.findall(r"[^\W\d_]{3,}", text.casefold())
            if w not in _GENERIC and w not in _CURRENCY_OF}


def _norm_url(url: str) -> str:
    url = re.sub(r"^(?:https?://)?(?:www\.)?", "", url.casefold())
    return url.rstrip("/")


def _digits(text: str) -> str:
    return "".join(str(unicodedata.decimal(c, 0)) for c in text if c.isdigit())


def mentions(sentence: str, product: Source) -> bool:
    title = _stems(product.title)
    return bool(title) and title <= _stems(sentence)


class Facts:
    """The checkable facts of some sources."""

    def __init__(self, sources: Iterable[Source]) -> None:
        self.urls: set[str] = set()
        self.hosts: set[str] = set()
        self.emails: set[str] = set()
        self.phones: set[str] = set()
        self.codes: set[str] = set()
        for source in sources:
            for found in extract(f"{source.title}\n{source.text}\n{source.url or ''}"):
                if found.kind == "url":
                    self.urls.add(_norm_url(found.text))
                    self.hosts.add(_norm_url(found.text).split("/")[0])
                elif found.kind == "email":
                    self.emails.add(found.text.casefold())
                elif found.kind == "phone":
                    self.phones.add(_digits(found.text))
            self.codes |= {t.casefold() for t in _TOKEN.findall(
                f"{source.title}\n{source.text}")}

    def supports(self, found: _Found) -> bool:
        if found.kind == "url":
            url = _norm_url(found.text)
            return url in self.urls or url in self.hosts
        if found.kind == "email":
            return found.text.casefold() in self.emails
        if found.kind == "phone":
            return _digits(found.text) in self.phones
        return found.text.casefold() in self.codes


def _amounts(source: Source, kind: str) -> list[_Found]:
    return [f for f in extract(f"{source.title}\n{source.text}") if f.kind == kind]


def _same_amount(claim: _Found, value: Decimal | None, currency: str | None) -> bool:
    if claim.value is None or value is None or claim.value != value:
        return False
    return claim.currency is None or currency is None or currency_code(currency) == \
        claim.currency


def unsupported(answer: str, cited: Sequence[Source], catalog: Sequence[Source] = (), *,
                question: str = "", cited_by_model: bool = False) -> list[Claim]:
    """The facts of ``answer`` that neither a ``cited`` source nor a product it names
    (from ``catalog``) supports.

    A money amount must be the price of a product named in its own sentence ("It costs
    29 EUR." after naming the cream is refused: a price is bound to a name, never to a
    neighbour), or an amount of a cited FAQ entry the sentence is about: it shares a
    content word with the entry (or, when it names no product, so does the customer's
    ``question``), or the model cited that entry itself (``cited_by_model``: a translated
    answer shares no word with an English FAQ) and the sentence names no product. A
    percentage must be one of a cited entry's the same way. Codes, links, phones and
    emails must appear in a cited or named source.
    """
    answer = plain(answer, fold=True)
    products = [s for s in [*cited, *catalog] if s.product]
    faq = [(s, _stems(f"{s.title} {s.text}")) for s in cited if not s.product]
    named = [p for p in products if mentions(answer, p)]
    facts = Facts([*cited, *named])
    claims: list[Claim] = []
    for sentence in (s for s in _SENTENCE_END.split(answer) if s.strip()):
        here = [p for p in products if mentions(sentence, p)]
        words = _stems(sentence) if here else _stems(sentence) | _stems(question)
        about = [f for f, stems in faq if words & stems or (cited_by_model and not here)]
        for found in [*extract(sentence), *_after_titles(sentence, here)]:
            if found.kind in ("money", "percent"):
                ok = any(_same_amount(found, a.value, a.currency)
                         for f in about for a in _amounts(f, found.kind))
                if found.kind == "money":
                    ok = ok or any(_same_amount(found, _money(p.price), p.currency)
                                   for p in _nearest(sentence, here, found.start))
                else:  # "Retinol serum 0.5%": a percentage in a named product's own text
                    ok = ok or any(_same_amount(found, a.value, None)
                                   for p in here for a in _amounts(p, "percent"))
            else:
                ok = facts.supports(found)
            if not ok:
                claims.append(Claim(found.kind, found.text))
    return claims


def _after_titles(sentence: str, products: Sequence[Source]) -> list[_Found]:
    """"Rich moisturiser — 50", "Rich moisturiser: 50,00": a bare number right after a
    product's name is its price (an amount with a currency or a price word is already
    found by ``extract``)."""
    found = []
    text = plain(sentence, fold=True)
    for product in products:
        pattern = (rf"{re.escape(product.title)}[ \t]*[:=—–-][ \t]*(?P<n>{_NUM})"
                   rf"(?!\w|[.,'\u066b\u066c\u00a0 ]\d|[ \u00a0]?(?:{_CUR}|%|٪))")
        for m in re.finditer(pattern, text, re.IGNORECASE):
            found.append(_Found("money", m.group(), m.start("n"), parse_number(m.group("n"))))
    return found


def _title_words(sentence: str, product: Source) -> list[int]:
    """Where the words of ``product``'s name stand in ``sentence``."""
    title = _stems(product.title)
    return [m.start() for m in re.finditer(r"[^\W\d_]{3,}", sentence)
            if m.group().casefold()[:5] in title]


def _nearest(sentence: str, products: list[Source], at: int) -> list[Source]:
    """The products a price at ``at`` can belong to: the one named nearest before it (or,
    when none is, nearest after it). "The Rich moisturiser costs 29 EUR, the Vitamin C
    serum 29 EUR" gives the serum the cream's price: refused."""
    if len(products) < 2:
        return products
    text = plain(sentence, fold=True)
    before = {id(p): max((i for i in _title_words(text, p) if i < at), default=-1)
              for p in products}
    after = {id(p): min((i for i in _title_words(text, p) if i > at), default=len(text))
             for p in products}
    best = max(before.values())
    if best >= 0:
        return [p for p in products if before[id(p)] == best]
    first = min(after.values())
    return [p for p in products if after[id(p)] == first]


def _money(price: float | None) -> Decimal | None:
    return None if price is None else Decimal(str(round(price, 2)))
