"""The web inbox for support staff: one static page (no build step) that talks to the
handoff API with the agent's key, kept in the browser's session storage. Its CSP allows
exactly its own inline script and style (by hash) and calls to this origin."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from bot_platform.app import html_csp

router = APIRouter()
PAGE = Path(__file__).with_name("static") / "inbox.html"


@router.get("/inbox", response_class=HTMLResponse, include_in_schema=False)
def inbox() -> HTMLResponse:  # a file read: FastAPI runs it in a thread
    html = PAGE.read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": html_csp(html)})
