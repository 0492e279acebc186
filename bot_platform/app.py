"""The ASGI app: messenger webhooks (and, when installed, the admin API).

The webhook endpoint is the edge: it hands the raw request to the channel adapter, which
verifies and normalizes it; the engine handles the events before we answer, so a 200 means
the events are durably recorded (a messenger re-sends on anything else, and dedupe makes
that safe).

Every response carries security headers (``SecurityHeaders``): no sniffing, no framing, no
referrer, and a Content-Security-Policy. JSON and text get a policy that allows nothing;
HTML pages set their own (``html_csp``), allowing exactly their inline scripts and styles
by hash, plus what they load (from this origin only). ``/metrics`` serves Prometheus
(``bot_platform.metrics``).

Routes get the platform as a dependency (``PlatformDep``). The platform's errors
(``bot_platform.errors``) become answers in one handler, with the status
``http_status_for`` gives: a webhook's forged signature (401/403), malformed body (400) or
closed bot (404), and a database that is away (503, one log line, no traceback; a
messenger re-sends). The app's lifespan (``bot_platform.serve``) runs the platform's
pieces this process serves: the bots' pollers and webhooks, and the worker.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import pathlib
import re
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from bot_platform.channels import (
    SupportsMessageReply,
    SupportsReply,
    WebhookRequest,
    supports,
)
from bot_platform.database import URGENT
from bot_platform.errors import (
    BadPayload,
    BadSignature,
    PlatformError,
    StorageUnavailable,
    UnknownBot,
    http_status_for,
)
from bot_platform.metrics import Metrics, WebhookCounter, exposition, may_scrape, metrics_of
from bot_platform.platform import Platform
from bot_platform.redaction import install_log_redaction

log = logging.getLogger(__name__)


def get_platform(request: Request) -> Platform:
    """The platform this app serves (``app.state.platform``)."""
    platform: Platform = request.app.state.platform
    return platform


# What a route declares to be handed the platform: ``platform: PlatformDep``.
PlatformDep = Annotated[Platform, Depends(get_platform)]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

REPLY_HOLD = timedelta(seconds=10)

# Routers mounted when their package is importable (the core does not depend on them).
OPTIONAL_ROUTERS = ("admin_api:create_router",)


Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

# For responses that are not pages (JSON, text, redirects): nothing may load or run.
STRICT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
# The API docs pages run Swagger UI / ReDoc from files this server serves (DOCS_ASSETS):
# nothing is loaded from another origin, so the pages work offline and a CDN cannot change
# what runs on them. Both inject styles at run time ('unsafe-inline', styles only) and
# show inline SVG/data: images; ReDoc's search runs in a worker made from a blob: URL.
DOCS_ASSETS = "/static/docs"
DOCS_SOURCES = {
    "script-src": "'self'",
    "style-src": "'self' 'unsafe-inline'",
    "img-src": "'self' data:",
    "worker-src": "blob:",
}
_INLINE = {kind: re.compile(rf"<{kind}(?![^>]*\bsrc=)[^>]*>(.*?)</{kind}>", re.S | re.I)
           for kind in ("script", "style")}


def _hashes(html: str, kind: str) -> list[str]:
    return [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in _INLINE[kind].findall(html)]


def html_csp(html: str, sources: dict[str, str] | None = None) -> str:
    """A Content-Security-Policy for one HTML page: its own inline ``<script>`` and
    ``<style>`` blocks by hash (nothing injected later can run), calls to this origin
    (the API), and the extra ``sources`` per directive (CDNs)."""
    sources = sources or {}
    directives = {"default-src": "'none'", "connect-src": "'self'", "img-src": "'self'",
                  **{k: v for k, v in sources.items() if k not in ("script-src", "style-src")}}
    for kind in ("script", "style"):
        extra = sources.get(f"{kind}-src", "")
        # With a hash present, browsers ignore 'unsafe-inline': one or the other.
        hashes = [] if "'unsafe-inline'" in extra else _hashes(html, kind)
        allowed = " ".join([*hashes, extra]).strip()
        if allowed:
            directives[f"{kind}-src"] = allowed
    directives.update({"base-uri": "'none'", "form-action": "'none'",
                       "frame-ancestors": "'none'"})
    return "; ".join(f"{name} {value}" for name, value in directives.items())


class SecurityHeaders:
    """Pure ASGI middleware (streams, such as the live event stream, pass through as they
    are): adds the security headers to every response, and the strict CSP to any response
    that did not set its own."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", STRICT_CSP.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def docs_assets_dir() -> pathlib.Path:
    """Swagger UI's and ReDoc's bundles as the ``fastapi-offline`` package ships them
    (swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png)."""
    return pathlib.Path(importlib.import_module("fastapi_offline").__file__ or "").parent / "static"


