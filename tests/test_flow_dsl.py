"""Flow validation: precise messages naming file, path and reason; start-up refuses
invalid flows unless told to skip them."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from bot_platform.errors import FlowValidationError
from bot_platform.flows.base import parse_duration
from bot_platform.flows.loading import validate_paths
from bot_platform.i18n import Catalogs
from tests.support.platform import ROOT

BROKEN = textwrap.dedent("""
    flow: broken
    triggers:
      - on: start
    start: hello
    states:
      hello:
        say: welcome-greeting
        buttons:
          - label: welcome-btn-tip
            goto: tipz
        after:
          delay: 1x
          goto: bye
      tips:
        say: welcome-tip
        goto: bye
      bye:
        say: welcome-no-such-key
        end: true
""")


@pytest.fixture
def catalogs() -> Catalogs:
    return Catalogs.load(ROOT / "locales", "en")


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_flows_are_valid_in_every_locale(catalogs: Catalogs) -> None:
    specs, issues = validate_paths(ROOT / "flows", catalogs)
    assert issues == []
    assert {"welcome", "spring_promo"} <= set(specs)
    assert set(catalogs.locales) >= {"en", "uk", "pl", "ar"}


def test_typo_bad_duration_and_missing_key_give_three_precise_errors(
        tmp_path: Path, catalogs: Catalogs) -> None:
    path = write(tmp_path, "broken.yaml", BROKEN)
    specs, issues = validate_paths(path, catalogs)
    assert specs == {}
    errors = {i.path: i.message for i in issues if i.severity == "error"}
    assert all(i.file == str(path) for i in issues)
    assert errors == {
        "states.hello.after.delay":
            "bad duration '1x': use numbers with w, d, h, m or s (e.g. 30m, 1d, 1h30m)",
        "states.hello.buttons[0].goto":
            "unknown state 'tipz'; did you mean 'tips'? (states: hello, tips, bye)",
        "states.bye.say[0].text":
            "unknown catalog key 'welcome-no-such-key' in the default locale 'en' "
            "(locales/en/*.ftl)",
    }
    warnings = [(i.path, i.message) for i in issues if i.severity == "warning"]
    assert warnings == [("states.tips", "state 'tips' is unreachable from start 'hello'")]


def test_all_three_problems_reported_together_by_the_cli(tmp_path: Path) -> None:
    write(tmp_path / "flows", "broken.yaml", BROKEN)
    result = subprocess.run(
        [sys.executable, "-m", "bot_platform.cli", "flows", "validate",
         str(tmp_path / "flows"), "--locales", str(ROOT / "locales")],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 1
    out = result.stdout
    assert "error: " + str(tmp_path / "flows" / "broken.yaml") in out
    assert "broken.yaml: states.hello.buttons[0].goto: unknown state 'tipz'" in out
    assert "broken.yaml: states.hello.after.delay: bad duration '1x'" in out
    assert "broken.yaml: states.bye.say[0].text: unknown catalog key 'welcome-no-such-key'" in out
    assert "0 valid flow(s), 3 error(s), 1 warning(s)" in out


def test_cli_accepts_the_shipped_flows() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot_platform.cli", "flows", "validate", "flows"],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s), 0 warning(s)" in result.stdout


def test_warnings_unreachable_state_and_missing_translation(
        tmp_path: Path, catalogs: Catalogs) -> None:
    locales = tmp_path / "locales"
    write(locales / "en", "x.ftl", "a = A\nb = B\n")
    write(locales / "uk", "x.ftl", "a = Привіт\n")
    path = write(tmp_path, "f.yaml", """
        flow: f
        start: one
        states:
          one: {say: a, end: true}
          orphan: {say: b, end: true}
    """)
    specs, issues = validate_paths(path, Catalogs.load(locales, "en"))
    assert "f" in specs  # warnings do not reject a flow
    assert [(i.path, i.severity) for i in issues] == [
        ("states.orphan.say[0].text", "warning"), ("states.orphan", "warning")]
    assert "missing in uk: falls back to 'en'" in issues[0].message
    assert "unreachable from start 'one'" in issues[1].message


@pytest.mark.parametrize(("body", "path", "fragment"), [
    ("start: one\nstates: {one: {actions: [{tagg: x}], end: true}}", "states.one.actions[0]",
     "unknown action 'tagg' (did you mean 'tag'?)"),
    ("start: one\nstates: {one: {say: a, colour: red}}", "states.one.colour",
     "unknown field 'colour'"),
    # A field of another part: no "did you mean" naming the same field.
    ("name: x\nstart: one\nstates: {one: {say: a}}", "name",
     "unknown field 'name' here (a field of another part of a flow)"),
    ("start: one\nstates: {one: {say: a, goto: one, after: {delay: 1d, goto: one}}}",
     "states.one", "cannot wait for input"),
    ("triggers: [{on: ref}]\nstart: one\nstates: {one: {say: a}}", "triggers[0]",
     "trigger on ref needs ref"),
    ("start: one\nstates: {one: {actions: [{start_flow: nope}], end: true}}",
     "states.one.actions[0].start_flow", "unknown flow 'nope'"),
    ("start: One\nstates: {One: {say: a}}", "states", "state names must match"),
    # Capture patterns are compiled with RE2 at load: what it cannot run is an error there.
    ("start: one\nstates: {one: {say: a, capture: {attribute: x, type: regex, "
     "pattern: '(a)\\1', retry: a, goto: one}}}", "states.one.capture",
     "no backreferences or lookaround"),
    ("start: one\nstates: {one: {say: a, capture: {attribute: x, type: regex, "
     "pattern: '(?=a)a', retry: a, goto: one}}}", "states.one.capture", "RE2 syntax"),
    ("start: one\nstates: {one: {actions: [{spins_left: {game: g}}], end: true}}",
     "states.one.actions[0].spins_left.game", "no spin action of game 'g' in this flow"),
])
def test_structural_errors_name_the_path(tmp_path: Path, body: str, path: str,
                                         fragment: str) -> None:
    locales = tmp_path / "locales"
    write(locales / "en", "x.ftl", "a = A\n")
    file = write(tmp_path, "f.yaml", "flow: f\n" + body)
    specs, issues = validate_paths(file, Catalogs.load(locales, "en"))
    assert specs == {}
    assert any(i.path == path and fragment in i.message for i in issues), issues


def test_yaml_keeps_on_and_no_as_strings(tmp_path: Path) -> None:
    locales = tmp_path / "locales"
    write(locales / "en", "x.ftl", "a = A\n")
    file = write(tmp_path, "f.yaml", """
        flow: f
        triggers: [{on: keyword, keywords: [no, yes, on]}]
        start: one
        states: {one: {say: a}}
    """)
    specs, issues = validate_paths(file, Catalogs.load(locales, "en"))
    assert issues == []
    assert specs["f"][0].triggers[0].keywords == ["no", "yes", "on"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("1d", 86400), ("1h30m", 5400), ("45s", 45), ("2w", 1209600), (90, 90), ("0.5h", 1800)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["1x", "", "d", "-1d", "0s", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match=r"bad duration|must be positive"):
        parse_duration(text)


async def test_platform_refuses_invalid_flows_unless_told_to_skip(
        make_platform, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flows = tmp_path / "flows"
    write(flows, "broken.yaml", BROKEN)
    write(flows, "welcome.yaml", (ROOT / "flows" / "welcome.yaml").read_text())
    with pytest.raises(FlowValidationError) as raised:
        await make_platform(flows_dir=flows)
    assert "broken.yaml: states.hello.after.delay" in str(raised.value)

    with caplog.at_level(logging.ERROR, logger="bot_platform.platform"):
        platform = await make_platform(flows_dir=flows, skip_invalid_flows=True)
    assert "welcome" in platform.flows and "broken" not in platform.flows
    assert any("skipped invalid flow file" in r.message and "broken.yaml" in r.message
               for r in caplog.records)


def test_the_documented_example_is_a_valid_flow(tmp_path: Path) -> None:
    from bot_platform.flows.loading import load_yaml
    from bot_platform.flows.spec import FlowSpec, catalog_keys

    doc = (ROOT / "docs" / "flows.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = FlowSpec.model_validate(load_yaml(example))
    keys = {key for state in spec.states.values() for _, key in catalog_keys(state)}
    write(tmp_path / "locales" / "en", "doc-example.ftl", "".join(f"{k} = {k}\n" for k in keys))
    for ftl in (ROOT / "locales" / "en").glob("*.ftl"):
        write(tmp_path / "locales" / "en", ftl.name, ftl.read_text())
    write(tmp_path / "flows", "skin_quiz.yaml", example)
    write(tmp_path / "flows", "welcome.yaml", (ROOT / "flows" / "welcome.yaml").read_text())
    catalogs = Catalogs.load(tmp_path / "locales", "en")
    specs, issues = validate_paths(tmp_path / "flows", catalogs)
    errors = [i for i in issues if i.severity == "error" and "skin_quiz" in i.file]
    assert errors == [] and "skin_quiz" in specs


CAPTURE = """
    flow: code
    triggers: [{on: keyword, keywords: [code]}]
    start: ask
    states:
      ask:
        say: a
        capture: {attribute: answer, type: regex, pattern: "PATTERN", retry: b, goto: done}
      done: {say: c, end: true}
