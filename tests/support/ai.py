"""What the AI tests share: settings for the fake model, the catalog and FAQ sources of
the grounding tests, and the property test's generator of true and invented facts."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from bot_platform.ai.config import AiSettings
from bot_platform.ai.grounding import Source
from tests.fakes.openai_api import FakeOpenAIServer
from tests.support.platform import ROOT


def settings_for(fake: FakeOpenAIServer, **overrides: Any) -> AiSettings:
    values: dict[str, Any] = {"enabled": True, "base_url": fake.url, "model": "fake-model",
                              "timeout": 2.0, "faq_dir": ROOT / "faq", **overrides}
    return AiSettings(**values)


RICH = Source("Rich moisturiser", "Price: 29.00 EUR. dry skin", 29.0, "EUR",
              "https://shop.example.com/rich", product=True)
SERUM = Source("Vitamin C serum", "Price: 34.50 EUR. glow", 34.5, "EUR",
               "https://shop.example.com/serum", product=True)
BALM = Source("Lip balm", "Price: 1299.00 UAH", 1299.0, "UAH", "https://shop.example.com/balm",
              product=True)
CLAY = Source("Clay mask", "Price: 45.00 PLN", 45.0, "PLN", "https://shop.example.com/clay",
              product=True)
CATALOG = [RICH, SERUM, BALM, CLAY]
DELIVERY = Source("How much does delivery cost?",
                  "Delivery is free for orders over 50 EUR; otherwise it costs 4.90 EUR.")
RETURNS = Source("Can I return a product?",
                 "Yes, within 30 days; write to support@example.com with your order number.")


PROMO = Source("New customers", "New customers / Нові клієнти / Nowi klienci / العملاء الجدد: "
               "10% off with code WELCOME10, see https://shop.example.com/promo, call "
               "+44 20 7946 0000 or write to hello@example.com.")
SHIPPING = Source("Delivery", "Delivery / Доставка / Dostawa / التوصيل: free over 50 EUR, "
                  "otherwise 4.90 EUR.")
SOURCES = [PROMO, SHIPPING, *CATALOG]
LANGS = ["en", "uk", "pl", "ar"]
WORDS = {"EUR": {"en": "euros", "uk": "євро", "pl": "euro", "ar": "يورو"},
         "UAH": {"en": "hryvnias", "uk": "гривень", "pl": "hrywien", "ar": "هريفنيا"},
         "PLN": {"en": "zlotys", "uk": "злотих", "pl": "złotych", "ar": "زلوتي"},
         "USD": {"en": "dollars", "uk": "доларів", "pl": "dolarów", "ar": "دولار"}}
SYMBOLS = {"EUR": "€", "UAH": "₴", "PLN": "zł", "USD": "$"}
PRICE_SAID = {"en": "{name} costs {x}.", "uk": "{name} коштує {x}.", "pl": "{name} kosztuje {x}.",
              "ar": "سعر {name} هو {x}."}
DELIVERY_SAID = {"en": "Delivery costs {x}.", "uk": "Доставка коштує {x}.",
                 "pl": "Dostawa kosztuje {x}.", "ar": "التوصيل يكلف {x}."}
PERCENT_SAID = {"en": "New customers get {x} off.", "uk": "Нові клієнти отримують {x} знижки.",
                "pl": "Nowi klienci dostają {x} zniżki.", "ar": "العملاء الجدد يحصلون على خصم {x}."}
CODE_SAID = {"en": "Use code {x} at checkout.", "uk": "Використайте код {x}.",
             "pl": "Użyj kodu {x}.", "ar": "استخدم الكود {x}."}
CONTACT_SAID = {"en": "More: {x}.", "uk": "Детальніше: {x}.", "pl": "Więcej: {x}.",
                "ar": "المزيد: {x}."}
PERCENT_WORDS = {"en": " percent", "uk": " відсотків", "pl": " procent", "ar": " بالمئة"}
ARABIC_DIGITS = str.maketrans("0123456789.", "٠١٢٣٤٥٦٧٨٩٫")


@st.composite
def amount(draw: Any, value: Decimal, currency: str, lang: str) -> str:
    """``value`` in ``currency`` as people write it: symbol, code or word, before or
    after, "29" "29.00" "29,00" or Arabic-Indic digits."""
    style = draw(st.sampled_from(["plain", "dot", "comma"]))
    if style == "plain" and value != value.to_integral_value():
        style = "dot"
    number = {"plain": f"{value:.0f}", "dot": f"{value:.2f}",
              "comma": f"{value:.2f}".replace(".", ",")}[style]
    if lang == "ar" and style != "comma" and draw(st.booleans()):
        number = number.translate(ARABIC_DIGITS)
    unit = draw(st.sampled_from([SYMBOLS[currency], currency, WORDS[currency][lang]]))
    if draw(st.booleans()):
        return f"{unit}{'' if unit in SYMBOLS.values() else ' '}{number}"
    return f"{number} {unit}"


KNOWN_TOKENS = {t.casefold() for s in SOURCES for t in re.findall(r"\w+", f"{s.title} {s.text}")}


@st.composite
def fact(draw: Any) -> tuple[str, bool]:
    """One sentence and whether it is true."""
    lang = draw(st.sampled_from(LANGS))
    true = draw(st.booleans())
    kind = draw(st.sampled_from(["price", "delivery", "percent", "code", "url", "phone",
                                 "email"]))
    said = {"price": PRICE_SAID, "delivery": DELIVERY_SAID, "percent": PERCENT_SAID,
            "code": CODE_SAID}.get(kind, CONTACT_SAID)[lang]
    if kind == "price":
        product = draw(st.sampled_from(CATALOG))
        price, currency = Decimal(str(product.price)), str(product.currency)
        name = product.title if true or draw(st.booleans()) else "Golden elixir"
        if not true and name == product.title:
            price, currency = draw(st.one_of(
                st.tuples(st.sampled_from([Decimal(50), Decimal("4.9"), Decimal("34.5"),
                                           Decimal(29), price * 10]), st.just(currency)),
                st.tuples(st.integers(1, 2000).map(Decimal), st.just(currency)),
                st.tuples(st.just(price), st.sampled_from(sorted(set(SYMBOLS) - {currency})))))
            if price == Decimal(str(product.price)) and currency == product.currency:
                price += 1
        text = said.format(name=name, x=draw(amount(price, currency, lang)))
    elif kind == "delivery":
        value = draw(st.sampled_from([Decimal("4.9"), Decimal(50)])) if true else draw(
            st.integers(1, 999).map(Decimal).filter(lambda v: v not in (4.9, 50)))
        text = said.format(x=draw(amount(value, "EUR", lang)))
    elif kind == "percent":
        value = 10 if true else draw(st.integers(1, 100).filter(lambda v: v != 10))
        number = str(value).translate(ARABIC_DIGITS) if lang == "ar" else str(value)
        sign = draw(st.sampled_from(["%", PERCENT_WORDS[lang]] + (["٪"] if lang == "ar" else [])))
        text = said.format(x=f"{number}{sign}")
    elif kind == "code":
        code = draw(st.sampled_from(["WELCOME10", "welcome10", "Welcome10"])) if true else draw(
            st.from_regex(r"[A-Z]{4,10}|[a-z]{3,8}[0-9]{1,3}|[A-Z][a-z]{2,5}[A-Z][a-z]{2,5}"
                          r"|[a-z]{6,10}", fullmatch=True).filter(
                lambda c: c.casefold() not in KNOWN_TOKENS))
        text = said.format(x=code)
    elif kind == "url":
        url = draw(st.sampled_from(["https://shop.example.com/promo", "shop.example.com/promo",
                                    "https://shop.example.com/rich"])) if true else draw(
            st.from_regex(r"(https://)?[a-z]{3,10}\.(com|net|example)(/[a-z]{1,8})?",
                          fullmatch=True).filter(lambda u: "shop.example.com" not in u))
        text = said.format(x=url)
    elif kind == "phone":
        phone = "+44 20 7946 0000" if true else draw(st.from_regex(
            r"\+[1-9][0-9] [0-9]{2,3} [0-9]{3,4} [0-9]{4}", fullmatch=True).filter(
            lambda p: p != "+44 20 7946 0000"))
        text = said.format(x=phone)
    else:
        email = "hello@example.com" if true else draw(st.from_regex(
            r"[a-z]{2,8}@[a-z]{3,8}\.(com|example)", fullmatch=True).filter(
            lambda e: e != "hello@example.com"))
        text = said.format(x=email)
    return text, true
