"""The web inbox for support staff: one static page (no build step) that talks to the
handoff API with the agent's key, kept in the browser's session storage."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PAGE = Path(__file__).with_name("static") / "inbox.html"


@router.get("/inbox", response_class=HTMLResponse, include_in_schema=False)
async def inbox() -> HTMLResponse:
    return HTMLResponse(PAGE.read_bytes())
