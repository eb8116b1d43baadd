"""The dashboard in a real browser: Playwright driving Debian's Chromium against a live server."""

from pathlib import Path

import pytest

import clare
from conftest import require, require_program

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    require_program(CHROMIUM, "Debian's Chromium (apt-get install chromium; .ci/run does it)")
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    require(sync_api is not None, "playwright", "pip install -r requirements-dev.txt")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def login_cookie(served) -> list[dict]:
    """Return the login cookie of a server, as its /login sets it; none before a server started."""
    if served is None:
        return []
    # Cookies are per host, not per port: it goes to every server of the test (they share the home's token).
    return [{"name": clare.LOGIN_COOKIE, "value": served.config.login_cookie, "url": "http://127.0.0.1"}]


@pytest.fixture
def page_of(browser, serve):
    """Open pages, logged in, that fail the test on any JavaScript error or console error (CSP violations included).

    A refusal the test provokes on purpose is logged by Chromium as a failed load: list its status
    in `page_of.expected_statuses`.
    """
    pages, errors = [], []

    def open_page(*, is_logged_in: bool = True, **options):
        context = browser.new_context(**options)
        if is_logged_in:
            context.add_cookies(login_cookie(serve.served[-1] if serve.served else None))
        pg = context.new_page()
        pg.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
        pg.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        pages.append(pg)
        return pg

    open_page.expected_statuses = set()
    yield open_page
    for pg in pages:
        pg.context.close()
    expected = {f"console: Failed to load resource: the server responded with a status of {s}"
                for s in open_page.expected_statuses}
    assert [e for e in errors if not any(e.startswith(x) for x in expected)] == []


def settle(pg) -> None:
    """Wait until htmx has finished swapping and wired up what it swapped in (a person is never that fast)."""
    pg.wait_for_function("() => !document.querySelector('.htmx-request, .htmx-swapping, .htmx-settling, "
                         ".htmx-added')")


def test_dashboard_renders_and_a_cli_task_appears_without_reload(server, db, cli, page_of):
    clare.create_project(db, "alpha", goal="ship v1", owner="ana", now_ms=1)
    p = clare.create_project(db, "<script>alert(1)</script>", now_ms=2)
    clare.create_task(db, "alpha", "write the parser", priority=1, now_ms=3)
    pg = page_of(viewport={"width": 1280, "height": 900})
    pg.on("dialog", lambda d: pytest.fail(f"a dialog opened: {d.message}"))
    pg.goto(server.url + "/")
    assert pg.locator("h1").inner_text() == "Dashboard"
    assert pg.locator("#frag-projects").get_by_text("<script>alert(1)</script>").count() == 1
    pg.wait_for_function("() => window.htmx !== undefined")
    pg.evaluate("() => { window.notReloaded = true; }")

    assert cli("task", "add", "alpha", "added from the CLI").code == 0
    # One poll is 5 s; allow one more for the request itself.
    pg.locator("#frag-activity").get_by_text("added from the CLI").wait_for(timeout=(clare.POLL_S + 3) * 1000)
    assert pg.locator("#frag-projects").get_by_text("2 todo").count() == 1
    assert pg.evaluate("() => window.notReloaded") is True
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    dark = page_of(viewport={"width": 390, "height": 844}, color_scheme="dark")
    dark.goto(server.url + f"/projects/{p.id}")
    dark.screenshot(path=str(ARTIFACTS / "project-phone-dark.png"), full_page=True)


def test_forms_create_a_project_add_a_task_and_move_it_without_reload(server, db, page_of):
    pg = page_of(viewport={"width": 1280, "height": 900})
    pg.goto(server.url + "/projects")
    pg.wait_for_function("() => window.htmx !== undefined")
    pg.evaluate("() => { window.notReloaded = true; }")
    pg.fill("#project-form input[name=name]", "beta")
    pg.fill("#project-form input[name=goal]", "try the forms")
    pg.click("#project-form button")
    pg.locator("#frag-projects").get_by_role("link", name="beta").wait_for(timeout=5000)
    assert pg.locator("#flash").inner_text() == "Created project beta."
    assert pg.input_value("#project-form input[name=name]") == ""  # the form was reset
    assert pg.evaluate("() => window.notReloaded") is True

    page_of.expected_statuses.add(409)
    pg.fill("#project-form input[name=name]", "beta")  # taken: the reason shows, nothing changes
    pg.click("#project-form button")
    pg.locator("#flash .error").wait_for(timeout=5000)
    assert "exists already" in pg.locator("#flash").inner_text()

    settle(pg)
    pg.locator("#frag-projects").get_by_role("link", name="beta").click()
    pg.wait_for_url("**/projects/*")
    pg.wait_for_function("() => window.htmx !== undefined")
    pg.fill("#task-form input[name=title]", "click through the dashboard")
    pg.select_option("#task-form select[name=priority]", "0")
    pg.click("#task-form button")
    row = pg.locator("#frag-tasks tr", has_text="click through the dashboard")
    row.wait_for(timeout=5000)
    settle(pg)
    row.locator("select[name=status]").select_option("in_progress")
    pg.locator("#flash .ok", has_text="in progress").wait_for(timeout=5000)
    task = clare.list_tasks(db)[0]
    assert (task.title, task.priority, task.status) == ("click through the dashboard", 0, "in_progress")
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "project.png"), full_page=True)


def test_pages_read_fine_without_javascript(server, db, browser):
    clare.create_project(db, "alpha", now_ms=1)
    context = browser.new_context(java_script_enabled=False)
    context.add_cookies(login_cookie(server))
    try:
        pg = context.new_page()
        pg.goto(server.url + "/")
        assert pg.locator("#frag-projects").get_by_role("link", name="alpha").count() == 1
        pg.fill("#project-form input[name=name]", "gamma")
        pg.click("#project-form button")  # a plain form post, then a redirect to the new page
        pg.wait_for_url("**/projects/*")
        assert pg.locator("h1").inner_text() == "gamma"
    finally:
        context.close()


def test_broadcast_form_delivers_to_a_fake_session(server, db, tmux, cli, tmp_path, page_of):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = cli("--json", "pull").json()["sessions"]
    pg = page_of(viewport={"width": 1280, "height": 900})
    pg.goto(server.url + "/broadcast")
    pg.wait_for_function("() => window.htmx !== undefined")
    pg.select_option("#broadcast-form select[name=target]", f"session:{s['id']}")
    pg.locator("#frag-recipients", has_text="1 session").wait_for(timeout=5000)
    settle(pg)
    pg.fill("#broadcast-form textarea[name=text]", "run the tests; then commit")
    pg.click("#broadcast-form button[type=submit]:not(.ghost)")
    pg.locator("#broadcast-result", has_text="delivered").wait_for(timeout=15000)
    assert [x["prompt"] for x in tmux.received()] == ["run the tests; then commit"]
    assert "Sent to 1 of 1 sessions." in pg.locator("#flash").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "broadcast.png"), full_page=True)