def _docs_routes(app: FastAPI) -> None:
    """Swagger UI and ReDoc served from this origin, with a CSP of their own."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=docs_assets_dir()), name="docs-assets")

    def page(html: str) -> Response:
        return Response(html, media_type="text/html",
                        headers={"Content-Security-Policy": html_csp(html, DOCS_SOURCES)})

    def base(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> Response:
        root = base(request)
        return page(get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or ""), title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters).body.decode())

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        root = base(request)
        return page(get_redoc_html(
            openapi_url=root + (app.openapi_url or ""), title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False).body.decode())


def _metrics_route(app: FastAPI, platform: Platform) -> None:
    app.state.platform = platform
    metrics = metrics_of(platform)
    token = platform.settings.metrics_token

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"description": "The text exposition format",
                              "content": {"text/plain": {}}},
                        404: {"description": "Not for this caller (see docs/deploy.md)",
                              "content": {"text/plain": {}}}})
    async def prometheus(request: Request, platform: PlatformDep) -> Response:
        if not may_scrape(request, token.get_secret_value() if token else None):
            # 404, not 401: the public side does not learn that the endpoint exists.
            return Response("not found", status_code=404, media_type="text/plain")
        body, content_type = await exposition(platform, metrics)
        return Response(body, media_type=content_type)


# What a plain-text caller (a messenger) reads for each status; the admin API answers
# in its JSON shapes (``admin_api.errors``).
PLAIN_ANSWERS = {400: "bad request", 401: "forbidden", 403: "forbidden", 404: "unknown bot",
                 503: "unavailable, try again"}
# A webhook's refusals, logged naming the bot (``channel/bot_id``).
WEBHOOK_REFUSALS: tuple[tuple[type[PlatformError], str], ...] = (
    (UnknownBot, "webhook for %s/%s refused: %s"),
    (BadSignature, "rejected webhook for %s/%s: %s"),
    (BadPayload, "malformed webhook for %s/%s: %s"),
)
RETRY_AFTER_SECONDS = 5  # told to callers while the database is away


def _log_platform_error(request: Request, error: PlatformError, status: int) -> None:
    """One line per refused request; a traceback only for a 500 (a bug, not a refusal)."""
    params = request.path_params
    for kind, template in WEBHOOK_REFUSALS:
        if isinstance(error, kind) and "bot_id" in params:
            log.warning(template, params.get("channel"), params["bot_id"], error)
            return
    if status == 500:
        log.error("%s %s failed: %s", request.method, request.url.path, error, exc_info=error)
    else:
        log.warning("%s %s answered %d: %s", request.method, request.url.path, status, error)


async def platform_error(request: Request, error: Exception) -> Response:
    """Every ``PlatformError`` a route lets through, answered with the status
    ``http_status_for`` gives it: JSON under ``/api``, plain text elsewhere."""
    assert isinstance(error, PlatformError)
    status = http_status_for(error)
    _log_platform_error(request, error, status)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    if isinstance(error, StorageUnavailable):
        detail = "the database is unavailable; try again shortly"  # not the driver's words
    else:
        detail = str(error)
    if request.url.path.startswith("/api/"):
        body: Any = detail if status != 422 else [
            {"loc": ["body"], "msg": detail, "type": "value_error"}]
        return JSONResponse({"detail": body}, status_code=status, headers=headers)
    return Response(PLAIN_ANSWERS.get(status, "error"), status_code=status,
                    media_type="text/plain", headers=headers)


class _App(FastAPI):
    """FastAPI with the security headers outermost: error pages (500) get them too; and
    webhook answers counted (500s included) for /metrics."""

    webhook_metrics: Metrics | None = None

    def build_middleware_stack(self) -> Any:
        stack = super().build_middleware_stack()
        if self.webhook_metrics is not None:
            stack = WebhookCounter(stack, self.webhook_metrics)
        return SecurityHeaders(stack)


def _serving(platform: Platform, *, receive: bool, worker: bool) -> Lifespan:
    """The app's lifespan: the platform's pieces this process runs (``serve.serving``)."""
    def lifespan(_app: FastAPI) -> AbstractAsyncContextManager[None]:
        from bot_platform.serve import serving

        return serving(platform, receive=receive, worker=worker)
    return lifespan


def create_app(platform: Platform, *, worker: bool = False) -> FastAPI:
    """The web process's app. Its lifespan serves the bots (pollers, webhooks) and, with
    ``worker``, runs the worker; tests that drive the app in-process (no lifespan) run
    those pieces themselves."""
    app = _App(title="botp", version="0.1.0",
               description="Multi-messenger retention chatbot platform",
               docs_url=None, redoc_url=None,
               lifespan=_serving(platform, receive=True, worker=worker))
    app.state.platform = platform
    app.add_exception_handler(PlatformError, platform_error)
    install_log_redaction()
    _docs_routes(app)
    _metrics_route(app, platform)
    app.webhook_metrics = metrics_of(platform)

    @app.get("/healthz", tags=["ops"])
    async def healthz(platform: PlatformDep) -> dict[str, str]:
        await platform.db.ping()  # away: 503 (platform_error)
        return {"status": "ok"}

    @app.get("/r/{token}", tags=["tracking"], summary="Count a click and redirect",
             response_class=Response, responses={
                 302: {"description": "To the link's target"},
                 404: {"description": "No such link", "content": {"text/plain": {}}}})
    async def tracked_redirect(platform: PlatformDep,
                               token: str = Path(max_length=32)) -> Response:
        from bot_platform.catalog import register_click

        target = await register_click(platform.db, token, platform.clock.now())
        if target is None:
            return Response("unknown link", status_code=404, media_type="text/plain")
        return Response(status_code=302, headers={"Location": target})

    # A plain Starlette route (no schema, no dependencies to solve): every messenger
    # update comes through here, and FastAPI's per-request machinery was ~3% of a busy
    # ``botp run`` (bench/README.md).
    async def webhook(request: Request) -> Response:
        # Someone waits for what this request does: its sessions are urgent (on SQLite
        # they get the connection before broadcasts' waiting claims and writes).
        token = URGENT.set(True)
        try:
            return await _webhook(request)
        finally:
            URGENT.reset(token)

    async def _webhook(request: Request) -> Response:
        platform = get_platform(request)
        channel, bot_id = request.path_params["channel"], request.path_params["bot_id"]
        adapter = platform.channel(channel, bot_id)
        if adapter is None:
            raise UnknownBot("no such bot is configured")
        call = WebhookRequest(
            method=request.method,
            headers={k.lower(): v for k, v in request.headers.items()},
            query=dict(request.query_params),
            body=await request.body(),
        )
        # Refusals (UnknownBot: configured but closed, the console; BadSignature;
        # BadPayload) and a database that is away are answered by platform_error.
        events = await adapter.parse(call)
        # An adapter whose response may carry a queued message gets its messages held
        # back from the worker until it has chosen (then released at once).
        holds = supports(adapter, SupportsMessageReply)
        hold = REPLY_HOLD if holds else None
        handled = [await platform.engine.handle(event, hold=hold) for event in events]
        if holds:
            answer = adapter.reply_with_message
        elif supports(adapter, SupportsReply):
            answer = adapter.reply
        else:
            return Response("ok", media_type="text/plain")
        held = [i for h in handled for i in h.outbox_ids] if holds else []
        try:
            reply = await answer(call, handled)
            if reply is not None and reply.consumed_outbox_ids:
                if await platform.outbox.take_over(reply.consumed_outbox_ids):
                    # sent in this response: only the rest still waits for a worker
                    taken = set(reply.consumed_outbox_ids)
                    held = [i for i in held if i not in taken]
                else:
                    reply = None  # the worker was faster (the hold expired): it sends them
        finally:
            if held:
                await platform.outbox.release(held)
        if reply is None:
            return Response("ok", media_type="text/plain")
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    app.add_route("/webhooks/{channel}/{bot_id}", webhook, methods=["GET", "POST"],
                  include_in_schema=False)

    for target in OPTIONAL_ROUTERS:
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        factory = getattr(module, attribute, None)
        if factory is not None:
            app.include_router(factory(platform))
    return app


def create_metrics_app(platform: Platform) -> FastAPI:
    """Only ``GET /metrics``: what a worker process serves (``BOTP_METRICS_PORT``), so
    its send and 429 counters can be scraped too. Its lifespan runs the worker."""
    app = _App(title="botp worker", docs_url=None, redoc_url=None, openapi_url=None,
               lifespan=_serving(platform, receive=False, worker=True))
    install_log_redaction()
    _metrics_route(app, platform)
    return app

