"""The project page's dispatch switch in a real browser (Playwright driving Debian's Chromium)."""

import pytest

import clare
from test_browser import ARTIFACTS, CHROMIUM, browser, page_of, settle  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.browser]


def test_the_dispatch_switch_turns_dispatch_on_and_off_and_names_the_dispatcher(server, db, cli, page_of):  # noqa: F811
    assert cli("project", "new", "api", "--goal", "ship the parser").code == 0
    cli("task", "add", "api", "write the parser", "--prio", "1")
    db.conn.execute("INSERT INTO sync_peers (url, name, machine_id) VALUES ('http://a:1', 'apricot', 'm-apricot')")
    project_id = cli("project", "show", "api", "--json").json()["id"]
    pg = page_of(viewport={"width": 1280, "height": 900})
    pg.goto(f"{server.url}/projects/{project_id}")
    pg.wait_for_function("() => window.htmx !== undefined")
    card = pg.locator("#dispatch-card")
    assert "Off: sessions that finish a task wait for you." in card.inner_text()
    assert card.locator("select[name=dispatcher]").input_value() == "testhost"  # this host, until one is named
    card.locator("input[name=dispatch]").check()
    card.locator("input[name=max_sessions]").fill("3")
    card.locator("button[type=submit]").click()
    pg.locator("#flash", has_text="Dispatch for api is on, decided by testhost").wait_for(timeout=10000)
    settle(pg)
    p = clare.get_project(db, "api")
    assert (p.is_dispatching, p.max_sessions, p.dispatcher) == (True, 3, "testhost")
    assert "testhost types the next ready task into it, and starts sessions while fewer than 3 run" in \
        card.inner_text()
    card.locator("select[name=dispatcher]").select_option("m-apricot")
    card.locator("button[type=submit]").click()
    pg.locator("#flash", has_text="decided by m-apricot").wait_for(timeout=10000)
    settle(pg)
    assert clare.get_project(db, "api").dispatcher == "m-apricot"
    pg.goto(server.url + "/")
    assert "dispatch on" in pg.locator("#frag-projects tr", has_text="api").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    for name, width, scheme in (("desktop-light", 1280, "light"), ("desktop-dark", 1280, "dark"),
                                ("phone-light", 390, "light"), ("phone-dark", 390, "dark")):
        shot = page_of(viewport={"width": width, "height": 900}, color_scheme=scheme)
        shot.goto(f"{server.url}/projects/{project_id}")
        shot.screenshot(path=str(ARTIFACTS / f"autodispatch-project-{name}.png"), full_page=True)
    pg.goto(f"{server.url}/projects/{project_id}")
    card = pg.locator("#dispatch-card")
    card.locator("input[name=dispatch]").uncheck()
    card.locator("button[type=submit]").click()
    pg.locator("#flash", has_text="Dispatch for api is off").wait_for(timeout=10000)
    settle(pg)
    assert clare.get_project(db, "api").is_dispatching is False
