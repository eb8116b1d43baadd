"""Issue #12: a token on every bind, strict input at every door, private files, handler slots."""

import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

import clare
from conftest import CLARE_PY, ROOT, wait_for

RELEASE_DB = ROOT / "tests" / "data" / "release-0.1.0.db"
RELEASE_LOG = ROOT / "tests" / "data" / "release-0.1.0.jsonl"


def raw(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def event(event_type: str, payload: dict, *, wall_ms: int | None = None, machine_id: str = "peer") -> dict:
    """Return one well-formed event as a peer would send it."""
    wall_ms = clare.now_ms() if wall_ms is None else wall_ms
    return {"uuid": clare.new_uuid(), "hlc": f"{wall_ms:013d}.000000.{machine_id}", "machine_id": machine_id,
            "event_type": event_type, "payload": payload, "created_at": clare.iso_ms(wall_ms)}


def project_event(name: str, **extra) -> dict:
    return event("project.created", {"project_id": clare.new_id(), "name": name, "goal": "", "owner": "",
                                     "status": "active", **extra})


# --- 1. a token on every bind ---------------------------------------------------------------

def test_a_first_serve_makes_a_token_and_keeps_it_private_in_clare_toml(home, db):
    paths = clare.resolve_paths()
    config = clare.web_config(paths, host="127.0.0.1", port=0, env={})
    assert config.token and len(config.token) >= clare.MIN_TOKEN_CHARS
    toml = home / "clare.toml"
    assert stat.S_IMODE(toml.stat().st_mode) == 0o600
    assert clare.load_config(str(toml))["token"] == config.token
    assert clare.web_config(paths, host="127.0.0.1", port=0, env={}).token == config.token  # made once


def test_an_explicit_token_wins_and_nothing_is_written(home, db):
    paths = clare.resolve_paths()
    config = clare.web_config(paths, host="127.0.0.1", port=0, env={"CLARE_TOKEN": "e" * 24})
    assert config.token == "e" * 24 and not (home / "clare.toml").exists()
    (home / "clare.toml").write_text('token = "' + "f" * 24 + '"\n# mine\n')
    assert clare.web_config(paths, host="127.0.0.1", port=0, env={}).token == "f" * 24
    assert (home / "clare.toml").read_text() == 'token = "' + "f" * 24 + '"\n# mine\n'


def test_a_token_is_added_to_an_existing_clare_toml_without_touching_the_rest(home, db, cli):
    assert cli("peer", "add", "http://10.9.0.2:8765", "--name", "b").code == 0
    before = clare.load_config(str(home / "clare.toml"))
    config = clare.web_config(clare.resolve_paths(), host="127.0.0.1", port=0, env={})
    after = clare.load_config(str(home / "clare.toml"))
    assert after == {**before, "token": config.token}


def _sample_path(pattern: re.Pattern) -> str:
    """Return a path that the route's pattern matches, each named group filled with a value it takes."""
    def fill(m: re.Match) -> str:
        group = re.compile(m.group(2))
        return next(v for v in ("0" * 32, "2026-01-02", "x.js", "x") if group.fullmatch(v))
    path = re.sub(r"\(\?P<(\w+)>((?:[^()]|\([^()]*\))*)\)", fill, pattern.pattern).replace("\\", "")
    assert pattern.fullmatch(path), (pattern.pattern, path)
    return path


def test_every_route_but_login_and_static_refuses_a_request_without_the_token(serve):
    s = serve()
    public = []
    for method, pattern, _ in clare.ROUTES:
        path = _sample_path(pattern)
        if path == "/login" or path.startswith("/static/"):
            public.append(path)
            continue
        headers = {"Content-Type": "application/json"} if path.startswith("/api/") else \
            {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": s.config.csrf_token}
        r = s.request(method, path, body=b"{}" if method != "GET" else None, headers=headers, auth=False)
        assert r.status == 401, (method, path, r.status, r.body[:200])
        assert s.config.token not in r.text
    assert sorted(p.split("/")[1] for p in public) == ["login", "static"]
    # Paths no route knows are refused the same way: nothing about the server leaks without the token.
    assert s.request("GET", "/no/such/path", auth=False).status == 401


def test_a_page_without_the_login_cookie_asks_to_log_in_and_the_form_logs_in(serve):
    s = serve()
    r = s.request("GET", "/projects", auth=False, headers={"Accept": "text/html"})
    assert r.status == 401 and 'action="/login"' in r.text and 'name="token"' in r.text
    r = s.request("GET", "/login", auth=False)  # the form itself, without a token
    assert r.status == 401 and 'name="token"' in r.text
    r = s.request("GET", f"/login?token={s.token}", auth=False)
    assert r.status == 303
    cookie = r.headers["set-cookie"].split(";")[0]
    assert s.request("GET", "/projects", auth=False, headers={"Cookie": cookie}).status == 200


def test_serve_prints_the_token_to_a_terminal_only(home, db):
    import pty

    def first_lines(stdout, env_extra) -> tuple[str, str]:
        proc = subprocess.Popen([sys.executable, str(CLARE_PY), "serve", "--port", "0", "--no-sync"],
                                stdout=stdout, stderr=subprocess.PIPE, env={**os.environ, **env_extra})
        return proc

    # Not a terminal (a log, the journal): the token never shows.
    proc = first_lines(subprocess.PIPE, {})
    try:
        lines = [proc.stdout.readline().decode(), proc.stdout.readline().decode()]
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    token = clare.load_config(str(home / "clare.toml"))["token"]
    assert "login?token=YOUR_TOKEN" in lines[1] and "clare.toml" in lines[1]
    assert token not in "".join(lines) + out.decode() + err.decode()
    # A terminal: the login URL holds the token.
    leader, follower = pty.openpty()
    proc = first_lines(follower, {})
    os.close(follower)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while not re.search(rb"login\?token=\S+\r?\n", seen) and time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 4096)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
        os.close(leader)
    assert f"login?token={token}".encode() in seen


def test_peer_add_says_which_token_it_will_send(home, cli):
    r = cli("peer", "add", "http://10.9.0.2:8765", "--name", "b")
    assert r.code == 0 and "this host's own token" in r.out and "clare.toml" in r.out
    r = cli("peer", "add", "http://10.9.0.3:8765", "--name", "c", "--token-env", "C_TOKEN")
    assert r.code == 0 and "$C_TOKEN" in r.out and "own token" not in r.out


def test_a_host_sends_its_own_token_only_to_a_peer_without_token_env(home, db):
    own = {"token": "o" * 24}
    assert clare.peer_token(clare.check_peer("http://10.0.0.2:1"), own, env={}) == "o" * 24
    peer = clare.check_peer("http://10.0.0.3:1", token_env="PEER_TOKEN")
    assert clare.peer_token(peer, own, env={"PEER_TOKEN": "p" * 24}) == "p" * 24
    with pytest.raises(clare.ClareError, match="PEER_TOKEN"):
        clare.peer_token(peer, own, env={})  # never falls back to sending this host's token elsewhere


def test_upgrading_a_host_without_a_token_keeps_cli_hooks_and_dashboard(home, cli, serve, run_clare):
    shutil.copy(RELEASE_DB, home / "clare.db")
    assert not (home / "clare.toml").exists()
    # The CLI and the hook open the database: no token needed, before or after serve made one.
    assert cli("task", "list").code == 0
    s = serve()
    token = clare.load_config(str(home / "clare.toml"))["token"]
    assert token == s.token
    assert cli("task", "list").code == 0 and cli("project", "new", "after-upgrade").code == 0
    report = {"session_id": "0b7e5a8c-1111-4c1d-9e6e-3d2d1a0b9c8d", "hook_event_name": "UserPromptSubmit",
              "cwd": str(home), "prompt": "hi"}
    r = run_clare("--db", str(home / "clare.db"), "hook", input=json.dumps(report), env={"CLARE_TOKEN": ""})
    assert r.code == 0
    assert any(x["id"] == report["session_id"] for x in s.request("GET", "/api/v1/sessions").json())
    # The dashboard asks to log in once, then works.
    r = s.request("GET", "/", auth=False)
    assert r.status == 401 and "Log in" in r.text
    cookie = s.request("GET", f"/login?token={token}", auth=False).headers["set-cookie"].split(";")[0]
    r = s.request("GET", "/", auth=False, headers={"Cookie": cookie})
    assert r.status == 200 and "after-upgrade" in r.text


# --- 2. no smuggling after an early answer ---------------------------------------------------

def test_a_chunked_request_gets_411_and_its_body_never_runs_as_a_request(server):
    inner = json.dumps({"name": "smuggled"}).encode()
    smuggled = (b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + server.token.encode() + b"\r\n"
                b"Content-Length: " + str(len(inner)).encode() + b"\r\n\r\n" + inner)
    chunk = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
    head = (b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + server.token.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer = raw(server.port, head + chunk)
    assert answer.startswith(b"HTTP/1.1 411") and answer.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in answer.lower()
    assert server.request("GET", "/api/v1/projects").json() == []


def test_an_unauthenticated_post_with_a_body_never_runs_its_body(server):
    inner = b"GET /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    head = (b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(inner)).encode() + b"\r\n\r\n")
    answer = raw(server.port, head + inner)
    assert answer.startswith(b"HTTP/1.1 401") and answer.count(b"HTTP/1.1 ") == 1


# --- 3. ids at the door, no CR/LF in a header -----------------------------------------------

def test_a_synced_id_with_a_line_break_is_rejected_and_the_rest_of_the_batch_kept(server):
    bad = project_event("evil", project_id="abc\r\nSet-Cookie: clare_login=x")
    good = project_event("fine")
    r = server.request("POST", "/api/v1/sync/events", json_body={"events": [bad, good]})
    assert r.status == 200, r.body
    body = r.json()
    assert body["accepted"] == 1 and [x["index"] for x in body["rejected"]] == [0]
    assert "project_id" in body["rejected"][0]["reason"]
    assert [p["name"] for p in server.request("GET", "/api/v1/projects").json()] == ["fine"]


def test_an_imported_id_with_a_line_break_is_rejected(cli, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps(project_event("evil", project_id="a b")) + "\n"
                 + json.dumps(event("task.created", {"task_id": "t\n1", "project_id": clare.new_id(), "title": "x",
                                                     "description": "", "priority": 2, "status": "todo"})) + "\n")
    r = cli("import", str(f))
    assert r.code == 1 and r.err.count("rejected") == 2


def test_every_id_the_release_wrote_is_still_accepted(cli):
    r = cli("import", str(RELEASE_LOG), "--json")
    assert r.code == 0 and r.json()["rejected"] == 0 and r.json()["accepted"] > 20


def test_a_header_value_with_a_line_break_is_never_sent(server, db):
    # A log written before ids were checked may hold one: a task whose project_id carries CRLF.
    pid = "p\r\nSet-Cookie: clare_login=stolen"
    tid = clare.new_id()
    obj = event("task.created", {"task_id": tid, "project_id": pid, "title": "old", "description": "",
                                 "priority": 2, "status": "todo"})
    with clare.write_txn(db) as cur:
        result = clare.insert_events(cur, [clare.Event(obj["uuid"], obj["hlc"], obj["machine_id"],
                                                       obj["event_type"], obj["payload"], obj["created_at"])])
        clare.apply_event(cur, result.inserted[0])
    r = server.request("POST", f"/tasks/{tid}/status",  # a plain form post answers 303 to the task's project
                       body=f"status=done&view=tasks&csrf={server.config.csrf_token}".encode(),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 500 and "set-cookie" not in r.headers and "location" not in r.headers
    for value in ("/x\r\nSet-Cookie: a=b", "/x\nSet-Cookie: a=b", "/x\rSet-Cookie: a=b"):
        resp, head = clare._response_head(clare.redirect(value), is_closing=False)
        assert resp.status == 500 and head.startswith(b"HTTP/1.1 500") and b"Set-Cookie" not in head
    assert clare._response_head(clare.redirect("/x"), is_closing=False)[1].startswith(b"HTTP/1.1 303")


# --- 4. NaN and Infinity ---------------------------------------------------------------------

@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_by_the_api(server, constant):
    body = b'{"name": "x", "goal": ' + constant.encode() + b"}"
    r = server.request("POST", "/api/v1/projects", body=body, headers={"Content-Type": "application/json"})
    assert r.status == 400 and constant.lstrip("-") in r.json()["error"]["message"]


def test_a_synced_or_imported_nan_rejects_that_event_only(server, cli, tmp_path):
    nan = json.dumps(event("custom.thing", {"x": 1})).replace('"x": 1', '"x": NaN')
    good = json.dumps(project_event("fine"))
    r = server.request("POST", "/api/v1/sync/events", body=f'{{"events": [{nan}, {good}]}}'.encode(),
                       headers={"Content-Type": "application/json"})
    assert r.status == 200 and r.json()["accepted"] == 1 and len(r.json()["rejected"]) == 1
    assert "NaN" in r.json()["rejected"][0]["reason"]
    f = tmp_path / "in.jsonl"
    f.write_text(nan.replace("custom.thing", "custom.other") + "\n")
    r = cli("import", str(f))
    assert r.code == 1 and "NaN" in r.err


def test_a_database_already_holding_nan_still_replays(server, db, cli):
    with clare.write_txn(db) as cur:  # as the Clare that stored it then did: stored, then applied
        obj = event("custom.thing", {"x": float("nan"), "task_id": "abc"})
        result = clare.insert_events(cur, [clare.Event(obj["uuid"], obj["hlc"], obj["machine_id"],
                                                       obj["event_type"], obj["payload"], obj["created_at"])])
        clare.apply_event(cur, result.inserted[0])
    clare._replay(db, with_refs=True)  # as an upgrade does: the refs made anew, the NaN one by Python
    assert db.conn.execute("SELECT count(*) FROM event_refs WHERE uuid = ?", (obj["uuid"],)).fetchone()[0] == 1
    assert cli("replay").code == 0
    r = server.request("POST", "/api/v1/replay", json_body={})
    assert r.status == 200
    refs = db.conn.execute("SELECT count(*) FROM event_refs WHERE uuid = ?", (obj["uuid"],)).fetchone()[0]
    assert refs == 1  # its history ref, as when it was first applied


# --- 5. Unicode digits, lone surrogates ------------------------------------------------------

@pytest.mark.parametrize("length", ["²", "¹²", "+5", "0x10"])
def test_a_content_length_of_other_digits_is_a_400_with_a_reason(server, length):
    answer = raw(server.port, (f"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {length}\r\n\r\n").encode("latin-1"))
    assert answer.startswith(b"HTTP/1.1 400") and b"Content-Length" in answer


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/v1/projects", {"name": "\ud800"}),
    ("POST", "/api/v1/groups", {"name": "g", "cwd": "\udfff"}),
    ("POST", "/api/v1/broadcast", {"target": "all", "text": "hi \ud83d"}),
    ("PATCH", "/api/v1/projects/x", {"goal": "\udc00"}),
])
def test_a_lone_surrogate_is_a_400_with_a_reason(server, method, path, body):
    data = json.dumps(body).encode()  # ensure_ascii writes the lone surrogate as a \\ud800 escape
    r = server.request(method, path, body=data, headers={"Content-Type": "application/json"})
    assert 400 <= r.status < 500 and "surrogate" in r.text, r.body


def test_a_lone_surrogate_in_an_imported_line_rejects_that_line_only(server):
    lines = ["\ud800", json.dumps(project_event("x \ud800")), json.dumps(project_event("fine"))]
    r = server.request("POST", "/api/v1/import", body=json.dumps({"lines": lines}).encode(),
                       headers={"Content-Type": "application/json"})
    assert r.status == 200 and len(r.json()["inserted"]) == 1
    assert len(r.json()["rejected"]) == 2 and all("surrogate" in x for x in r.json()["rejected"])


def test_a_lone_surrogate_in_a_sync_batch_rejects_that_event_only(server):
    events = [project_event("bad \ud800"), project_event("fine")]
    r = server.request("POST", "/api/v1/sync/events", body=json.dumps({"events": events}).encode(),
                       headers={"Content-Type": "application/json"})
    assert r.status == 200 and r.json()["accepted"] == 1
    assert "surrogate" in r.json()["rejected"][0]["reason"]


# --- 7. private files ------------------------------------------------------------------------

def test_the_database_and_its_folder_are_private(tmp_path, run_clare):
    home = tmp_path / "new-home"
    r = run_clare("--home", str(home), "project", "new", "x", env={"CLARE_HOME": ""})
    assert r.code == 0, r.err
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("clare.db", "clare.db-wal", "clare.db-shm"):
        if (home / name).exists():
            assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    xdg = tmp_path / "xdg"
    r = run_clare("project", "new", "y", env={"CLARE_HOME": "", "XDG_DATA_HOME": str(xdg / "data"),
                                                "XDG_CONFIG_HOME": str(xdg / "config")})
    assert r.code == 0, r.err
    assert stat.S_IMODE((xdg / "data" / "clare").stat().st_mode) == 0o700
    r = run_clare("peer", "add", "http://10.0.0.2:8765", env={"CLARE_HOME": "", "XDG_DATA_HOME": str(xdg / "data"),
                                                              "XDG_CONFIG_HOME": str(xdg / "config")})
    assert r.code == 0, r.err
    assert stat.S_IMODE((xdg / "config" / "clare").stat().st_mode) == 0o700
    assert stat.S_IMODE((xdg / "config" / "clare" / "clare.toml").stat().st_mode) == 0o600


def test_peer_add_and_rm_leave_clare_toml_private(home, cli):
    assert cli("peer", "add", "http://10.0.0.2:8765", "--name", "b").code == 0
    assert stat.S_IMODE((home / "clare.toml").stat().st_mode) == 0o600
    assert cli("peer", "add", "http://10.0.0.3:8765", "--name", "c").code == 0
    os.chmod(home / "clare.toml", 0o644)
    assert cli("peer", "rm", "b").code == 0
    assert stat.S_IMODE((home / "clare.toml").stat().st_mode) == 0o600


@pytest.mark.parametrize("text", ['token = "' + "k" * 24 + '"\n', '[triage]\ncommand = ["sh", "-c", "x"]\n',
                                  '[rclaude]\nsessions_command = "x"\n'])
def test_a_config_others_can_write_is_refused_while_it_holds_a_token_or_a_command(home, cli, text):
    toml = home / "clare.toml"
    toml.write_text(text)
    os.chmod(toml, 0o664)
    r = cli("peer", "list")
    assert r.code == 1 and f"chmod 600 {toml}" in r.err and r.err.count("\n") == 1
    os.chmod(toml, 0o600)
    assert cli("peer", "list").code == 0


def test_a_config_others_can_write_without_secrets_is_read(home, cli):
    toml = home / "clare.toml"
    toml.write_text('allowed_hosts = ["box"]\n')
    os.chmod(toml, 0o666)
    assert cli("peer", "list").code == 0


# --- 8. two login cookies --------------------------------------------------------------------

def test_a_second_login_cookie_planted_by_another_port_does_not_log_out(serve):
    s = serve()
    good = s.request("GET", f"/login?token={s.token}", auth=False).headers["set-cookie"].split(";")[0]
    for cookies in (f"clare_login=planted; {good}", f"{good}; clare_login=planted"):
        assert s.request("GET", "/api/v1/projects", auth=False, headers={"Cookie": cookies}).status == 200
    assert s.request("GET", "/api/v1/projects", auth=False,
                     headers={"Cookie": "clare_login=a; clare_login=b"}).status == 401


# --- 9. broadcast expiry ---------------------------------------------------------------------

def test_a_synced_broadcast_expiring_past_its_time_plus_an_hour_is_rejected(server):
    wall = clare.now_ms()

    def broadcast(expires_ms: int) -> dict:
        return event("broadcast.sent", {"broadcast_id": clare.new_id(), "target": "all", "text": "hi",
                                        "expires_at": clare.iso_ms(expires_ms), "session_ids": []}, wall_ms=wall)

    late = broadcast(wall + 3_600_000 + 1000)
    far = event("broadcast.sent", {**broadcast(0)["payload"], "expires_at": "2099-01-01T00:00:00.000Z"},
                wall_ms=wall)
    ok = broadcast(wall + 15 * 60_000)
    r = server.request("POST", "/api/v1/sync/events", json_body={"events": [late, far, ok]})
    assert r.status == 200 and r.json()["accepted"] == 1
    assert [x["index"] for x in r.json()["rejected"]] == [0, 1]
    assert "expires_at" in r.json()["rejected"][0]["reason"]


# --- 6. handler slots ------------------------------------------------------------------------

def _hold_threads(s, n: int) -> list[socket.socket]:
    """Open n requests with the token whose body never comes: each holds a handler thread."""
    held = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        c.sendall(b"POST /api/v1/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + s.token.encode() + b"\r\nContent-Length: 100\r\n\r\n")
        held.append(c)
    return held


def test_a_few_hundred_idle_connections_leave_a_real_client_served(server):
    idle = []
    try:
        for i in range(300):  # more than MAX_HANDLER_THREADS: silent ones, and ones that stop mid-head
            c = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if i % 2:
                c.sendall(b"GET /api/v1/pro")
            idle.append(c)
        r = server.request("GET", "/api/v1/projects", timeout=10)
        assert r.status == 200
        r = server.request("GET", "/static/htmx.min.js", auth=False, timeout=10)  # a stranger too
        assert r.status == 200
    finally:
        for c in idle:
            c.close()


def test_requests_with_the_token_keep_reserved_slots(serve):
    s = serve(max_threads=8)  # 7 slots for anyone, 1 kept for requests with the token
    held = _hold_threads(s, 7)
    try:
        wait_for(lambda: s.server._slots._value == 0, what="the open slots taken")
        r = s.request("GET", "/static/htmx.min.js", auth=False)
        assert r.status == 503 and r.json()["error"]["code"] == "busy"
        assert s.request("GET", "/api/v1/projects").status == 200
        assert s.request("GET", "/api/v1/projects", auth=False,
                         headers={"Cookie": f"clare_login={s.config.login_cookie}"}).status == 200
    finally:
        for c in held:
            c.close()


def test_keep_alive_connections_wait_without_a_thread_and_pipelined_requests_are_answered(serve):
    s = serve(max_threads=2)
    one = (b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + s.token.encode()
           + b"\r\n\r\n")
    conns = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(5)]
    try:
        for c in conns:  # five keep-alive connections on two threads: each answered, each left open
            c.sendall(one)
            assert c.recv(65536).startswith(b"HTTP/1.1 200")
        wait_for(lambda: s.server._slots._value + s.server._reserved._value == 2, what="threads given back")
        conns[0].sendall(one * 3)  # pipelined: the leftover bytes go back to the gate with the connection
        data = b""
        while data.count(b"HTTP/1.1 200") < 3:
            chunk = conns[0].recv(65536)
            assert chunk, data
            data += chunk
    finally:
        for c in conns:
            c.close()
