"""Telegram sends posted as JSON: the hot path of every broadcast, timer and reply.

aiogram builds a pydantic method model per call, dumps it again, posts it as multipart
form data through aiohttp and parses the answer into ``Response[T]`` (with a ``Bot`` in
its context): about 290 microseconds of CPU per ``sendMessage`` in the sending process
at 1,000 sends/s. The Bot API takes ``application/json`` bodies as well, so ``JsonSends``
posts the body built straight from the message's fields on kept-alive connections of its
own (``bots.http1``: aiohttp's client alone was ~90 microseconds of Python a request) and
reads only what delivery needs from the answer: ``message_id``, or on an error
``error_code``, ``description`` and ``parameters``. About 95 microseconds a send in all.

Errors are raised as aiogram's exceptions, classified exactly as
``BaseSession.check_response`` and ``AiohttpSession.make_request`` do (429 with
``retry_after`` -> ``TelegramRetryAfter``, 400/401/403/404/409/413/5xx, a network error or
timeout -> ``TelegramNetworkError``, an answer that is not a Bot API envelope ->
``ClientDecodeError``), so the adapter maps them to the same ``SendResult`` kinds. Their
texts carry the request's URL at most through the HTTP client's own messages: the adapter
redacts every result (``bot_platform.redaction``), and nothing here logs.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

# isort: off
import bots.lazy_aiogram  # noqa: F401  first: aiogram's models are built when first used

# isort: on
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.exceptions import (
    ClientDecodeError,
    RestartingTelegram,
    TelegramAPIError,
    TelegramBadRequest,
    TelegramConflictError,
    TelegramEntityTooLarge,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.methods import SendMessage, SendPhoto, TelegramMethod
from aiohttp import ClientError, ClientTimeout
from aiohttp.payload import BytesPayload

from bots.http1 import Http1Client, HttpError

HTTP_CONNECTIONS = 100  # at most, per bot (aiogram's connector allows as many)
# One encoder: ``json.dumps`` with arguments builds a new one per call (+2 us a send).
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# Errors name the method they came from (``TelegramRetryAfter``'s text does): these
# models are built, unvalidated, only when an answer is an error.
METHOD_MODELS: dict[str, type[TelegramMethod[Any]]] = {
    "sendMessage": SendMessage, "sendPhoto": SendPhoto}
_BY_STATUS: dict[int, type[TelegramAPIError]] = {
    HTTPStatus.BAD_REQUEST: TelegramBadRequest,
    HTTPStatus.NOT_FOUND: TelegramNotFound,
    HTTPStatus.CONFLICT: TelegramConflictError,
    HTTPStatus.UNAUTHORIZED: TelegramUnauthorizedError,
    HTTPStatus.FORBIDDEN: TelegramForbiddenError,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: TelegramEntityTooLarge,
}


def _method(api_method: str, params: dict[str, Any]) -> TelegramMethod[Any]:
    """The aiogram method an error names (built without validation: errors only)."""
    model = METHOD_MODELS.get(api_method, SendMessage)
    return model.model_construct(**params)


def api_error(api_method: str, params: dict[str, Any], status: int,
              answer: dict[str, Any]) -> TelegramAPIError:
    """The exception aiogram's ``check_response`` raises for this error answer."""
    method = _method(api_method, params)
    description = answer.get("description")
    if not isinstance(description, str):
        description = f"error {status}"
    parameters = answer.get("parameters")
    if isinstance(parameters, dict):
        if parameters.get("retry_after"):
            return TelegramRetryAfter(method=method, message=description,
                                      retry_after=int(parameters["retry_after"]))
        if parameters.get("migrate_to_chat_id"):
            return TelegramMigrateToChat(method=method, message=description,
                                         migrate_to_chat_id=parameters["migrate_to_chat_id"])
    error = _BY_STATUS.get(status)
    if error is not None:
        return error(method=method, message=description)
    if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        if "restart" in description:
            return RestartingTelegram(method=method, message=description)
        return TelegramServerError(method=method, message=description)
    return TelegramAPIError(method=method, message=description)


def read_answer(api_method: str, params: dict[str, Any], status: int,
                raw: bytes) -> dict[str, Any]:
    """The ``result`` of a successful answer; otherwise raises what aiogram raises."""
    try:
        answer = json.loads(raw)
    except ValueError as error:
        raise ClientDecodeError("Failed to decode object", error,
                                raw.decode(errors="replace")) from error
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ClientDecodeError("Failed to deserialize object",
                                ValueError("not a Bot API answer"), answer)
    result = answer.get("result")
    if result is not None and not (isinstance(result, dict)
                                   and isinstance(result.get("message_id"), int)):
        raise ClientDecodeError("Failed to deserialize object",
                                ValueError("no message_id in the result"), answer)
    if answer["ok"] and HTTPStatus.OK <= status <= HTTPStatus.IM_USED:
        if result is None:
            raise ClientDecodeError("Failed to deserialize object",
                                    ValueError("no result"), answer)
        return result
    raise api_error(api_method, params, status, answer)


class JsonSends:
    """``sendMessage`` / ``sendPhoto`` for one ``Bot``, posted as JSON to its API server:
    on kept-alive connections of our own (``bots.http1``), or, when its
    ``AiohttpSession`` goes through a proxy, on that session's client."""

    def __init__(self, bot: Bot) -> None:
        if not isinstance(bot.session, AiohttpSession):
            raise TypeError("JsonSends posts on an AiohttpSession's client")
        self.bot = bot
        self.session: AiohttpSession = bot.session
        self.timeout = ClientTimeout(total=self.session.timeout)
        self._targets: dict[str, tuple[str, str]] = {}  # method -> its URL, its path
        self.http: Http1Client | None = None
        if self.session.proxy is None:
            base = self.session.api.api_url(token=bot.token, method="sendMessage")
            self.http = Http1Client(base, limit=HTTP_CONNECTIONS,
                                    timeout=float(self.session.timeout))

    def target(self, api_method: str) -> tuple[str, str]:
        """The method's URL, and its path as the request line carries it."""
        target = self._targets.get(api_method)
        if target is None:
            url = self.session.api.api_url(token=self.bot.token, method=api_method)
            parts = urlsplit(url)
            target = self._targets[api_method] = (
                url, f"{parts.path}?{parts.query}" if parts.query else parts.path)
        return target

    async def call(self, api_method: str, params: dict[str, Any]) -> int:
        """Post one send; its ``message_id``. Raises aiogram's exceptions on errors."""
        url, path = self._targets.get(api_method) or self.target(api_method)
        body = _encode(params).encode()
        try:
            if self.http is not None:
                status, raw = await self.http.post(path, body)
            else:
                status, raw = await self._post_on_session(url, body)
        except TimeoutError as error:
            raise TelegramNetworkError(method=_method(api_method, params),
                                       message="Request timeout error") from error
        except (ClientError, HttpError, OSError) as error:
            raise TelegramNetworkError(method=_method(api_method, params),
                                       message=f"{type(error).__name__}: {error}") from error
        return read_answer(api_method, params, status, raw)["message_id"]

    async def _post_on_session(self, url: str, body: bytes) -> tuple[int, bytes]:
        http = await self.session.create_session()
        # A payload of its own content type: no headers to merge with the session's.
        payload = BytesPayload(body, content_type="application/json")
        async with http.post(url, data=payload, timeout=self.timeout) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

