"""Flow upload through the admin API: validated, stored as versions, activated explicitly,
picked up by other processes."""

from __future__ import annotations

from bot_platform.apikeys import create_key
from tests.support.engine import Chat
from tests.support.platform import ROOT


async def test_upload_validate_activate(make_platform, tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/flows.sqlite3"
    platform = await make_platform(database_url=url)
    _, key = await create_key(platform.db, name="m", role="marketer", now=platform.clock.now())
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/yaml"}
    original = (ROOT / "flows" / "spring_promo.yaml").read_text()
    changed = original.replace("say: spring-code", "say: spring-bye")
    async with platform.http_client() as client:
        bad = await client.post("/api/flows", headers=headers,
                                content=original.replace("goto: code", "goto: cod"))
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["path"] == "states.hello.buttons[0].goto"
        first = await client.post("/api/flows", headers=headers, content=changed)
        second = await client.post("/api/flows", headers=headers, content=original)
        assert (first.status_code, first.json()["version"], first.json()["active"]) == (
            201, 1, False)
        assert second.json()["version"] == 2
        in_use = {f["flow"]: f for f in (await client.get("/api/flows", headers=headers)
                                         ).json()}
        assert in_use["spring_promo"]["source"] == "file"

        chat = Chat(platform)
        await chat.say("/start promo-spring")
        assert (await chat.say("1"))[0].text.startswith("Your code: SPRING15")
        activated = await client.post("/api/flows/spring_promo/versions/1/activate",
                                      headers=headers)
        assert activated.json()["active"] is True
        await chat.say("/start promo-spring")
        assert (await chat.say("1"))[0].text.startswith("No problem.")  # version 1 now
        versions = (await client.get("/api/flows/spring_promo/versions",
                                     headers=headers)).json()
        assert [(v["version"], v["active"]) for v in versions] == [(1, True), (2, False)]
        in_use = {f["flow"]: f for f in (await client.get("/api/flows", headers=headers)
                                         ).json()}
        assert in_use["spring_promo"]["source"] == "spring_promo v1"

    other = await make_platform(database_url=url)  # another process, same database
    other_chat = Chat(other, user="o1")
    await other_chat.say("/start promo-spring")
    assert (await other_chat.say("1"))[0].text.startswith("No problem.")
