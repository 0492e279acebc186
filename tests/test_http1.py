"""``bots.http1``: the answers a server may give (a length, chunks, ``Connection: close``,
garbage, silence) and connections kept alive only when that is safe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bots.http1 import Http1Client, HttpError

Reply = Callable[[bytes], bytes | None]  # the request's bytes -> the answer (None: none)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Reply], Awaitable[tuple[str, list[int]]]]]:
    """Start a raw TCP server answering each request with ``reply``; counts connections."""
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> tuple[str, list[int]]:
        connections: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    request = head + await reader.readexactly(length)
                    answer = reply(request)
                    if answer is None:
                        await asyncio.sleep(10)
                        return
                    writer.write(answer)
                    await writer.drain()
                    if b"connection: close" in answer.lower():
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", connections

    yield start
    for server in servers:
        server.close()


def answer(body: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join((b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body), *headers,
                         b"", body))


async def test_one_connection_carries_request_after_request(serve) -> None:
    seen: list[bytes] = []
    url, connections = await serve(lambda r: seen.append(r) or answer(b'{"ok":true}'))
    client = Http1Client(url)
    for n in range(3):
        assert await client.post("/bot1:x/sendMessage", b'{"n":%d}' % n) == (200, b'{"ok":true}')
    await client.close()
    assert len(connections) == 1
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /bot1:x/sendMessage HTTP/1.1\r\n") and body == b'{"n":0}'
    assert b"Content-Type: application/json" in head and b"Host: 127.0.0.1:" in head


async def test_chunked_answers_and_connection_close(serve) -> None:
    chunked = (b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"ok\"\r\n8;x=y\r\n:false}\n\r\n0\r\n\r\n")
    url, connections = await serve(lambda r: chunked)
    client = Http1Client(url)
    assert await client.post("/a", b"{}") == (429, b'{"ok":false}\n')
    assert await client.post("/a", b"{}") == (429, b'{"ok":false}\n')
    await client.close()
    assert len(connections) == 1

    url, connections = await serve(lambda r: answer(b"{}", b"Connection: close"))
    client = Http1Client(url)
    assert await client.post("/a", b"{}") == (200, b"{}")
    assert await client.post("/a", b"{}") == (200, b"{}")
    await client.close()
    assert len(connections) == 2  # closed by the server: a new one for the next request


async def test_garbage_silence_and_refusal_are_errors(serve) -> None:
    url, _ = await serve(lambda r: b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    client = Http1Client(url)
    with pytest.raises(HttpError, match="not an HTTP"):
        await client.post("/a", b"{}")
    await client.close()

    url, _ = await serve(lambda r: None)  # never answers
    client = Http1Client(url, timeout=0.05)
    with pytest.raises(TimeoutError):
        await client.post("/a", b"{}")
    await client.close()

    url, _ = await serve(lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n"
                                   b"Connection: close\r\n\r\n{}")
    client = Http1Client(url)  # the server closes before the whole body
    with pytest.raises(HttpError, match="closed before the answer"):
        await client.post("/a", b"{}")
    await client.close()


async def test_an_idle_connection_closed_by_the_server_is_not_reused(serve) -> None:
    url, connections = await serve(lambda r: answer(b"{}"))
    client = Http1Client(url)
    assert await client.post("/a", b"{}") == (200, b"{}")
    for connection in list(client._idle):
        connection.transport.close()  # as a server's keep-alive timeout would
    await asyncio.sleep(0.01)
    assert await client.post("/a", b"{}") == (200, b"{}")
    await client.close()
    assert len(connections) == 2


async def test_a_cancelled_request_closes_its_connection(serve) -> None:
    url, _ = await serve(lambda r: None)
    client = Http1Client(url)
    request = asyncio.create_task(client.post("/a", b"{}"))
    await asyncio.sleep(0.05)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert client._idle == [] and client._all == set()
    await client.close()


async def test_a_redirect_is_an_error_naming_its_target(serve) -> None:
    url, _ = await serve(lambda r: b"HTTP/1.1 302 Found\r\nLocation: http://Elsewhere/X\r\n"
                                   b"Content-Length: 0\r\n\r\n")
    client = Http1Client(url)
    with pytest.raises(HttpError, match="302 to 'http://Elsewhere/X', not followed"):
        await client.post("/a", b"{}")
    assert client._idle == []
    await client.close()


async def test_more_bytes_than_one_answer_or_an_answer_without_a_length(serve) -> None:
    """Bytes beyond the answer mean the stream is out of step: the answer counts, the
    connection is not used again. An answer ended only by closing is not trusted."""
    url, connections = await serve(lambda r: answer(b"{}") + b"HTTP/1.1 200 OK\r\n")
    client = Http1Client(url)
    assert await client.post("/a", b"{}") == (200, b"{}")
    assert client._idle == []
    assert await client.post("/a", b"{}") == (200, b"{}")
    await client.close()
    assert len(connections) == 2

    url, _ = await serve(lambda r: b"HTTP/1.0 200 OK\r\n\r\n{}")
    client = Http1Client(url, timeout=0.2)
    with pytest.raises((HttpError, TimeoutError)):
        await client.post("/a", b"{}")
    await client.close()


async def test_an_answer_too_long_is_an_error(serve, monkeypatch) -> None:
    from bots import http1

    monkeypatch.setattr(http1, "MAX_ANSWER", 100)
    url, _ = await serve(lambda r: answer(b"x" * 500))
    client = Http1Client(url)
    with pytest.raises(HttpError, match="too long"):
        await client.post("/a", b"{}")
    assert client._idle == []
    await client.close()


async def test_https_checks_the_server_certificate() -> None:
    """Telegram is reached over TLS: the answer comes through a verified connection, and
    a certificate nobody vouches for is refused, not sent to."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            received.append(head)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(answer(b'{"ok":true}'))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        client_tls = ssl.create_default_context()
        ca.configure_trust(client_tls)
        client = Http1Client(url, tls=client_tls)
        assert await client.post("/bot1:x/sendMessage", b"{}") == (200, b'{"ok":true}')
        await client.close()
        assert len(received) == 1

        stranger = Http1Client(url)  # the process's CA bundle does not know this CA
        with pytest.raises(ssl.SSLCertVerificationError):
            await stranger.post("/bot1:x/sendMessage", b"{}")
        await stranger.close()
        assert len(received) == 1  # nothing was sent over the unverified connection
    finally:
        server.close()


async def test_requests_at_once_each_get_their_own_answer(serve) -> None:
    """Many senders post at the same moment: each request rides a connection of its own
    (or one freed by a finished request) and gets its own answer, never another's."""
    url, connections = await serve(lambda r: answer(r.partition(b"\r\n\r\n")[2]))
    client = Http1Client(url, limit=8)
    bodies = [b'{"n":%d}' % n for n in range(50)]
    answers = await asyncio.gather(*(client.post("/a", body) for body in bodies))
    assert answers == [(200, body) for body in bodies]
    assert len(connections) <= 8  # at most ``limit`` at once, kept alive between requests
    await client.close()
