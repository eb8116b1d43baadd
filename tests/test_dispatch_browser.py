"""Starting sessions from the dashboard in a real browser (Playwright driving Debian's Chromium)."""

import pytest

from test_browser import ARTIFACTS, CHROMIUM, browser, page_of, settle  # noqa: F401 (fixtures)
from test_dispatch import fleet, project_with_task, received  # noqa: F401 (fixture)

pytestmark = [pytest.mark.browser]


def test_start_buttons_on_the_project_and_task_pages(server, fleet, cli, tmp_path, page_of):  # noqa: F811
    folder = tmp_path / "code"
    folder.mkdir()
    first = project_with_task(cli, folder)
    second = cli("task", "add", "alpha.v2", "write the tests", "--json").json()["id"]
    pg = page_of(viewport={"width": 1280, "height": 900})
    page_of.expected_statuses.add(400)  # the refused worktree start below
    project_id = cli("project", "show", "alpha.v2", "--json").json()["id"]
    pg.goto(f"{server.url}/projects/{project_id}")
    pg.wait_for_function("() => window.htmx !== undefined")
    assert str(folder) in pg.locator("dl.facts", has_text="Code").inner_text()
    row = pg.locator("#frag-tasks tr", has_text="write the parser")
    row.locator("button", has_text="Start session").click()
    pg.locator("#flash", has_text="started").wait_for(timeout=30000)
    settle(pg)
    sid = cli("task", "show", first, "--json").json()["session_id"]
    assert sid and received(fleet, sid, "prompt")[0].startswith("write the parser")
    assert pg.locator("#frag-tasks tr", has_text="write the parser").locator("button", has_text="Start").count() == 0

    pg.goto(f"{server.url}/tasks/{second}")
    pg.wait_for_function("() => window.htmx !== undefined")
    card = pg.locator("#start-session")
    card.locator("input[name=worktree]").check()
    card.locator("button[type=submit]").click()
    pg.locator("#flash", has_text="is not a git repository").wait_for(timeout=30000)
    settle(pg)
    card.locator("input[name=worktree]").uncheck()
    card.locator("input[name=model]").fill("sonnet")
    card.locator("button[type=submit]").click()
    pg.locator("#flash", has_text="started").wait_for(timeout=30000)
    settle(pg)
    sid2 = cli("task", "show", second, "--json").json()["session_id"]
    argv = received(fleet, sid2, "argv")[0]
    assert argv[argv.index("--model") + 1] == "sonnet"
    assert sid2[:8] in card.inner_text() and "waiting for you" in card.inner_text()
    card.locator("button", has_text="Stop").click()
    pg.locator("#flash", has_text="stopped").wait_for(timeout=30000)
    settle(pg)
    assert received(fleet, sid2, "prompt")[-1] == "/exit"
    card.locator("button", has_text="Resume").click()
    pg.locator("#flash", has_text="started").wait_for(timeout=30000)
    settle(pg)
    assert "--resume" in received(fleet, sid2, "argv")[-1]
    assert card.locator("button", has_text="Stop").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    for name, width, scheme in (("desktop-light", 1280, "light"), ("phone-dark", 390, "dark")):
        shot = page_of(viewport={"width": width, "height": 900}, color_scheme=scheme)
        shot.goto(f"{server.url}/tasks/{second}")
        shot.screenshot(path=str(ARTIFACTS / f"dispatch-task-{name}.png"), full_page=True)
        shot.goto(f"{server.url}/projects/{project_id}")
        shot.screenshot(path=str(ARTIFACTS / f"dispatch-project-{name}.png"), full_page=True)
