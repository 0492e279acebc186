"""The admin API's error responses: one documented shape per status, mapped in one place.

Every error is ``{"detail": ...}``: a sentence for 400, 401, 403, 404, 409 and 413, and
for 422 the list FastAPI's own validation errors use (``loc``, ``msg``, ``type``; some
add ``path`` and ``message``), so a client parses every 422 the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DataError, DBAPIError

from bot_platform.text import storable_json

MAX_BODY = 1024 * 1024  # bytes of a request body, except for bulk uploads
MAX_UPLOAD = 16 * 1024 * 1024  # products and promo codes in one request


class ErrorPublic(BaseModel):
    """An error explained in one sentence."""

    detail: str


class ProblemPublic(BaseModel):
    """One problem with the request: where (``loc``), what (``msg``) and its kind."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorPublic(BaseModel):
    """The request is well-formed but its values are not acceptable."""

    detail: list[ProblemPublic]


def _sentence(description: str) -> dict[str, Any]:
    return {"model": ErrorPublic, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _sentence("The body could not be read"),
    401: _sentence("No valid API key"),
    403: _sentence("The key's role may not do this"),
    404: _sentence("No such resource"),
    409: _sentence("The resource is not in a state that allows this"),
    # The body limit answers before any route runs: in plain text when the declared
    # length is too large, as JSON when a body without a length runs past it.
    413: {"description": "The request body is too large", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}},
        "text/plain": {"schema": {"type": "string"}}}},
    422: {"model": ValidationErrorPublic, "description": "Invalid values"},
}


def unprocessable(message: str, loc: Sequence[str | int] = ("body",),
                  kind: str = "value_error", **extra: Any) -> HTTPException:
    """A 422 in the documented shape (raise it)."""
    return HTTPException(422, [{"loc": list(loc), "msg": message, "type": kind, **extra}])


def _problem(item: Mapping[str, Any]) -> dict[str, Any]:
    """A validation problem that can always be sent: without the rejected input (it may be
    a secret, text JSON cannot encode or a number JSON cannot hold)."""
    problem = {"loc": list(item.get("loc", ())), "msg": str(item.get("msg", "")),
               "type": str(item.get("type", "value_error"))}
    if item.get("ctx"):
        problem["ctx"] = storable_json({str(k): v if isinstance(v, int | str) else str(v)
                                        for k, v in item["ctx"].items()})
    return storable_json(problem)


async def error_shapes() -> AsyncIterator[None]:
    """Keeps every error of a route in its documented shape (a router dependency: the
    route's exceptions pass through here). A 422 raised with a sentence becomes the list
    shape; a value the database refuses (a number past 64 bits, text it cannot hold) that
    got past the models is the caller's 422, not a 500."""
    try:
        yield
    except RequestValidationError as error:
        raise HTTPException(422, [_problem(item) for item in error.errors()]) from error
    except HTTPException as error:
        if error.status_code == 422 and not isinstance(error.detail, list):
            raise unprocessable(str(error.detail)) from error
        raise
    except (OverflowError, DBAPIError) as error:
        if not _refused_value(error):
            raise
        raise unprocessable("a value is out of range or cannot be stored",
                            kind="value_not_storable") from error


def _refused_value(error: BaseException) -> bool:
    """Whether the database (or its driver) refused a value rather than failed."""
    if isinstance(error, OverflowError | DataError):  # SQLite's driver; PostgreSQL's 22xxx
        return True
    import asyncpg

    cause = getattr(getattr(error, "orig", None), "__cause__", None)
    return isinstance(cause, asyncpg.exceptions.DataError)  # asyncpg's own argument check
