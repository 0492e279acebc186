"""Every response carries nosniff, no framing, no referrer and a Content-Security-Policy;
the HTML pages (the inbox, the API docs) get a policy that still lets them work: their own
inline code by hash, files and calls from this origin only."""

from __future__ import annotations

import base64
import hashlib
import re

import httpx

from bot_platform.apikeys import create_key
from tests.support.platform import ROOT

INBOX = ROOT / "admin_api" / "static" / "inbox.html"


def policy(response: httpx.Response) -> dict[str, list[str]]:
    directives = {}
    for part in response.headers["content-security-policy"].split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


def assert_secure(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = policy(response)
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["default-src"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]


def inline_hashes(html: str, tag: str) -> list[str]:
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
    assert bodies, f"no inline <{tag}> found"
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in bodies]


async def test_api_webhooks_and_errors_get_the_strict_policy(make_platform) -> None:
    platform = await make_platform(console_secret="console-secret-0123456789")
    _, key = await create_key(platform.db, name="a", role="admin", now=platform.clock.now())
    async with platform.http_client() as client:
        responses = [
            await client.get("/api/bots", headers={"Authorization": f"Bearer {key}"}),
            await client.get("/api/bots"),  # 401
            await client.post("/api/bots", json={},
                              headers={"Authorization": f"Bearer {key}"}),  # 422
            await client.get("/healthz"),
            await client.get("/openapi.json"),
            await client.get("/no/such/page"),  # 404
            await client.post("/webhooks/telegram/nope", content=b"{}"),  # 404
            await client.post("/webhooks/console/console", json={"user_id": "u", "text": "hi"},
                              headers={"X-Botp-Console-Secret": "console-secret-0123456789"}),
        ]
    assert [r.status_code for r in responses] == [200, 401, 422, 200, 200, 404, 404, 200]
    for response in responses:
        assert_secure(response)
        assert policy(response) == {"default-src": ["'none'"], "frame-ancestors": ["'none'"],
                                    "base-uri": ["'none'"], "form-action": ["'none'"]}


async def test_the_inbox_may_run_exactly_its_own_script_and_style(make_platform) -> None:
    platform = await make_platform()
    async with platform.http_client() as client:
        response = await client.get("/inbox")
    assert response.status_code == 200
    assert_secure(response)
    csp = policy(response)
    html = INBOX.read_text(encoding="utf-8")
    assert csp["script-src"] == inline_hashes(html, "script")  # no 'unsafe-inline'
    assert csp["style-src"] == inline_hashes(html, "style")
    assert csp["connect-src"] == ["'self'"]  # the API and its live stream
    assert response.text == html


async def test_the_api_docs_load_only_from_this_server(make_platform) -> None:
    platform = await make_platform()
    async with platform.http_client() as client:
        swagger = await client.get("/docs")
        redoc = await client.get("/redoc")
        for response in (swagger, redoc):
            assert response.status_code == 200
            assert_secure(response)
            assert "/openapi.json" in response.text
            csp = policy(response)
            # Nothing from another origin: offline, no CDN can change what runs here.
            assert not [v for values in csp.values() for v in values if "://" in v], csp
            assert csp["script-src"][-1] == "'self'"
            assert "'unsafe-inline'" not in csp["script-src"]
            assert csp["connect-src"] == ["'self'"]
            # Swagger UI and ReDoc inject styles: 'unsafe-inline', which a hash would disable.
            assert csp["style-src"] == ["'self'", "'unsafe-inline'"]
            urls = re.findall(r'(?:src|href)="([^"]+)"', response.text)
            assert urls and all(url.startswith("/static/docs/") for url in urls), urls
            assert not re.findall(r"https?://", response.text)
            for url in urls:  # every asset the page names is served, with its type
                asset = await client.get(url)
                assert asset.status_code == 200, url
                assert_secure(asset)
                kind = asset.headers["content-type"]
                expected = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
                assert expected[url[url.rindex("."):]] in kind, (url, kind)
                assert len(asset.content) > 1000
    # Swagger UI starts from an inline script: allowed by its hash, and only it.
    assert csp_hashes(swagger) == inline_hashes(swagger.text, "script")


def csp_hashes(response: httpx.Response) -> list[str]:
    return [v for v in policy(response)["script-src"] if v.startswith("'sha256-")]


async def test_error_pages_get_the_headers_too(make_platform) -> None:
    platform = await make_platform()
    app = platform.app()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("an unexpected bug")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert_secure(response)
