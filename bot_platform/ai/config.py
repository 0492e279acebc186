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
    faq_dir: Path = Path("faq")
    min_confidence: float = Field(default=0.6, ge=0, le=1)
    on_low_confidence: Literal["escalate", "clarify"] = "clarify"
    brand: str = "Example Shop"
    # Customer text is cut to this before it reaches the model; a longer answer is refused.
    max_input_chars: int = Field(default=1000, ge=50)
    max_answer_chars: int = Field(default=700, ge=50)
