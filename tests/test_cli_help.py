"""The command line as a newcomer meets it: help without markup, the serving settings
listed, and a port already taken refused before anything claims to be serving (issue 14,
item 13)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bot_platform import cli, serve
from tests.support.platform import ROOT


def every_help(parser: argparse.ArgumentParser) -> list[str]:
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts.extend(every_help(sub))
    return texts


def test_help_has_no_raw_markup() -> None:
    texts = every_help(cli.build_parser())
    assert len(texts) > 10
    for text in texts:
        assert "``" not in text, text


@pytest.mark.parametrize("command", ["run", "web"])
def test_serving_help_lists_host_and_port(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    for name in ("BOTP_HOST", "BOTP_PORT", "BOTP_PUBLIC_URL", "BOTP_DATABASE_URL"):
        assert name in out


def test_a_taken_port_is_refused_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(serve.PortInUse, match=rf"cannot listen on 127.0.0.1:{port}.*"
                                                rf"BOTP_PORT={port + 1}"):
            serve.listen("127.0.0.1", port)


@pytest.mark.slow
def test_a_second_run_on_the_same_port_fails_before_saying_serving(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the first ./dev run
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/r.db",
               "BOTP_PORT": str(port), "BOTP_HOST": "127.0.0.1"}
        result = subprocess.run([sys.executable, "-m", "bot_platform.cli", "run"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60,
                                check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot listen on 127.0.0.1:{port}" in output
    assert "serving" not in output
    assert "Traceback" not in output


def test_the_license_is_an_spdx_expression() -> None:
    """A ``license = {text = ...}`` table makes every install warn (setuptools >= 77
    deprecates it); the SPDX string needs setuptools 77 to build."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in config["build-system"]["requires"]
