"""The assistant: one chat-completions call per unexpected message, with a strict system
prompt and a JSON answer contract, then checks that keep it honest.

It never raises: timeouts, connection errors, refusals, bad JSON, low confidence and an
exhausted budget all become a ``Decision`` the engine knows how to act on. An answer that
mentions a price or a promo code absent from the retrieved context is rejected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import openai

from bot_platform.ai.budget import MemoryTokenBudget, TokenBudget, reservation
from bot_platform.ai.config import AiSettings
from bot_platform.ai.knowledge import Knowledge, Passage

log = logging.getLogger(__name__)

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_PHONE = re.compile(r"\+?\d[\d\s().-]{6,}\d")
_CARD = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")
_IBAN = re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}")
PHONE_DIGITS = 9  # fewer digits are a date, a price or a quantity, not a phone number
_PRICE = re.compile(
    r"(?:[$€£₴]\s?\d+(?:[.,]\d+)?|\d+(?:[.,]\d+)?\s?(?:[$€£₴]|usd|eur|uah|pln|gbp|грн|zł|zl)\b)",
    re.IGNORECASE)
_CODE = re.compile(r"\b(?=[A-Z0-9-]*\d)(?=[A-Z0-9-]*[A-Z])[A-Z0-9][A-Z0-9-]{3,}\b")


def mask_pii(text: str) -> str:
    """Emails, IBANs, card numbers (also spaced or dashed) and phone numbers become
    placeholders: for logs, for what goes to the model and for what is stored with an AI
    job. A card number passes the Luhn check and an IBAN its mod-97 check; any other run
    of 9 or more digits is masked as a phone number."""
    text = _EMAIL.sub("<email>", text)
    text = _IBAN.sub(_mask_iban, text)
    text = _CARD.sub(lambda m: "<card>" if _luhn(m.group()) else m.group(), text)
    return _PHONE.sub(lambda m: "<phone>" if len(_digits(m.group())) >= PHONE_DIGITS
                      else m.group(), text)


def _luhn(number: str) -> bool:
    digits = [int(d) for d in _digits(number)][::-1]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
                for i, d in enumerate(digits))
    return total % 10 == 0


def _mask_iban(match: re.Match[str]) -> str:
    """The longest prefix of the match that is a valid IBAN (the pattern may run on into
    the next word), masked; the rest as it was."""
    raw = match.group()
    positions = [i for i, char in enumerate(raw) if char.isalnum()]
    for count in range(len(positions), 14, -1):
        compact = "".join(raw[i] for i in positions[:count]).upper()
        moved = compact[4:] + compact[:4]
        if compact.isascii() and int("".join(str(int(c, 36)) for c in moved)) % 97 == 1:
            return "<iban>" + raw[positions[count - 1] + 1:]
    return raw


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def unsupported_claims(answer: str, context: str) -> list[str]:
    """Prices and promo codes in ``answer`` that the context does not contain."""
    context_digits = {_digits(m) for m in _PRICE.findall(context)} | set(
        re.findall(r"\d+(?:[.,]\d+)?", context))
    context_numbers = {_digits(n) for n in context_digits}
    claims = [p for p in _PRICE.findall(answer) if _digits(p) not in context_numbers]
    claims += [c for c in _CODE.findall(answer) if c not in context]
    return claims


Kind = Literal["answer", "route", "escalate", "fallback"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a customer's unexpected message."""

    kind: Kind
    text: str | None = None  # the answer, for kind answer
    flow: str | None = None  # the flow to start, for kind route
    reason: str | None = None  # why (fallback / escalate)
    tokens_used: int = 0


def make_client(settings: AiSettings) -> openai.AsyncOpenAI:
    """The OpenAI client for any compatible server; no retries (we fall back instead)."""
    return openai.AsyncOpenAI(base_url=settings.base_url,
                              api_key=settings.api_key.get_secret_value(),
                              timeout=settings.timeout, max_retries=0)


SYSTEM_PROMPT = """You are the customer assistant of {brand}, chatting in a messenger.
Rules:
- Answer ONLY with facts from CONTEXT.
- If CONTEXT does not answer the question, use action "unknown".
- Reply in the language with code "{locale}", in at most 3 short sentences.
- Never mention a price, a discount or a promo code that is not written in CONTEXT.
- If the customer wants one of these INTENTS, use action "route" with its name:
{intents}
- If the customer asks for a person, a human, an operator or an agent, use action "escalate".
Reply with one JSON object only:
{{"action": "answer" | "route" | "escalate" | "unknown",
  "text": "...", "intent": "...", "confidence": 0.0-1.0}}

CONTEXT:
{context}"""


