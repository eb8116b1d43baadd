"""The dashboard: pages, htmx fragments, forms, and escaping of everything users and panes write."""

import re
import string

import pytest

import clare
from conftest import observe

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture
def seeded(server, db):
    """A project, two tasks (one assigned, with an update) made through the services."""
    p = clare.create_project(db, "alpha", goal="ship v1", owner="ana", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", priority=1, now_ms=2)
    clare.create_task(db, "alpha", "docs", now_ms=3)
    observe(db, ["7c1e9b22-0000-4000-8000-000000000001"], now_ms=3)
    clare.assign_task(db, t.id, session_id="7c1e9b22", now_ms=4)
    clare.post_update(db, "tokens done", task_ref=t.id, now_ms=5)
    return p, t


def get(server, path):
    r = server.request("GET", path)
    assert r.status == 200, (path, r.status, r.text[:300])
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    return r.text


# --- render ---------------------------------------------------------------

def test_render_escapes_every_value_that_is_not_html():
    t = string.Template('<a title="$title">$body</a>')
    out = clare.render(t, title='"><img src=x onerror=alert(1)>', body=clare.Html("<b>ok</b>"))
    assert out == '<a title="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"><b>ok</b></a>'
    assert isinstance(out, clare.Html)
    assert clare.render(string.Template("$x"), x="it's & <that>") == "it&#x27;s &amp; &lt;that&gt;"


def test_render_refuses_a_missing_value():
    with pytest.raises(KeyError):
        clare.render(string.Template("$a $b"), a=1)


def test_templates_quote_attributes_and_interpolate_nothing_into_style_or_script():
    templates = {name: t.template for name, t in vars(clare).items() if isinstance(t, string.Template)}
    assert "PAGE" in templates and len(templates) > 20
    for name, text in templates.items():
        assert not re.search(r"\s[a-z-]+=\$", text), f"{name}: unquoted attribute value"
        for block in re.findall(r"<(?:style|script)[^>]*>(.*?)</(?:style|script)>", text, re.S):
            assert "$" not in block, f"{name}: a value inside <style> or <script>"
        assert not re.search(r"\bon[a-z]+=\"[^\"]*\$", text), f"{name}: a value inside an on* handler"


def test_poll_attrs_make_a_fragment_replace_itself_every_five_seconds():
    assert clare.poll_attrs("/frag/projects") == \
        'hx-get="/frag/projects" hx-trigger="every 5s" hx-swap="outerHTML"'


# --- pages ----------------------------------------------------------------

def test_dashboard_shows_the_roll_up_activity_and_a_form(server, seeded):
    html = get(server, "/")
    assert "<h1>Dashboard</h1>" in html and 'href="/projects/' in html and "alpha" in html
    assert ">2 todo</span>" in html and ">1 in progress</span>" not in html  # assigning does not start it
    assert 'id="frag-projects"' in html and 'id="frag-activity"' in html
    assert 'src="/static/htmx.min.js?v=2.0.11"' in html
    assert "created project &#x27;alpha&#x27;" in html
    assert '<form class="row" method="post" action="/projects"' in html  # works without JavaScript


def test_the_page_carries_the_csrf_token_for_htmx_and_plain_forms(server, seeded):
    html = get(server, "/")
    token = server.config.csrf_token
    assert f'hx-headers="{{&quot;X-CSRF-Token&quot;: &quot;{token}&quot;}}"' in html
    assert f'<input type="hidden" name="csrf" value="{token}">' in html


def test_project_page_lists_tasks_updates_and_history(server, seeded):
    p, t = seeded
    html = get(server, f"/projects/{p.id}")
    assert "<h1>alpha</h1>" in html and "write the parser" in html and "docs" in html
    assert "tokens done" in html and "session 7c1e9b22" in html and "created project" in html
    assert f'hx-get="/frag/projects/{p.id}/tasks"' in html
    assert get(server, "/projects/alpha").count("<h1>alpha</h1>") == 1  # by name too


def test_task_page_shows_facts_updates_and_history(server, seeded):
    _, t = seeded
    html = get(server, f"/tasks/{t.id[:8]}")
    assert "<h1>write the parser</h1>" in html and "tokens done" in html
    assert "Unassign" in html and f'action="/tasks/{t.id}/assignment"' in html
    assert '<option value="in_progress">in progress</option>' in html


def test_projects_page_lists_projects(server, seeded):
    html = get(server, "/projects")
    assert "<h1>Projects</h1>" in html and "ship v1" in html


def test_fragments_render_exactly_what_the_page_embeds(server, seeded):
    p, t = seeded
    for page_path, frag_path, frag_id in (
            ("/", "/frag/projects", "frag-projects"), ("/", "/frag/activity", "frag-activity"),
            (f"/projects/{p.id}", f"/frag/projects/{p.id}/tasks", "frag-tasks"),
            (f"/tasks/{t.id}", f"/frag/tasks/{t.id}", "frag-task"),
            (f"/tasks/{t.id}", f"/frag/tasks/{t.id}/updates", "frag-updates")):
        frag = get(server, frag_path)
        assert f'id="{frag_id}"' in frag and f'hx-get="{frag_path}"' in frag and 'hx-trigger="every 5s"' in frag
        assert frag in get(server, page_path), frag_path
        assert "<html" not in frag


def test_unknown_pages_are_html_404s(server, seeded):
    for path in ("/nothing", "/projects/nope", "/tasks/ffffff", "/frag/tasks/ffffff"):
        r = server.request("GET", path)
        assert r.status == 404 and r.headers["content-type"].startswith("text/html"), path
        assert "<h1>404</h1>" in r.text


def test_with_a_token_pages_need_the_login_cookie(serve):
    token = "t0ken-" + "w" * 20
    s = serve(token=token)
    r = s.request("GET", "/", auth=False)
    assert r.status == 401 and "login URL" in r.text and token not in r.text
    cookie = s.request("GET", f"/login?token={token}", auth=False).headers["set-cookie"].split(";")[0]
    r = s.request("GET", "/", auth=False, headers={"Cookie": cookie})
    assert r.status == 200 and token not in r.text


# --- forms ----------------------------------------------------------------

def test_creating_a_project_by_htmx_returns_the_new_roll_up_and_a_fresh_form(server, seeded):
    r = server.form("/projects", {"name": "beta", "goal": "g"})
    assert r.status == 200 and 'id="frag-projects"' in r.text and ">beta</a>" in r.text
    assert 'id="project-form" hx-swap-oob="true"' in r.text and "Created project beta." in r.text
    assert [p.name for p in clare.list_projects(clare.open_db(server.config.db_path))] == ["alpha", "beta"]


def test_a_plain_form_post_redirects_to_the_new_page(server, seeded):
    r = server.request("POST", "/projects", body=f"name=gamma&csrf={server.config.csrf_token}".encode(),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 303 and r.headers["location"].startswith("/projects/")
    assert "<h1>gamma</h1>" in get(server, r.headers["location"])


def test_a_refused_form_shows_its_reason_in_the_flash_box(server, seeded):
    r = server.form("/projects", {"name": "alpha"})
    assert r.status == 409 and r.headers["hx-retarget"] == "#flash"
    assert 'class="flash error"' in r.text and "exists already" in r.text
    r = server.request("POST", "/projects", body=f"name=&csrf={server.config.csrf_token}".encode(),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 422 and "<h1>422</h1>" in r.text


def test_forms_without_the_csrf_token_or_from_another_site_are_refused(server, seeded):
    assert server.form("/projects", {"name": "x"}, csrf=False).status == 403
    assert server.form("/projects", {"name": "x", "csrf": "wrong"}, csrf=False).status == 403
    assert server.form("/projects", {"name": "x"}, headers={"Origin": "http://evil.example"}).status == 403
    r = server.request("POST", "/projects", body=b'{"name": "x"}', headers={
        "Content-Type": "text/plain", "X-CSRF-Token": server.config.csrf_token})
    assert r.status == 415
    assert [p.name for p in clare.list_projects(clare.open_db(server.config.db_path))] == ["alpha"]


def test_task_forms_add_move_assign_and_note(server, seeded):
    p, t = seeded
    r = server.form(f"/projects/{p.id}/tasks", {"title": "benchmarks", "priority": "0", "description": "d"})
    assert r.status == 200 and 'id="frag-tasks"' in r.text and "benchmarks" in r.text
    assert server.form(f"/projects/{p.id}/tasks", {"title": "x", "priority": "high"}).status == 422
    r = server.form(f"/tasks/{t.id}/status", {"status": "blocked", "view": "tasks"})
    assert r.status == 200 and 'id="frag-tasks"' in r.text and '<option value="blocked" selected>' in r.text
    r = server.form(f"/tasks/{t.id}/status", {"status": "done", "view": "task"})
    assert 'id="frag-task"' in r.text and '<option value="done" selected>' in r.text
    r = server.form(f"/tasks/{t.id}/unassign", {"view": "task"})
    assert r.status == 200 and "Unassign" not in r.text
    r = server.form(f"/tasks/{t.id}/assignment", {"session_id": "7c1e9b", "group": "", "view": "task"})
    assert "session 7c1e9b22" in r.text
    r = server.form(f"/tasks/{t.id}/updates", {"text": "half way"})
    assert r.status == 200 and 'id="frag-updates"' in r.text and "half way" in r.text
    r = server.form(f"/projects/{p.id}/status", {"status": "paused"})
    assert r.status == 200 and "now paused" in r.text and 'id="project-head" hx-swap-oob="true"' in r.text
    db = clare.open_db(server.config.db_path)
    task = clare.get_task(db, t.id)
    assert (task.status, task.session_id) == ("done", "7c1e9b22-0000-4000-8000-000000000001")
    assert clare.get_project(db, "alpha").status == "paused"


# --- escaping ---------------------------------------------------------------

def test_a_hostile_name_renders_as_text_everywhere(server, db):
    p = clare.create_project(db, EVIL, goal=EVIL, owner=EVIL, now_ms=1)
    t = clare.create_task(db, p.id, EVIL, description=EVIL, now_ms=2)
    clare.post_update(db, EVIL, task_ref=t.id, now_ms=3)
    clare.create_group(db, EVIL, cwd="/srv", now_ms=4)
    for path in ("/", "/projects", f"/projects/{p.id}", f"/tasks/{t.id}", "/frag/projects", "/frag/activity",
                 f"/frag/projects/{p.id}/tasks", f"/frag/tasks/{t.id}", f"/frag/tasks/{t.id}/updates"):
        html = get(server, path)
        assert EVIL not in html and "alert(1)</" not in html, path
        assert EVIL_ESCAPED in html, path
        assert html.count("<script") == (2 if path[:5] != "/frag" else 0), path  # htmx and clare.js
    r = server.form("/projects", {"name": EVIL})
    assert r.status == 409 and EVIL not in r.text and EVIL_ESCAPED in r.text


# --- sessions ---------------------------------------------------------------

S1, S2, S3 = ("aaaa0001-0000-4000-8000-000000000001", "bbbb0002-0000-4000-8000-000000000002",
              "cccc0003-0000-4000-8000-000000000003")


def test_sessions_that_wait_come_first_longest_waiting_on_top(server, db):
    observe(db, [{"session_id": S1, "state": "working", "label": "busy one"},
                 {"session_id": S2, "label": "waits long"}, {"session_id": S3, "label": "waits short"}], now_ms=1000)
    observe(db, [{"session_id": S1, "state": "working", "label": "busy one"},
                 {"session_id": S2, "label": "waits long"},
                 {"session_id": S3, "label": "waits short", "state": "permission"}], now_ms=9000)
    frag = get(server, "/frag/attention")
    assert 'hx-get="/frag/attention"' in frag and "hx-disable" in frag
    # Triage: a permission dialog first, then the longest waiting.
    assert frag.index("waits short") < frag.index("waits long") and "busy one" not in frag
    assert "needs permission" in frag and "waiting for you" in frag
    html = get(server, "/")
    assert html.index('id="frag-attention"') < html.index('id="frag-projects"') < html.index('id="frag-fleet"')


def test_fleet_shows_every_session_with_its_task(server, db):
    observe(db, [{"session_id": S1, "state": "working", "label": "parser work", "cwd": "/srv/api"}], now_ms=1000)
    clare.create_project(db, "alpha", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", now_ms=2)
    clare.assign_task(db, t.id, session_id=S1[:8], now_ms=3)
    frag = get(server, "/frag/fleet")
    assert "parser work" in frag and "/srv/api" in frag and f'<a href="/tasks/{t.id}">write the parser</a>' in frag
    assert ">working</span>" in frag and "<tbody hx-disable>" in frag
    html = get(server, "/sessions")
    assert "<h1>Sessions</h1>" in html and frag in html and 'id="frag-attention"' in html
    assert f'<option value="{S1}" selected>' in get(server, f"/tasks/{t.id}")  # the assign picker offers it
    assert '<td class="hide-sm small">1 <span' in get(server, "/frag/projects")  # one session works on alpha


def test_no_sessions_says_how_to_see_them(server, db):
    # serve pulls by itself: the page names it, not a command the user need not run
    fleet = get(server, "/frag/fleet")
    assert "clare serve" in fleet and "clare pull" not in fleet and "clare pull" not in get(server, "/sessions")
    assert "Nobody is waiting on you." in get(server, "/frag/attention")


def test_text_from_transcripts_and_panes_renders_as_text(server, db):
    observe(db, [{"session_id": S1, "label": EVIL, "cwd": "/srv/" + EVIL, "tmux_target": EVIL + ":0.0"}],
            now_ms=1000)
    for path in ("/", "/sessions", "/frag/fleet", "/frag/attention"):
        html = get(server, path)
        assert EVIL not in html and EVIL_ESCAPED in html, path


# --- broadcast ----------------------------------------------------------------

def test_broadcast_composer_offers_projects_groups_and_sessions(server, db):
    observe(db, [{"session_id": S1, "label": "parser work"}], now_ms=1000)
    clare.create_project(db, "alpha", now_ms=1)
    clare.create_group(db, "backend", cwd="/srv", now_ms=2)
    html = get(server, "/broadcast")
    assert "<h1>Broadcast</h1>" in html and '<optgroup label="Projects">' in html
    assert '<option value="group:backend">backend</option>' in html and f'value="session:{S1}"' in html
    assert 'hx-get="/frag/broadcast/recipients" hx-trigger="change"' in html
    assert 'id="frag-recipients"' in html and 'id="broadcast-result"' in html


def test_recipients_preview_lists_who_gets_it(server, db):
    observe(db, [{"session_id": S1, "label": EVIL, "state": "permission"}], now_ms=1000)
    frag = get(server, f"/frag/broadcast/recipients?target=session:{S1[:8]}")
    assert "1 session" in frag and EVIL_ESCAPED in frag and EVIL not in frag and "will be refused" in frag
    assert "Pick a project" in get(server, "/frag/broadcast/recipients")
    assert get(server, f"/broadcast?target=session:{S1}").count(EVIL_ESCAPED) >= 2  # works without JS too


def test_sending_shows_each_sessions_result(server, db):
    observe(db, [{"session_id": S1, "label": "no pane"}], now_ms=1000)  # outside tmux: refused, not typed
    r = server.form("/broadcast", {"target": f"session:{S1}", "text": "run the tests"})
    assert r.status == 200 and 'id="broadcast-result"' in r.text
    assert ">refused</span>" in r.text and "tmux pane" in r.text and "Sent to 0 of 1 sessions." in r.text
    assert 'hx-trigger="every 5s"' not in r.text.split("</section>")[0]  # nothing left to wait for
    [d] = clare.list_deliveries(db)
    assert get(server, f"/frag/broadcasts/{d.broadcast_id}").count(">refused</span>") == 1
    r = server.request("POST", "/broadcast", body=f"target=session:{S1}&text=hi&csrf={server.config.csrf_token}"
                       .encode(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 200 and "<h1>Broadcast</h1>" in r.text and ">refused</span>" in r.text
    assert server.form("/broadcast", {"target": f"session:{S1}", "text": "x"}, csrf=False).status == 403


def test_a_page_is_built_again_as_soon_as_the_log_grows(server, db):
    calls = []

    def page(req):
        calls.append(req.path)
        return clare.html_response(clare.Html(str(len(calls))))

    cached = clare.cached(page)
    req = clare.Request("GET", "/x", {}, {}, b"", {}, db, server.config)
    assert [cached(req).body, cached(req).body] == [b"1", b"1"]  # nothing changed: built once
    clare.create_project(db, "alpha", now_ms=1)
    assert cached(req).body == b"2"
    other = clare.Request("GET", "/x", {"target": ["a"]}, {}, b"", {}, db, server.config)
    assert cached(other).body == b"3"  # another query string is another page
    html = get(server, "/frag/projects")
    clare.create_project(db, "beta", now_ms=2)
    assert ">beta</a>" not in html and ">beta</a>" in get(server, "/frag/projects")


def test_cli_and_dashboard_show_tokens_and_ages_alike(db, server, cli):
    now = clare.now_ms()
    observe(db, [{"session_id": "5e55a0b2-0000-4000-8000-000000000001", "label": "alike",
                  "tokens": {"input": 1000, "output": 500}, "last_activity_ms": now - 3 * 3_600_000}], now_ms=now)
    dashboard = server.request("GET", "/frag/fleet").text
    status = cli("status").out
    for text in ("1.5k", "3.0 h ago"):
        assert text in dashboard and text in status, text
    assert clare.tokens_text({}) == "—" and clare.ago_text(None, now) == "never"
    assert clare.short_text("a\n  b  c", 4) == "a b…"
