"""Button payloads of flows: short, stable strings that say which flow, state and button
a press belongs to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PAYLOAD_PREFIX = "f:"
_PAYLOAD_LIMIT = 64  # Telegram's callback_data limit, the tightest of our messengers


@dataclass(frozen=True, slots=True)
class ButtonRef:
    """What a flow button payload points at."""

    flow: str
    state: str
    kind: str  # "button" or "quick"
    index: int


class PayloadCodec:
    """Short, stable payloads for flow buttons. Deterministic from the flow definitions, so
    a payload sent before a restart still resolves after it; long ones become hashes."""

    def __init__(self) -> None:
        self._by_token: dict[str, str] = {}

    def encode(self, ref: ButtonRef) -> str:
        raw = f"{PAYLOAD_PREFIX}{ref.flow}:{ref.state}:{ref.kind[0]}{ref.index}"
        if len(raw.encode()) <= _PAYLOAD_LIMIT:
            return raw
        token = f"{PAYLOAD_PREFIX}#{hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()}"
        self._by_token[token] = raw
        return token

    def decode(self, payload: str | None) -> ButtonRef | None:
        if not payload or not payload.startswith(PAYLOAD_PREFIX):
            return None
        raw = self._by_token.get(payload, payload)
        parts = raw[len(PAYLOAD_PREFIX):].split(":")
        if len(parts) != 3 or not parts[2][1:].isdigit() or parts[2][0] not in "bq":
            return None
        kind = "button" if parts[2][0] == "b" else "quick"
        return ButtonRef(parts[0], parts[1], kind, int(parts[2][1:]))
