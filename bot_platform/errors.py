"""Every error the platform raises on purpose, in one tree.

    PlatformError
    ├── ConfigError               settings or bot configuration that cannot work
    ├── ChannelError              something at a messenger edge
    │   ├── BadToken              the messenger refused the bot's token (401/403, code 190)
    │   ├── BadSignature          forged, missing or wrong webhook signature/secret -> 401/403
    │   ├── BadPayload            a body that is not what the messenger sends -> 400
    │   └── UnknownBot            a webhook for a bot not configured (or closed) -> 404
    ├── FlowError                 something about flows
    │   ├── FlowValidationError   a flow file that cannot run; carries every ``FlowIssue``
    │   └── UnknownState          a stored state that the current flow no longer has
    └── StorageError              the database said no in a way we can explain
        └── StorageUnavailable    the database cannot be reached for now -> 503

``http_status_for`` is the one place that turns these into HTTP statuses.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlatformError(Exception):
    """Base of every error the platform raises on purpose."""


class ConfigError(PlatformError):
    """Settings or bot configuration that cannot work."""


class ChannelError(PlatformError):
    """Something went wrong at a messenger edge (inbound or outbound)."""


class BadToken(ChannelError):
    """The messenger refused the bot's token: nothing works until it is replaced. The
    message names the bot, never the token."""


class BadSignature(ChannelError):
    """The webhook's signature or secret is missing or wrong: the body is not processed."""

    status_code = 401


class BadPayload(ChannelError):
    """The webhook body is not valid JSON or not the shape the messenger sends."""


class UnknownBot(ChannelError):
    """A webhook arrived for a channel/bot pair that is not configured, or whose webhook
    is closed (the console without a secret)."""


class FlowError(PlatformError):
    """Something about a flow definition or a flow's runtime state."""


@dataclass(frozen=True, slots=True)
class FlowIssue:
    """One problem found in a flow file: where it is and why it is a problem."""

    file: str
    path: str
    message: str
    severity: str = "error"  # "error" stops the flow from loading, "warning" does not

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{self.severity}: {where}: {self.message}"


class FlowValidationError(FlowError):
    """A flow file that cannot run; ``issues`` lists every problem, not just the first."""

    def __init__(self, issues: list[FlowIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class UnknownState(FlowError):
    """A subscriber's stored state does not exist in the flow any more (flow was edited)."""


class StorageError(PlatformError):
    """The database refused an operation in a way callers can act on."""


class StorageUnavailable(StorageError):
    """The database is away for now (a restart, a failover, a refused connection): the
    same call may succeed later, so a web caller gets 503 and a messenger re-sends."""


def http_status_for(error: Exception) -> int:
    """Map an error to the HTTP status a webhook or API caller gets."""
    if isinstance(error, BadSignature):
        return error.status_code
    if isinstance(error, BadPayload):
        return 400
    if isinstance(error, UnknownBot):
        return 404
    if isinstance(error, FlowValidationError):
        return 422
    if isinstance(error, StorageUnavailable):
        return 503
    return 500
