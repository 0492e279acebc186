"""The deployment files in docs/deploy/ stay true to the code: every command they run is
one ``botp`` accepts, every setting they set is one the platform reads, and the compose
file has PostgreSQL, Redis, a migration, web and three workers wired to one another."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from bot_platform.cli import build_parser
from bot_platform.config import Settings, WorkerSettings
from tests.support.platform import ROOT

DEPLOY = ROOT / "docs" / "deploy"


def assert_botp_command(argv: list[str]) -> None:
    assert Path(argv[0]).name == "botp", argv
    build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown command


def assert_known_setting(name: str) -> None:
    assert name.startswith("BOTP_"), name
    key = name.removeprefix("BOTP_").lower()
    if "__" in key:
        block, field = key.split("__", 1)
        assert block == "worker" and field in WorkerSettings.model_fields, name
    else:
        assert key in Settings.model_fields, name


def test_compose_runs_postgres_redis_web_and_three_workers() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "web", "worker"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] == 3
    for name in ("migrate", "web", "worker"):
        service = services[name]
        assert_botp_command(service["command"])
        for variable in service["environment"]:
            assert_known_setting(variable)
        url = service["environment"]["BOTP_DATABASE_URL"]
        assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
        assert service["environment"]["BOTP_REDIS_URL"].startswith("redis://redis:6379/")
    assert services["web"]["depends_on"]["migrate"]["condition"] == \
        "service_completed_successfully"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    build = services["web"]["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_dockerfile_copies_what_the_platform_reads() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+)", text, flags=re.MULTILINE))
    for needed in ("pyproject.toml", "bot_platform", "bots", "admin_api", "alembic",
                   "alembic.ini", "flows", "locales"):
        assert needed in copied, needed
        assert (ROOT / needed).exists()


def test_procfile_and_systemd_units_run_botp_commands() -> None:
    for line in (DEPLOY / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _, command = line.split(":", 1)
            assert_botp_command(shlex.split(command))
    for unit in DEPLOY.glob("*.service"):
        for line in unit.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=")):
                assert_botp_command(shlex.split(line.split("=", 1)[1]))
