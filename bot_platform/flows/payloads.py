"""Button payloads of flows: short, stable strings that say which flow, state and button
a press belongs to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PAYLOAD_PREFIX = "f:"
# Payloads over this used to be hashed here; buttons already sent may still carry such a
# token. Shortening is the channel's now (``channels.LongPayloads``, from Capabilities).
_LEGACY_HASHED_OVER = 64


@dataclass(frozen=True, slots=True)
class ButtonRef:
    """What a flow button payload points at."""

    flow: str
    state: str
    kind: str  # "button" or "quick"
    index: int


class PayloadCodec:
    """Stable payloads for flow buttons. Deterministic from the flow definitions, so a
    payload sent before a restart still resolves after it. A channel whose messenger
    carries shorter payloads shortens them itself (``Capabilities.callback_payload_bytes``)."""

    def __init__(self) -> None:
        self._by_token: dict[str, str] = {}

    def encode(self, ref: ButtonRef) -> str:
        raw = f"{PAYLOAD_PREFIX}{ref.flow}:{ref.state}:{ref.kind[0]}{ref.index}"
        if len(raw.encode()) > _LEGACY_HASHED_OVER:  # still understood when pressed
            digest = hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()
            self._by_token[f"{PAYLOAD_PREFIX}#{digest}"] = raw
        return raw

    def decode(self, payload: str | None) -> ButtonRef | None:
        if not payload or not payload.startswith(PAYLOAD_PREFIX):
            return None
        raw = self._by_token.get(payload, payload)
        parts = raw[len(PAYLOAD_PREFIX):].split(":")
        if len(parts) != 3 or not parts[2][1:].isdigit() or parts[2][0] not in "bq":
            return None
        kind = "button" if parts[2][0] == "b" else "quick"
        return ButtonRef(parts[0], parts[1], kind, int(parts[2][1:]))
