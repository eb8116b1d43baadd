"""Daily use (#22) in a real browser: tags and a removed task on the dashboard, the 401 page's login form."""

from test_browser import ARTIFACTS, browser, page_of, pytestmark, settle  # noqa: F401 (fixtures used by name)


def test_tags_show_and_a_removed_task_leaves_the_dashboard_but_keeps_its_page(server, run_clare, page_of):  # noqa: F811
    run_clare("project", "new", "alpha")
    kept = run_clare("task", "add", "alpha", "write the parser", "--tag", "backend", "--tag", "urgent", "--json").json()
    gone = run_clare("task", "add", "alpha", "wirte teh parser", "--json").json()
    assert run_clare("task", "rm", gone["id"][:8]).code == 0
    pg = page_of(viewport={"width": 1280, "height": 900})
    pg.goto(f"{server.url}/projects/{kept['project_id']}")
    tasks = pg.locator("#frag-tasks")
    row = tasks.locator("tr", has_text="write the parser")
    assert row.locator(".badge", has_text="#backend").count() == 1
    assert row.locator(".badge", has_text="#urgent").count() == 1
    assert tasks.get_by_text("wirte teh parser").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "daily-tags.png"), full_page=True)

    pg.goto(f"{server.url}/tasks/{gone['id']}")  # its own page still answers: history stays
    card = pg.locator("#frag-task")
    assert card.locator(".removed").inner_text().startswith("removed This task was removed")
    assert f"clare task restore {gone['id'][:8]}" in card.inner_text()
    assert pg.get_by_text(f"removed task {gone['id'][:8]}").count() == 1

    assert run_clare("task", "restore", gone["id"][:8]).code == 0  # back on the project page at the next poll
    pg.goto(f"{server.url}/projects/{kept['project_id']}")
    settle(pg)
    # Another process's write reaches a cached page within PAGE_MAX_STALE_S, and the next poll shows it.
    pg.locator("#frag-tasks").get_by_text("wirte teh parser").wait_for(timeout=15_000)
    assert pg.locator("#frag-tasks").get_by_text("wirte teh parser").count() == 1


def test_the_401_page_has_a_token_field_that_logs_in(serve, page_of):  # noqa: F811
    token = "t0ken-for-the-daily-browser-test"
    server = serve(token=token)
    page_of.expected_statuses = {401}
    pg = page_of(viewport={"width": 390, "height": 844}, color_scheme="dark", is_logged_in=False)
    answer = pg.goto(server.url + "/")
    assert answer.status == 401
    assert pg.locator("a", has_text="Back to the dashboard").count() == 0  # it would only answer 401 again
    pg.fill("input[name=token]", "wrong-token-of-enough-length")
    pg.click("button[type=submit]")
    assert pg.locator("h1").inner_text() == "401"
    pg.fill("input[name=token]", token)
    pg.click("button[type=submit]")
    pg.wait_for_url(server.url + "/")
    assert pg.locator("h1").inner_text() == "Dashboard"
