"""A minimal keep-alive HTTP/1.1 client for one host: JSON POSTs, the answer's status and body.

Why: aiohttp's client spends about 90 microseconds of Python per request (request and
response objects, header multidicts, a writer task, timers, cookie and redirect
handling) that a Bot API send needs none of; at 1,000 sends/s that is 9% of a core in
the process that also answers people. Here a request is one ``write`` of a prebuilt
head and body on a kept-alive connection, and ``httptools`` (llhttp, uvicorn's parser,
already a dependency) reads the answer as its bytes come: a length or chunks.

What it does not do, on purpose: redirects (an error naming the target), cookies,
proxies, compression, HTTP/2. A connection is reused only after a complete answer
without ``Connection: close``; one whose request was cancelled, timed out or broke is
closed, never reused (its answer could arrive later and be taken for another
request's). Nothing is retried: a POST that may have arrived is the caller's to judge
(the outbox retries a transient result).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from urllib.parse import urlsplit

import httptools

MAX_ANSWER = 1 << 20  # bytes: a Bot API answer to a send is well under 1 KB


class HttpError(Exception):
    """The connection failed, closed early, or the answer is not HTTP/1.1 we can read."""


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One context for every client of the process (each holds the CA bundle)."""
    try:
        import certifi
    except ImportError:  # pragma: no cover - aiohttp's dependencies bring it
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class _Connection(asyncio.Protocol):
    """One connection; at most one request in flight on it. The answer is read by
    ``httptools`` (llhttp, the parser uvicorn serves with): a length, chunks, keep-alive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()
        self.location: str | None = None
        self.answer: asyncio.Future[tuple[int, bytes]] | None = None
        self.open = True
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(HttpError(
                f"connection closed before the answer ({exc or 'by the server'})"))

    def data_received(self, data: bytes) -> None:
        if self.answer is None or self.answer.done():
            self.open = False  # bytes nobody asked for: the stream is out of step
            if self.transport is not None:
                self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.reusable = False
            if not self.answer.done():
                ours = error.__cause__ or error.__context__  # raised by a callback here
                self.answer.set_exception(ours if isinstance(ours, HttpError) else HttpError(
                    f"not an HTTP/1.x answer: {error}"))

    # ---- httptools' callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.answer is None or self.answer.done():
            self.reusable = False  # a second answer to one request: out of step

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"location":
            self.location = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.reusable = False

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_ANSWER:
            raise HttpError("answer too long")

    def on_message_complete(self) -> None:
        status, body = self.parser.get_status_code(), bytes(self.body)
        self.body.clear()
        if self.answer is None or self.answer.done():
            return
        if 300 <= status < 400:  # an API does not redirect; say where it went
            self.reusable = False
            self.answer.set_exception(HttpError(
                f"{status} to {self.location!r}, not followed"))
            return
        self.answer.set_result((status, body))


class Http1Client:
    """Keep-alive connections to the host of ``base`` (http or https), at most
    ``limit`` at once; ``post`` sends one request on an idle one or a new one."""

    def __init__(self, base: str, limit: int = 100, timeout: float = 60.0,
                 tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        self.host = parts.hostname
        # ``tls``: the context to check an https server with (tests trust their own CA).
        self.tls = (tls or _tls_context()) if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._head_host = (host if default_port else f"{host}:{self.port}").encode()
        self.timeout = timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self._all: set[_Connection] = set()

    async def post(self, path: str, body: bytes,
                   content_type: bytes = b"application/json") -> tuple[int, bytes]:
        """POST ``body`` to ``path``; the answer's status and body. Raises ``HttpError``,
        ``OSError`` or ``TimeoutError``."""
        head = b"".join((b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", self._head_host,
                         b"\r\nContent-Type: ", content_type, b"\r\nContent-Length: ",
                         str(len(body)).encode(), b"\r\n\r\n"))
        async with self._slots:
            connection = await self._connection()
            loop = asyncio.get_running_loop()
            answer = connection.answer = loop.create_future()
            timer = loop.call_later(self.timeout, self._time_out, connection)
            done = False
            try:
                assert connection.transport is not None
                connection.transport.write(head + body)
                result = await answer
                done = True
                return result
            finally:
                timer.cancel()
                connection.answer = None
                if done and connection.reusable and connection.open:
                    self._idle.append(connection)
                else:
                    self._drop(connection)

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.open:
                return connection
            self._all.discard(connection)
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(loop.create_connection(
            _Connection, self.host, self.port, ssl=self.tls,
            server_hostname=self.host if self.tls else None), self.timeout)
        self._all.add(connection)
        return connection

    def _time_out(self, connection: _Connection) -> None:
        if connection.answer is not None and not connection.answer.done():
            connection.answer.set_exception(TimeoutError())

    def _drop(self, connection: _Connection) -> None:
        connection.open = False
        self._all.discard(connection)
        if connection.transport is not None:
            connection.transport.close()

    async def close(self) -> None:
        for connection in list(self._all):
            self._drop(connection)
        self._idle.clear()
