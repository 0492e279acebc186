"""AI settings (nested in the platform settings as ``ai``: ``BOTP_AI__ENABLED`` ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr


class AiSettings(BaseModel):
    enabled: bool = False
    base_url: str = "http://127.0.0.1:11434/v1"  # Ollama's OpenAI-compatible endpoint
    model: str = "llama3.1"
    api_key: SecretStr = SecretStr("not-needed")
    timeout: float = Field(default=8.0, gt=0)  # seconds for the whole answer
    max_tokens: int = Field(default=300, ge=16)
    monthly_token_budget: int = Field(default=0, ge=0)  # per bot; 0 = unlimited
    # A call reserves its prompt's UTF-8 bytes / this + max_tokens before it is made. 1.0
    # is a true upper bound for byte-level tokenizers (a token is at least one byte); a
    # higher value reserves less but may let the last calls of a month overshoot.
    prompt_bytes_per_token: float = Field(default=1.0, gt=0)
    # Questions one subscriber may put to the model per hour; beyond that the usual
    # fallback answers without a call. 0 = unlimited.
    answers_per_hour: int = Field(default=30, ge=0)
    # How often (seconds) a process looks for catalog and FAQ changes before a search.
    knowledge_refresh_seconds: float = Field(default=2.0, ge=0)
    # Emails, phone numbers, card numbers and IBANs become <email>, <phone>, <card>,
    # <iban> in what goes to the model, in the stored job and in an escalation's data.
    mask_personal_data: bool = True
    faq_dir: Path = Path("faq")
    min_confidence: float = Field(default=0.6, ge=0, le=1)
    on_low_confidence: Literal["escalate", "clarify"] = "clarify"
    brand: str = "Example Shop"
    # Customer text is cut to this before it reaches the model; a longer answer is refused.
    max_input_chars: int = Field(default=1000, ge=50)
    max_answer_chars: int = Field(default=700, ge=50)
