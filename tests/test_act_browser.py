"""Act in a real browser: the session page and its live pane, pickers, needs-you keys, title count, notifications."""

import pytest

import clare
import test_browser
from conftest import observe, wait_for
from test_browser import ARTIFACTS, settle

browser, page_of = test_browser.browser, test_browser.page_of  # the shared fixtures: Chromium, checked pages
pytestmark = pytest.mark.browser
S1, S2, S3, S4 = ("aaaa0001-0000-4000-8000-000000000001", "bbbb0002-0000-4000-8000-000000000002",
                  "cccc0003-0000-4000-8000-000000000003", "dddd0004-0000-4000-8000-000000000004")
WIDTHS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def ready(pg) -> None:
    pg.wait_for_function("() => window.htmx !== undefined")
    settle(pg)


def test_session_page_live_pane_refreshes_and_its_picker_sets_the_task(server, db, tmux, cli, tmp_path, page_of):
    pane = tmux.spawn_claude("--greet", cwd=tmp_path / "proj", name="work")
    assert cli("pull").code == 0
    [s] = clare.list_sessions(db)
    clare.create_project(db, "alpha", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", priority=1, now_ms=2)
    pg = page_of(viewport=WIDTHS["desktop"])
    pg.goto(server.url + f"/sessions/{s.id}")
    ready(pg)
    pg.evaluate("() => { window.notReloaded = true; }")
    assert "fake claude" in pg.locator("#frag-pane pre.pane").inner_text()
    assert "hello to you" in pg.locator("#frag-turns").inner_text()
    tmux.run("send-keys", "-t", pane, "-l", "live pane check")  # typed at the terminal, not submitted
    pg.locator("#frag-pane pre.pane", has_text="> live pane check").wait_for(timeout=8000)  # refreshed in place
    lines = pg.locator("#frag-pane pre.pane").inner_text().splitlines()
    assert any(line.startswith("* fake claude") for line in lines) and len(lines) >= 2  # newlines kept
    pg.select_option("#session-task select[name=task]", t.id)
    pg.click("#session-task button")
    pg.locator("#frag-session", has_text="alpha: write the parser").wait_for(timeout=5000)
    pg.locator("#flash .ok", has_text="now works on write the parser").wait_for(timeout=5000)
    pg.locator("#frag-history", has_text="assigned task").wait_for(timeout=5000)
    assert clare.get_task(db, t.id).session_id == s.id and pg.evaluate("() => window.notReloaded") is True
    attach = pg.locator("#attach-cmd").inner_text()
    assert attach == f"tmux -S {tmux.socket} attach -t work:0.0"
    pg.click("#attach button[data-copy]")
    pg.wait_for_function("() => document.querySelector('#attach button[data-copy]').innerText !== 'Copy'",
                         timeout=5000)  # the label changes after the clipboard call settles
    label = pg.locator("#attach button[data-copy]").inner_text()
    assert label in ("Copied", "Selected: press Ctrl+C")
    if label.startswith("Selected"):  # no clipboard here: the command is selected for Ctrl+C
        assert pg.evaluate("() => window.getSelection().toString()") == attach
    shot(pg, "session-desktop-light")
    for name, options in (("phone-dark", {"viewport": WIDTHS["phone"], "color_scheme": "dark"}),
                          ("desktop-dark", {"viewport": WIDTHS["desktop"], "color_scheme": "dark"}),
                          ("phone-light", {"viewport": WIDTHS["phone"]})):
        other = page_of(**options)
        other.goto(server.url + f"/sessions/{s.id}")
        ready(other)
        width = other.evaluate("() => document.documentElement.scrollWidth")
        assert width <= options["viewport"]["width"], f"{name}: the page scrolls sideways ({width} px)"
        shot(other, f"session-{name}")


def test_needs_you_is_ordered_for_triage_with_keys_and_a_title_count(server, db, page_of):
    observe(db, [{"session_id": S1, "label": "waits long"}, {"session_id": S2, "state": "working", "label": "busy"},
                 {"session_id": S3, "label": "waits short"}], now_ms=1000)
    observe(db, [{"session_id": S1, "label": "waits long"}, {"session_id": S2, "state": "permission", "label": "asks"},
                 {"session_id": S3, "label": "waits short"}], now_ms=5000)
    pg = page_of(viewport=WIDTHS["desktop"])
    pg.goto(server.url + "/needs")
    ready(pg)
    assert pg.title() == "(3) Needs you · Clare"
    assert pg.locator("#nav-needs").inner_text() == "3"
    labels = pg.locator("#frag-attention li b").all_inner_texts()
    assert labels == ["asks", "waits long", "waits short"]  # permission first, then the longest waiting
    current = "#frag-attention li.is-current b"
    pg.keyboard.press("j")
    assert pg.locator(current).inner_text() == "asks"
    pg.keyboard.press("j")
    pg.keyboard.press("j")
    pg.keyboard.press("k")
    assert pg.locator(current).inner_text() == "waits long"
    pg.keyboard.press("?")
    assert pg.locator("details#keys").get_attribute("open") is not None
    pg.keyboard.press("/")
    assert pg.evaluate("() => document.activeElement.id") == "filter"
    pg.keyboard.type("short")
    assert pg.locator("#frag-attention li:visible b").all_inner_texts() == ["waits short"]
    pg.keyboard.press("Control+A")
    pg.keyboard.press("Delete")  # an empty filter shows every row again
    pg.keyboard.press("Escape")  # leaves the filter: keys move again
    shot(pg, "needs-desktop-light")
    # A fourth session starts to wait: the count in the tab's title follows without a reload.
    observe(db, [{"session_id": S1, "label": "waits long"}, {"session_id": S2, "state": "permission", "label": "asks"},
                 {"session_id": S3, "label": "waits short"}, {"session_id": S4, "label": "new one"}], now_ms=9000)
    pg.wait_for_function("() => document.title === '(4) Needs you · Clare'", timeout=(clare.POLL_S + 4) * 1000)
    assert pg.locator(current).inner_text() == "waits long"  # the row stays current across polls
    pg.keyboard.press("j")
    pg.keyboard.press("o")
    pg.wait_for_url(f"**/sessions/{S3}")
    phone = page_of(viewport=WIDTHS["phone"], color_scheme="dark")
    phone.goto(server.url + "/needs")
    ready(phone)
    shot(phone, "needs-phone-dark")


def test_browser_notifications_are_opt_in_and_fire_once_per_new_need(browser, server, db):
    observe(db, [{"session_id": S1, "state": "working", "label": "busy"}], now_ms=1000)
    context = browser.new_context(viewport=WIDTHS["desktop"])
    context.add_cookies(test_browser.login_cookie(server))
    # Headless Chromium shows no desktop notifications: record what the page asks for instead.
    context.add_init_script("""window.__notes = [];
        window.Notification = function (title, options) { window.__notes.push([title, options.body, options.tag]); };
        window.Notification.permission = 'default';
        window.Notification.requestPermission = function () {
            window.Notification.permission = 'granted'; return Promise.resolve('granted'); };""")
    try:
        pg = context.new_page()
        pg.goto(server.url + "/")
        ready(pg)
        optin = pg.locator("#notify-optin")
        assert optin.is_visible() and pg.evaluate("() => window.isSecureContext")  # 127.0.0.1 is a secure context
        optin.click()
        pg.wait_for_function("() => localStorage.getItem('clare-notify') === 'on'")
        with clare.write_txn(db) as cur:
            clare.record(db, cur, "session.changed", {"session_id": S1, "host": db.machine_id, "state": "permission",
                                                      "asked": {"tool": "Bash", "input": "rm -rf build"}},
                         now_ms=2000)
        pg.wait_for_function("() => window.__notes.length > 0", timeout=(clare.POLL_S + 4) * 1000)
        pg.wait_for_timeout((clare.POLL_S + 1) * 1000)  # one more poll: the same need does not notify again
        notes = pg.evaluate("() => window.__notes")
        assert notes == [["needs permission: busy", "Bash: rm -rf build", notes[0][2]]]
        assert pg.title() == "(1) Dashboard · Clare"
    finally:
        context.close()


def test_task_page_picker_lists_live_sessions_by_label_and_history_follows(server, db, page_of):
    observe(db, [{"session_id": S1, "label": "parser work", "cwd": "/srv/api"},
                 {"session_id": S2, "label": "docs work", "cwd": "/srv/docs"}], now_ms=1000)
    clare.create_project(db, "alpha", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", now_ms=2)
    pg = page_of(viewport=WIDTHS["desktop"])
    pg.goto(server.url + f"/tasks/{t.id}")
    ready(pg)
    options = pg.locator("select[name=session_id] option").all_inner_texts()
    assert any(o.startswith("parser work · no project · testhost · /srv/api") for o in options), options
    pg.select_option("select[name=session_id]", S1)
    pg.click("form:has(select[name=session_id]) button")
    pg.locator("#frag-task", has_text=f"session {S1[:8]}").wait_for(timeout=5000)
    pg.locator("#frag-history", has_text="assigned task").wait_for(timeout=5000)  # the history card follows


def test_a_form_error_shows_where_the_person_looks_and_phone_tables_fit(server, db, page_of):
    clare.create_project(db, "beta", now_ms=1)
    p = clare.create_project(db, "gamma", now_ms=2)
    for i in range(30):
        clare.create_task(db, p.id, f"task number {i} with a title long enough to wrap on a phone", now_ms=10 + i)
    observe(db, [{"session_id": S1, "label": "parser work", "cwd": "/srv/api/with/a/rather/long/folder/name"}],
            now_ms=1000)
    pg = page_of(viewport=WIDTHS["phone"])
    page_of.expected_statuses.add(409)
    pg.goto(server.url + "/projects")
    ready(pg)
    pg.locator("#project-form input[name=name]").scroll_into_view_if_needed()
    pg.fill("#project-form input[name=name]", "beta")
    pg.click("#project-form button")
    error = pg.locator("#flash .error")
    error.wait_for(timeout=5000)
    box, height = error.bounding_box(), pg.evaluate("() => window.innerHeight")
    assert 0 <= box["y"] and box["y"] + box["height"] <= height, (box, height)  # in view, not 1,200 px above it
    pg.goto(server.url + "/sessions")
    ready(pg)
    row = pg.locator("#frag-fleet tr", has_text="parser work")
    for text in ("parser work", "testhost", "/srv/api"):  # not only state and id
        cell = row.get_by_text(text).first
        b = cell.bounding_box()
        assert b is not None and b["x"] + b["width"] <= WIDTHS["phone"]["width"], text
    shot(pg, "sessions-phone-light")
    pg.goto(server.url + f"/projects/{p.id}")
    ready(pg)
    select = pg.locator("#frag-tasks select[name=status]").last
    select.scroll_into_view_if_needed()
    b = select.bounding_box()
    assert b["x"] >= 0 and b["x"] + b["width"] <= WIDTHS["phone"]["width"]  # the status menu is not clipped
    shot(pg, "project-phone-light")


def test_session_page_reads_and_its_picker_works_without_javascript(browser, server, db):
    observe(db, [{"session_id": S1, "label": "parser work", "state": "permission"}], now_ms=1000)
    clare.create_project(db, "alpha", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", now_ms=2)
    context = browser.new_context(java_script_enabled=False)
    context.add_cookies(test_browser.login_cookie(server))
    try:
        pg = context.new_page()
        pg.goto(server.url + f"/sessions/{S1}")
        assert pg.locator("h1").inner_text() == "parser work"
        assert "no live tmux pane" in pg.locator("#frag-pane").inner_text()
        pg.select_option("#session-task select[name=task]", t.id)
        pg.click("#session-task button")  # a plain post, then the page again
        pg.wait_for_url(f"**/sessions/{S1}")
        assert "alpha: write the parser" in pg.locator("#frag-session").inner_text()
        pg.goto(server.url + "/needs?q=nothing-matches")
        assert "Nobody is waiting on you." in pg.locator("#frag-attention").inner_text()
        pg.goto(server.url + "/needs?q=parser")
        assert pg.locator("#frag-attention li").count() == 1
    finally:
        context.close()


def test_answering_a_dialog_from_the_session_page_and_from_needs_you_on_a_phone(server, db, tmux, cli, tmp_path,
                                                                                 page_of):
    cli("hooks", "install")
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    tmux.type_prompt(pane, "perm")
    wait_for(lambda: (clare.list_sessions(db) or [None])[0] and clare.list_sessions(db)[0].asked, what="the dialog")
    assert cli("pull").code == 0
    [s] = clare.list_sessions(db)
    pg = page_of(viewport=WIDTHS["desktop"])
    asked = []
    pg.on("dialog", lambda d: (asked.append(d.message), d.accept()))
    pg.goto(server.url + f"/sessions/{s.id}")
    ready(pg)
    shot(pg, "answer-desktop-light")
    pg.click("#answer button:has-text('Approve')")
    pg.locator("#flash .ok", has_text="typed 1 (Yes)").wait_for(timeout=8000)
    assert asked == ["Approve — Bash: rm -rf build?"]  # confirmed first
    assert [x.get("key") for x in tmux.received() if "prompt" not in x] == ["1"]
    pg.locator("#frag-history", has_text="dashboard answered approve").wait_for(timeout=5000)
    tmux.type_prompt(pane, "perm")  # a second dialog, answered from the needs-you list on a phone
    wait_for(lambda: (clare.list_sessions(db)[0].asked or {}).get("tool_use_id") == "toolu_fake_002",
             what="the second dialog")
    phone = page_of(viewport=WIDTHS["phone"], color_scheme="dark")
    phone.on("dialog", lambda d: d.accept())
    phone.goto(server.url + "/needs")
    ready(phone)
    shot(phone, "answer-needs-phone-dark")
    phone.click("#frag-attention button:has-text('Deny')")
    phone.locator("#flash .ok", has_text="typed 2").wait_for(timeout=8000)
    assert [x.get("key") for x in tmux.received() if "prompt" not in x] == ["1", "2"]
