"""The validator reports every problem of a file in one run, one line each with a
suggestion where one fits; broken ``.ftl`` files are reported with file:line and stop the
platform (issue 14, item 11)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bot_platform.apikeys import create_key
from bot_platform.errors import FlowValidationError
from tests.support.platform import ROOT

FIVE_PROBLEMS = """
flow: five
start: ask
states:
  ask:
    say: spring-hello
    buttons:
      - label: spring-btn-yes
        goto: nowhere
      - label: spring-btn-no
        goto: check
    brnch: []
  check:
    branch:
      - when: {attribute: age, op: bigger, value: 3}
        goto: wait
      - goto: ask
  wait:
    say: spring-helo
    after:
      delay: 3 parsecs
      goto: ask
"""


def validate(path: Path, locales: Path = ROOT / "locales") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bot_platform.cli", "flows", "validate", str(path),
         "--locales", str(locales)], capture_output=True, text=True, cwd=ROOT, check=False)


def test_five_problems_in_one_run_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "five.yaml").write_text(FIVE_PROBLEMS)
    result = validate(tmp_path / "five.yaml")
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    file = tmp_path / "five.yaml"
    assert errors == [
        f"error: {file}: states.ask.brnch: unknown field 'brnch' (did you mean 'branch'?)",
        f"error: {file}: states.check.branch[0].when.op: unknown op 'bigger' (did you mean "
        "'gt'?); ops: eq, ne, gt, gte, lt, lte, in, not_in, exists, contains",
        f"error: {file}: states.ask.buttons[0].goto: unknown state 'nowhere' "
        "(states: ask, check, wait)",
        f"error: {file}: states.wait.after.delay: bad duration '3 parsecs': use numbers "
        "with w, d, h, m or s (e.g. 30m, 1d, 1h30m)",
        f"error: {file}: states.wait.say[0].text: unknown catalog key 'spring-helo' in the "
        "default locale 'en' (locales/en/*.ftl) (did you mean 'spring-hello'?)",
    ]
    assert "5 error(s)" in result.stdout


def test_a_typo_in_op_is_one_line_with_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / "op.yaml").write_text("""
flow: op
start: check
states:
  check:
    branch:
      - when: {all: [{tag: vip}, {attribute: age, op: bigger, value: 18}]}
        goto: done
      - goto: done
  done:
    say: spring-bye
    end: true
""")
    result = validate(tmp_path / "op.yaml")
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stdout
    assert "states.check.branch[0].when.all[1].op: unknown op 'bigger' (did you mean " \
           "'gt'?)" in lines[0]
    assert "Condition" not in result.stdout  # no pydantic union members


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("flow: bad\nstart: a\nstates:\n  a: {say: [x\n")
    result = validate(tmp_path / "bad.yaml")
    assert result.returncode == 1
    [line] = [x for x in result.stdout.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {tmp_path / 'bad.yaml'}:5: cannot read YAML")


def broken_locales(tmp_path: Path) -> Path:
    locales = tmp_path / "locales"
    for locale in ("en", "uk"):
        (locales / locale).mkdir(parents=True)
        for source in (ROOT / "locales" / locale).glob("*.ftl"):
            (locales / locale / source.name).write_text(source.read_text())
    with (locales / "uk" / "spring.ftl").open("a") as file:
        file.write("spring-extra = {\nspring-bye = Ще раз\n")
    return locales


def test_a_broken_ftl_file_is_reported_with_its_line(tmp_path: Path) -> None:
    locales = broken_locales(tmp_path)
    spring = locales / "uk" / "spring.ftl"
    lines = len((ROOT / "locales" / "uk" / "spring.ftl").read_text().splitlines())
    result = validate(ROOT / "flows", locales)
    assert result.returncode == 1, result.stdout
    assert f"error: {spring}:{lines + 1}: syntax error in 'spring-extra = {{'" in result.stdout
    assert f"error: {spring}:{lines + 2}: spring-bye: duplicate key 'spring-bye' (first " \
           f"defined at {spring}:" in result.stdout


async def test_the_platform_refuses_to_start_with_a_broken_catalog(
        make_platform, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    locales = broken_locales(tmp_path)
    with pytest.raises(FlowValidationError) as refused:
        await make_platform(locales_dir=locales)
    assert "duplicate key 'spring-bye'" in str(refused.value)
    with caplog.at_level(logging.ERROR):
        platform = await make_platform(locales_dir=locales, skip_invalid_flows=True)
    assert "syntax error in 'spring-extra = {'" in caplog.text
    assert "spring_promo" in platform.flows.flows


async def test_the_api_reports_every_problem_at_once(make_platform) -> None:
    platform = await make_platform()
    _, key = await create_key(platform.db, name="m", role="marketer", now=platform.clock.now())
    async with platform.http_client() as client:
        response = await client.post("/api/flows", content=FIVE_PROBLEMS, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/yaml"})
    assert response.status_code == 422
    problems = response.json()["detail"]
    assert [p["path"] for p in problems] == [
        "states.ask.brnch", "states.check.branch[0].when.op", "states.ask.buttons[0].goto",
        "states.wait.after.delay", "states.wait.say[0].text"]
    assert "did you mean 'gt'?" in problems[1]["msg"]


async def test_the_api_validates_without_storing(make_platform) -> None:
    platform = await make_platform()
    _, key = await create_key(platform.db, name="m", role="marketer", now=platform.clock.now())
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/yaml"}
    good = (ROOT / "flows" / "welcome.yaml").read_text()
    async with platform.http_client() as client:
        broken = await client.post("/api/flows/validate", content=FIVE_PROBLEMS,
                                   headers=headers)
        fine = await client.post("/api/flows/validate", content=good, headers=headers)
        versions = await client.get("/api/flows/five/versions", headers=headers)
    assert broken.status_code == 200, broken.text
    assert broken.json()["valid"] is False
    assert [i["path"] for i in broken.json()["issues"] if i["severity"] == "error"] == [
        "states.ask.brnch", "states.check.branch[0].when.op", "states.ask.buttons[0].goto",
        "states.wait.after.delay", "states.wait.say[0].text"]
    assert fine.json()["valid"] is True
    assert versions.json() == []  # nothing stored
