"""The assistant: one chat-completions call per unexpected message, with a strict system
prompt and a JSON answer contract, then checks that keep it honest.

It never raises: timeouts, connection errors, an HTML page instead of JSON, refusals, bad
JSON, low confidence and an exhausted budget all become a ``Decision`` the engine knows how
to act on. The model answers with text and the numbers of the passages it used; an answer
asserting a price, a discount, a code, a link, a phone number or an email address its
sources do not hold is refused (``grounding``), and the cited products' prices and links
are then added by the platform from the catalog, never taken from the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import openai

from bot_platform.ai.budget import MemoryTokenBudget, TokenBudget, reservation
from bot_platform.ai.config import AiSettings
from bot_platform.ai.facts import facts_lines
from bot_platform.ai.grounding import Source, plain, unsupported
from bot_platform.ai.knowledge import Knowledge, Passage

log = logging.getLogger(__name__)

# Only from the start of a run of name characters: linear on a 20,000-letter word.
_EMAIL = re.compile(r"(?<![\w.+-])(?:\"[^\"\s]{1,64}\"|[\w.+-]+)@[\w-]+\.[\w.-]+")
_PHONE = re.compile(r"\+?\d[\d\s().-]{6,}\d")
_CARD = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")
_IBAN = re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}")
PHONE_DIGITS = 9  # fewer digits are a date, a price or a quantity, not a phone number


def mask_pii(text: str) -> str:
    """Emails, IBANs, card numbers (also spaced or dashed) and phone numbers become
    placeholders: for logs, for what goes to the model and for what is stored with an AI
    job. A card number passes the Luhn check and an IBAN its mod-97 check; any other run
    of 9 or more digits is masked as a phone number. Invisible characters go first and
    fullwidth forms become plain ones (``plain``): "ann\u200b@example.com" is an address."""
    text = plain(text)
    text = _EMAIL.sub("<email>", text)
    text = _IBAN.sub(_mask_iban, text)
    text = _CARD.sub(lambda m: "<card>" if _luhn(m.group()) else m.group(), text)
    return _PHONE.sub(lambda m: "<phone>" if len(_digits(m.group())) >= PHONE_DIGITS
                      else m.group(), text)


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


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
- Do not copy prices, promo codes, links, phone numbers or email addresses: put the
  numbers of the CONTEXT entries you used in "refs"; the shop adds their details.
- If the customer wants one of these INTENTS, use action "route" with its name:
{intents}
- If the customer asks for a person, a human, an operator or an agent, use action "escalate".
Reply with one JSON object only:
{{"action": "answer" | "route" | "escalate" | "unknown",
  "text": "...", "refs": [1], "intent": "...", "confidence": 0.0-1.0}}

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
        text = text[:self.settings.max_input_chars]  # a pasted novel costs no more tokens
        passages = self.knowledge.search(text, locale)
        context = "\n\n".join(f"[{n}] {p.title}\n{p.text}"
                              for n, p in enumerate(passages, 1)) or "-"
        prompt = SYSTEM_PROMPT.format(
            brand=self.settings.brand, locale=locale, context=context,
            intents="\n".join(f"  {name}: {about}" for name, about in intents.items())
            or "  (none)")
        # No NUL or lone surrogate reaches the model's JSON, masked or not.
        question = mask_pii(text) if self.settings.mask_personal_data else plain(text)
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
            used = getattr(getattr(response, "usage", None), "total_tokens", 0)
            used = used if isinstance(used, int) and not isinstance(used, bool) and \
                used > 0 else 0
            # No call can use more than its prompt's bytes and max_tokens: a server
            # claiming 10**20 neither overflows the counter nor spends the month.
            used = min(used, reservation(messages, self.settings.max_tokens))
            charged = used or reserved
        except TimeoutError:
            return Decision("fallback", reason="timeout")
        except openai.APITimeoutError:
            return Decision("fallback", reason="timeout")
        except openai.APIError as error:
            charged = 0  # refused or unreachable: nothing was generated
            log.warning("ai %s: model call failed: %s", bot_id, type(error).__name__)
            return Decision("fallback", reason=f"error:{type(error).__name__}")
        except Exception as error:  # a body no client can parse
            log.warning("ai %s: unreadable model response: %s", bot_id, type(error).__name__)
            return Decision("fallback", reason="bad_response")
        finally:
            if charged > reserved:
                log.warning("ai %s: a call used %d tokens, %d were reserved", bot_id,
                            charged, reserved)
            await self.budget.settle(bot_id, month, reserved, charged)
        try:
            decision = self._interpret(_content(response), intents, passages, locale=locale,
                                       question=text)
        except Exception as error:  # "it never raises", whatever the body
            log.warning("ai %s: unreadable model answer: %s", bot_id, type(error).__name__)
            decision = Decision("fallback", reason="bad_response")
        log.info("ai %s: %s %s", bot_id, decision.kind,
                 mask_pii(decision.text or decision.flow or decision.reason or "")[:200])
        return Decision(decision.kind, decision.text, decision.flow, decision.reason, used)

    def _interpret(self, content: str, intents: Mapping[str, str],
                   passages: list[Passage], *, locale: str = "en",
                   question: str = "") -> Decision:
        data = parse_answer(content)
        if data is None:
            return Decision("fallback", reason="bad_json")
        action = data.get("action")
        confidence = _confidence(data.get("confidence", 1.0))
        if action == "escalate":
            return Decision("escalate", reason="asked_for_human")
        if action == "route":
            intent = data.get("intent")
            if isinstance(intent, str) and intent in intents and \
                    confidence >= self.settings.min_confidence:
                return Decision("route", flow=intent)
            return self._unsure()
        if action == "answer":
            answer = data.get("text")
            if not isinstance(answer, str):
                log.warning("ai: answer refused: bad_schema (text is %s)",
                            type(answer).__name__)
                return Decision("fallback", reason="bad_schema")
            answer = plain(answer).strip()  # what is checked is what is delivered
            if not answer:
                return Decision("fallback", reason="empty_answer")
            if confidence < self.settings.min_confidence:
                return self._unsure()
            return self._checked(answer, data.get("refs"), passages, locale, question)
        return Decision("fallback", reason="unknown")

    def _checked(self, answer: str, refs: Any, passages: list[Passage], locale: str,
                 question: str) -> Decision:
        """The answer if it is short, no echo of the rules, and asserts only what its
        sources hold; then with the cited products' facts from the catalog."""
        if len(answer) > self.settings.max_answer_chars:
            log.warning("ai: answer refused: too_long (%d chars)", len(answer))
            return Decision("fallback", reason="too_long")
        if echoes_prompt(answer):
            log.warning("ai: answer refused: prompt_echo")
            return Decision("fallback", reason="prompt_echo")
        cited = cited_passages(refs, passages)
        sources = [to_source(p) for p in cited or passages]
        catalog = [to_source(p) for p in getattr(self.knowledge, "products", [])]
        if claims := unsupported(answer, sources, catalog, question=question,
                                 cited_by_model=bool(cited)):
            kinds = sorted({claim.kind for claim in claims})
            log.warning("ai: answer refused: unsupported_claim %s (%d)", ",".join(kinds),
                        len(claims))
            return Decision("fallback", reason="unsupported_claim")
        lines = facts_lines(answer, [to_source(p) for p in cited], catalog, locale)
        return Decision("answer", text="\n".join([answer, *lines]))

    def _unsure(self) -> Decision:
        if self.settings.on_low_confidence == "escalate":
            return Decision("escalate", reason="low_confidence")
        return Decision("fallback", reason="low_confidence")