class Assistant:
    """Decides what to do with free text nobody expected."""

    def __init__(self, settings: AiSettings, client: openai.AsyncOpenAI, knowledge: Knowledge,
                 budget: TokenBudget | None = None) -> None:
        self.settings = settings
        self.client = client
        self.knowledge = knowledge
        self.budget = budget or MemoryTokenBudget()

    async def decide(self, text: str, *, locale: str, intents: Mapping[str, str],
                     bot_id: str, now: datetime | None = None) -> Decision:
        month = (now or datetime.now()).strftime("%Y-%m")
        passages = self.knowledge.search(text, locale)
        context = "\n\n".join(f"[{p.source}] {p.title}\n{p.text}" for p in passages) or "-"
        prompt = SYSTEM_PROMPT.format(
            brand=self.settings.brand, locale=locale, context=context,
            intents="\n".join(f"  {name}: {about}" for name, about in intents.items())
            or "  (none)")
        question = mask_pii(text) if self.settings.mask_personal_data else text
        messages = [{"role": "system", "content": prompt}, {"role": "user", "content": question}]
        # Reserve the call's maximum first: concurrent calls cannot all pass one check.
        reserved = reservation(messages, self.settings.max_tokens,
                               self.settings.prompt_bytes_per_token)
        if not await self.budget.reserve(bot_id, month, reserved,
                                         self.settings.monthly_token_budget):
            log.info("ai %s: monthly token budget spent; no call made", bot_id)
            return Decision("fallback", reason="budget_exhausted")
        log.info("ai %s: asking about %r (%d passages)", bot_id, mask_pii(text), len(passages))
        charged = reserved  # a timeout or a cancel may still be billed: count the maximum
        try:
            async with asyncio.timeout(self.settings.timeout):
                response = await self.client.chat.completions.create(
                    model=self.settings.model, max_tokens=self.settings.max_tokens,
                    temperature=0, response_format={"type": "json_object"},
                    messages=messages)  # type: ignore[arg-type]
            used = response.usage.total_tokens if response.usage else 0
            charged = used or reserved
        except TimeoutError:
            return Decision("fallback", reason="timeout")
        except openai.APITimeoutError:
            return Decision("fallback", reason="timeout")
        except openai.APIError as error:
            charged = 0  # refused or unreachable: nothing was generated
            log.warning("ai %s: model call failed: %s", bot_id, type(error).__name__)
            return Decision("fallback", reason=f"error:{type(error).__name__}")
        finally:
            if charged > reserved:
                log.warning("ai %s: a call used %d tokens, %d were reserved", bot_id,
                            charged, reserved)
            await self.budget.settle(bot_id, month, reserved, charged)
        content = (response.choices[0].message.content or "") if response.choices else ""
        decision = self._interpret(content, intents, passages)
        log.info("ai %s: %s %s", bot_id, decision.kind,
                 mask_pii(decision.text or decision.flow or decision.reason or ""))
        return Decision(decision.kind, decision.text, decision.flow, decision.reason, used)

    def _interpret(self, content: str, intents: Mapping[str, str],
                   passages: list[Passage]) -> Decision:
        try:
            data = json.loads(content)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            return Decision("fallback", reason="bad_json")
        action = data.get("action")
        try:
            confidence = float(data.get("confidence", 1.0))
        except (TypeError, ValueError):
            confidence = 0.0
        if action == "escalate":
            return Decision("escalate", reason="asked_for_human")
        if action == "route":
            intent = data.get("intent")
            if intent in intents and confidence >= self.settings.min_confidence:
                return Decision("route", flow=str(intent))
            return self._unsure()
        if action == "answer":
            answer = str(data.get("text") or "").strip()
            if not answer:
                return Decision("fallback", reason="empty_answer")
            if confidence < self.settings.min_confidence:
                return self._unsure()
            context = "\n".join(f"{p.title}\n{p.text}" for p in passages)
            if claims := unsupported_claims(answer, context):
                log.warning("ai: answer rejected, unsupported %s", claims)
                return Decision("fallback", reason="unsupported_claim")
            return Decision("answer", text=answer)
        return Decision("fallback", reason="unknown")

    def _unsure(self) -> Decision:
        if self.settings.on_low_confidence == "escalate":
            return Decision("escalate", reason="low_confidence")
        return Decision("fallback", reason="low_confidence")
