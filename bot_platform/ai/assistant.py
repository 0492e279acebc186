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
from typing import Any, Literal, Protocol

import openai

from bot_platform.ai.config import AiSettings
from bot_platform.ai.grounding import Source, facts_lines, unsupported
from bot_platform.ai.knowledge import Knowledge, Passage

log = logging.getLogger(__name__)

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_PHONE = re.compile(r"\+?\d[\d\s().-]{6,}\d")


def mask_pii(text: str) -> str:
    """Logs never carry emails or phone numbers."""
    return _PHONE.sub("<phone>", _EMAIL.sub("<email>", text))


Kind = Literal["answer", "route", "escalate", "fallback"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a customer's unexpected message."""

    kind: Kind
    text: str | None = None  # the answer, for kind answer
    flow: str | None = None  # the flow to start, for kind route
    reason: str | None = None  # why (fallback / escalate)
    tokens_used: int = 0


class TokenBudget(Protocol):
    """Tokens spent per bot and month."""

    async def spent(self, bot_id: str, month: str) -> int: ...

    async def add(self, bot_id: str, month: str, tokens: int) -> None: ...


class MemoryTokenBudget:
    def __init__(self) -> None:
        self.used: dict[tuple[str, str], int] = {}

    async def spent(self, bot_id: str, month: str) -> int:
        return self.used.get((bot_id, month), 0)

    async def add(self, bot_id: str, month: str, tokens: int) -> None:
        self.used[(bot_id, month)] = self.used.get((bot_id, month), 0) + tokens


class KvTokenBudget:
    """The budget in the platform's key-value table, shared by every process."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def spent(self, bot_id: str, month: str) -> int:
        return int(await self.kv.get(f"ai:tokens:{bot_id}:{month}") or 0)

    async def add(self, bot_id: str, month: str, tokens: int) -> None:
        key = f"ai:tokens:{bot_id}:{month}"
        await self.kv.set(key, str(int(await self.kv.get(key) or 0) + tokens))


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
        limit = self.settings.monthly_token_budget
        if limit and await self.budget.spent(bot_id, month) >= limit:
            log.info("ai %s: monthly token budget spent; no call made", bot_id)
            return Decision("fallback", reason="budget_exhausted")
        text = text[:self.settings.max_input_chars]  # a pasted novel costs no more tokens
        passages = self.knowledge.search(text, locale)
        context = "\n\n".join(f"[{n}] {p.title}\n{p.text}"
                              for n, p in enumerate(passages, 1)) or "-"
        prompt = SYSTEM_PROMPT.format(
            brand=self.settings.brand, locale=locale, context=context,
            intents="\n".join(f"  {name}: {about}" for name, about in intents.items())
            or "  (none)")
        log.info("ai %s: asking about %r (%d passages)", bot_id, mask_pii(text), len(passages))
        try:
            async with asyncio.timeout(self.settings.timeout):
                response = await self.client.chat.completions.create(
                    model=self.settings.model, max_tokens=self.settings.max_tokens,
                    temperature=0, response_format={"type": "json_object"},
                    messages=[{"role": "system", "content": prompt},
                              {"role": "user", "content": text}])
        except TimeoutError:
            return Decision("fallback", reason="timeout")
        except openai.APITimeoutError:
            return Decision("fallback", reason="timeout")
        except openai.APIError as error:
            log.warning("ai %s: model call failed: %s", bot_id, type(error).__name__)
            return Decision("fallback", reason=f"error:{type(error).__name__}")
        except Exception as error:  # a body no client can parse
            log.warning("ai %s: unreadable model response: %s", bot_id, type(error).__name__)
            return Decision("fallback", reason="bad_response")
        usage = getattr(response, "usage", None)
        used = getattr(usage, "total_tokens", 0)
        used = used if isinstance(used, int) and used > 0 else 0
        if used:
            await self.budget.add(bot_id, month, used)
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
            answer = answer.strip()
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
