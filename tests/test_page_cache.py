"""The page cache under a live log (issue #21): one rebuild at a time, the previous page meanwhile,
bounded staleness, a client's own write seen at once. Behaviour only: the speed is in `make bench`."""

import threading

import clare
from conftest import wait_for


def _request(db, config, path="/frag/projects"):
    return clare.Request("GET", path, {}, {}, b"", {}, db, config)


def _config(db):
    return clare.WebConfig(host="127.0.0.1", port=0, token="t" * 32, allowed_hosts=frozenset({"127.0.0.1"}),
                           csrf_token="c" * 32, db_path=db.path)


class BlockingPage:
    """A page handler that says which log head it saw, counts builds at once, and can be held mid-build."""

    __name__ = "page_held"

    def __init__(self):
        self.lock = threading.Lock()
        self.n_builds = self.n_now = self.max_at_once = 0
        self.hold = threading.Event()
        self.hold.set()  # not held until a test clears it
        self.entered = threading.Event()

    def __call__(self, req):
        with self.lock:
            self.n_builds += 1
            self.n_now += 1
            self.max_at_once = max(self.max_at_once, self.n_now)
        head = clare.head_rseq(req.db.conn)
        self.entered.set()
        try:
            assert self.hold.wait(30)
        finally:
            with self.lock:
                self.n_now -= 1
        return clare.Response(200, f"head {head}".encode(), "text/html")


def _add_project(db, name):
    clare.Services(db).create_project(name)


def _open_twice(db):
    """Return a second connection to the same file: what another server thread borrows."""
    return clare.open_db(db.path)


def test_one_thread_rebuilds_while_the_others_get_the_previous_page(db, monkeypatch):
    monkeypatch.setattr(clare, "PAGE_MAX_STALE_S", 60.0)  # the previous page is young enough for this whole test
    page = BlockingPage()
    answer = clare.cached(page)
    config = _config(db)
    _add_project(db, "alpha")
    first = answer(_request(db, config)).body
    assert first == f"head {clare.head_rseq(db.conn)}".encode() and page.n_builds == 1

    _add_project(db, "beta")  # the log moves: the page is out of date
    new_head = clare.head_rseq(db.conn)
    page.hold.clear()
    page.entered.clear()
    other = _open_twice(db)
    builder_got = []
    builder = threading.Thread(target=lambda: builder_got.append(answer(_request(other, config)).body))
    builder.start()
    assert page.entered.wait(30)  # one thread is rebuilding now, held inside the build

    readers = [_open_twice(db) for _ in range(8)]
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda d=d: got.append(answer(_request(d, config)).body)) for d in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == [first] * 8  # answered meanwhile with the previous page, none of them rebuilt it
    assert page.n_builds == 2 and page.max_at_once == 1

    page.hold.set()
    builder.join(30)
    assert builder_got == [f"head {new_head}".encode()]
    assert answer(_request(db, config)).body == f"head {new_head}".encode()  # the new page, from memory
    assert page.n_builds == 2
    for d in [other, *readers]:
        d.close()


def test_a_page_older_than_the_bound_is_not_answered_while_one_is_rebuilt(db, monkeypatch):
    monkeypatch.setattr(clare, "PAGE_MAX_STALE_S", 0.0)  # every previous page is past the bound
    page = BlockingPage()
    answer = clare.cached(page)
    config = _config(db)
    _add_project(db, "alpha")
    first = answer(_request(db, config)).body
    _add_project(db, "beta")
    new = f"head {clare.head_rseq(db.conn)}".encode()

    page.hold.clear()
    page.entered.clear()
    other, late = _open_twice(db), _open_twice(db)
    results: dict[str, bytes] = {}
    builder = threading.Thread(target=lambda: results.update(builder=answer(_request(other, config)).body))
    builder.start()
    assert page.entered.wait(30)
    waiter = threading.Thread(target=lambda: results.update(waiter=answer(_request(late, config)).body))
    waiter.start()
    waiter.join(0.5)  # a chance to answer the stale page at once, which it must not take
    assert "waiter" not in results
    page.hold.set()
    builder.join(30)
    waiter.join(30)
    assert results == {"builder": new, "waiter": new} and first != new
    other.close()
    late.close()


def test_a_page_only_older_by_the_clock_is_answered_while_one_is_rebuilt(db, monkeypatch):
    monkeypatch.setattr(clare, "PAGE_MAX_STALE_S", 0.0)
    monkeypatch.setattr(clare, "PAGE_CACHE_TTL_S", 0.0)  # every page is due for its "5m ago" texts
    page = BlockingPage()
    answer = clare.cached(page)
    config = _config(db)
    first = answer(_request(db, config)).body
    page.hold.clear()
    page.entered.clear()
    other, reader = _open_twice(db), _open_twice(db)
    builder = threading.Thread(target=lambda: answer(_request(other, config)))
    builder.start()
    assert page.entered.wait(30)
    assert answer(_request(reader, config)).body == first  # the log did not move: no need to wait
    page.hold.set()
    builder.join(30)
    assert page.max_at_once == 1
    other.close()
    reader.close()


def test_another_process_s_write_is_rebuilt_in_the_background(db, run_clare, monkeypatch):
    """No request waits for a rebuild another process's write caused: the previous page answers meanwhile."""
    monkeypatch.setattr(clare, "PAGE_MAX_STALE_S", 60.0)
    page = BlockingPage()
    answer = clare.cached(page)
    config = _config(db)
    first = answer(_request(db, config)).body
    assert run_clare("project", "new", "elsewhere").code == 0  # another process writes the log
    clare._RECENT_HEADS.clear()  # what HEAD_MAX_AGE_S does; the subprocess alone outlasts it
    page.hold.clear()
    page.entered.clear()
    assert answer(_request(db, config)).body == first  # answered at once, though the page is out of date
    assert page.entered.wait(30)  # while a thread of the cache's own rebuilds it
    assert answer(_request(db, config)).body == first and page.max_at_once == 1
    page.hold.set()
    wait_for(lambda: not clare._PAGE_BUILDERS, what="the background rebuild to end")
    assert answer(_request(db, config)).body == f"head {clare.head_rseq(db.conn)}".encode()
    assert page.n_builds == 2


def test_a_write_shows_on_the_next_page(server, run_clare):
    """A client's own write is on the page it asks next; another process's once the rebuild it started ends."""
    assert "gamma" not in server.request("GET", "/frag/projects").text
    assert server.request("POST", "/api/v1/projects", json_body={"name": "gamma"}).status == 201
    assert "gamma" in server.request("GET", "/frag/projects").text
    assert run_clare("project", "new", "delta").code == 0  # another process
    wait_for(lambda: "delta" in server.request("GET", "/frag/projects").text, what="delta on the page")
