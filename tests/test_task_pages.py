"""GET /api/v1/tasks in pages (?limit=N&after=CURSOR) and, without a limit, the whole list streamed in
chunks (issue #21); `--remote` follows the pages."""

import json
import socket

import clare


def _add_tasks(db, n, *, project="alpha", priorities=(2, 0, 1)):
    """Add n tasks in one transaction, as the services would one by one; return the project's id."""
    svc = clare.Services(db)
    p = svc.create_project(project)
    now = clare.now_ms()
    with clare.write_txn(db) as cur:
        for i in range(n):
            clare.record(db, cur, "task.created", {
                "task_id": clare.new_id(), "project_id": p.id, "title": f"task {i}", "description": "",
                "priority": priorities[i % len(priorities)], "status": "todo"}, now_ms=now)
    return p.id


def _pages(server, query, limit):
    tasks, after, n_pages = [], None, 0
    while True:
        url = f"/api/v1/tasks?{query}limit={limit}" + (f"&after={after}" if after else "")
        r = server.request("GET", url)
        assert r.status == 200, r.body
        page = r.json()
        assert set(page) == {"tasks", "next_after", "has_more"}
        tasks += page["tasks"]
        n_pages += 1
        if not page["has_more"]:
            return tasks, n_pages
        after = page["next_after"]


def test_pages_read_in_turn_give_the_whole_list_in_order(server, db):
    _add_tasks(db, 7)
    _add_tasks(db, 2, project="beta")
    whole = server.request("GET", "/api/v1/tasks").json()
    assert len(whole) == 9 and [t["priority"] for t in whole] == sorted(t["priority"] for t in whole)
    for limit in (1, 3, 9, 50):
        tasks, n_pages = _pages(server, "", limit)
        assert tasks == whole and n_pages == -(-9 // limit)  # has_more is exact: no empty last page
    only_alpha = server.request("GET", "/api/v1/tasks?project=alpha").json()
    assert _pages(server, "project=alpha&", 2)[0] == only_alpha and len(only_alpha) == 7


def test_a_page_past_the_end_is_empty_and_says_so(server, db):
    _add_tasks(db, 2)
    first = server.request("GET", "/api/v1/tasks?limit=2").json()
    assert len(first["tasks"]) == 2 and first["has_more"] is False
    after = first["next_after"]
    assert server.request("GET", f"/api/v1/tasks?limit=2&after={after}").json() == {
        "tasks": [], "next_after": after, "has_more": False}
    assert server.request("GET", "/api/v1/tasks?project=nothing-here&limit=5").status == 404


def test_a_bad_cursor_or_limit_is_one_clear_error(server, db):
    _add_tasks(db, 1)
    for query, status, says in (("limit=2&after=nonsense", 422, "not a task cursor"),
                                ("after=1~2~3~4", 422, "not a task cursor"), ("limit=0", 400, "outside"),
                                ("limit=5000", 400, "outside"), ("limit=x", 400, "not an integer")):
        r = server.request("GET", f"/api/v1/tasks?{query}")
        assert r.status == status and says in r.json()["error"]["message"], (query, r.body)
        assert "\n" not in r.json()["error"]["message"]


def test_without_a_limit_every_task_comes_streamed_in_chunks(server, db, monkeypatch):
    monkeypatch.setattr(clare, "STREAM_PAGE_ITEMS", 2)  # the server runs in this process: pages of 2
    _add_tasks(db, 5)
    head, chunks = _raw_get(server, "/api/v1/tasks")
    assert "transfer-encoding: chunked" in head.lower() and "content-length" not in head.lower()
    assert len(chunks) == 4  # "[t0,t1" ",t2,t3" ",t4" "]": a page of tasks at a time, never the whole list
    tasks = json.loads(b"".join(chunks))
    assert [t["title"] for t in tasks] == [t.title for t in clare.list_tasks(db)]
    _add_tasks(db, 1, project="beta")  # six: the last page is full, then an empty one ends the list
    head, chunks = _raw_get(server, "/api/v1/tasks")
    assert len(chunks) == 4 and len(json.loads(b"".join(chunks))) == 6  # "[t0,t1" ",t2,t3" ",t4,t5" "]"
    assert json.loads(b"".join(_raw_get(server, "/api/v1/tasks?status=done")[1])) == []
    r = server.request("HEAD", "/api/v1/tasks")
    assert r.status == 200 and r.body == b""


def _raw_get(server, path):
    """Return the head and the chunks of a chunked answer, read off the socket as sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head.decode(), chunks
        chunks.append(rest[:size])
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]


def test_remote_task_list_follows_the_pages(server, db, cli):
    _add_tasks(db, clare.MAX_EVENTS_PAGE + 5)  # more than one answer may hold
    remote = cli("--remote", server.url, "--json", "task", "list")
    assert remote.code == 0, remote.err
    assert [t["id"] for t in remote.json()] == [t.id for t in clare.list_tasks(db)]
    one_page = clare.RemoteServices(server.url, token=server.token).list_tasks(limit=10)
    assert [t.id for t in one_page] == [t.id for t in clare.list_tasks(db)[:10]]


def test_paging_is_in_the_openapi_document(server, db):
    _add_tasks(db, 3)
    op = server.request("GET", "/api/v1/openapi.json").json()["paths"]["/api/v1/tasks"]["get"]
    assert {"after", "limit"} <= {p["name"] for p in op["parameters"]}
    whole, page = op["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"]
    assert whole["type"] == "array" and page["required"] == ["tasks", "next_after", "has_more"]
    got = server.request("GET", "/api/v1/tasks?limit=2").json()
    assert set(got) == set(page["properties"]) and len(got["tasks"]) == 2 and got["has_more"] is True