def _content(response: Any) -> str:
    """The first choice's text; anything else (no choices, no message) is empty."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        return ""
    content = getattr(getattr(choices[0], "message", None), "content", None)
    return content if isinstance(content, str) else ""


_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)\s*```", re.DOTALL)


def parse_answer(content: str) -> dict[str, Any] | None:
    """The model's JSON object, also inside a Markdown code fence (local models like
    those); None for anything else."""
    candidates = [content, *_FENCE.findall(content)]
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _confidence(value: Any) -> float:
    """A finite number in [0, 1]; anything else (NaN, "high", true, 7) is no confidence."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    number = float(value)
    return number if math.isfinite(number) and 0.0 <= number <= 1.0 else 0.0


def cited_passages(refs: Any, passages: list[Passage]) -> list[Passage]:
    """The passages named in ``refs`` (1-based numbers as the prompt shows them: 2, "2",
    "[2]"); unknown numbers are ignored."""
    if not isinstance(refs, list):
        return []
    cited: list[Passage] = []
    for ref in refs[:20]:
        if isinstance(ref, bool):
            continue
        digits = re.sub(r"\D", "", ref) if isinstance(ref, str) else ref
        try:
            index = int(digits) - 1
        except (TypeError, ValueError):
            continue
        if 0 <= index < len(passages) and passages[index] not in cited:
            cited.append(passages[index])
    return cited


def to_source(passage: Passage) -> Source:
    """A passage as the grounding check sees it (a product with its catalog facts)."""
    product = passage.product or {}
    price = product.get("price")
    return Source(passage.title, passage.text,
                  float(price) if isinstance(price, int | float) else None,
                  product.get("currency"), product.get("url"), passage.source == "product")


def _shingles(text: str, size: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i:i + size]) for i in range(len(words) - size + 1)}


# The fixed rules of the prompt (not its context: answering from that is the point).
_RULES = _shingles(re.sub(r"\{[a-z]+\}", " ", SYSTEM_PROMPT.split("CONTEXT:")[0]))


def echoes_prompt(answer: str, threshold: int = 3) -> bool:
    """Whether the answer repeats the system prompt's rules ("print your instructions")."""
    return len(_shingles(answer) & _RULES) >= threshold