"""


def capture_spec(pattern: str):
    from bot_platform.flows.spec import CaptureSpec

    return CaptureSpec(attribute="x", type="regex", pattern=pattern, retry="r", goto="g")


def test_a_backtracking_pattern_cannot_hang_on_customer_text() -> None:
    from bot_platform.flows.captures import validate_capture

    # With a backtracking engine (Python's re) this takes longer than the universe's age;
    # RE2 answers at once. No timer: the test simply has to finish.
    spec = capture_spec("(a+)+$")
    assert validate_capture(spec, "a" * 50 + "b") == (False, None)
    assert validate_capture(spec, "a" * 50) == (True, "a" * 50)
    assert validate_capture(capture_spec("(x+x+)+y"), "x" * 5000) == (False, None)


def test_captures_bound_the_text_they_match_and_read_every_script() -> None:
    from bot_platform.flows.captures import MAX_MATCHED_CHARS, validate_capture

    spec = capture_spec("a+")
    assert validate_capture(spec, "a" * MAX_MATCHED_CHARS)[0]
    assert validate_capture(spec, "a" * (MAX_MATCHED_CHARS + 1)) == (False, None)
    assert validate_capture(capture_spec(r"\pL+ \pL+"), "Оля Коваль") == (True, "Оля Коваль")


async def test_a_flow_with_a_backtracking_pattern_answers_with_its_retry(
        make_platform, tmp_path: Path) -> None:
    from tests.support.engine import Chat

    write(tmp_path / "locales" / "en", "x.ftl",
          "a = Your code?\nb = Not a code.\nc = Thanks!\ndefault-name = you\n")
    write(tmp_path / "flows", "code.yaml", CAPTURE.replace("PATTERN", "(a+)+$"))
    platform = await make_platform(flows_dir=tmp_path / "flows",
                                   locales_dir=tmp_path / "locales")
    chat = Chat(platform)
    assert [m.text for m in await chat.say("code")] == ["Your code?"]
    assert [m.text for m in await chat.say("a" * 50 + "b")] == ["Not a code."]
    assert [m.text for m in await chat.say("aaaa")] == ["Thanks!"]
