"""Heal in bounded time (issue #19): a peer that contacts us ends our backoff toward it."""

import socket
import time

import pytest

import clare
from test_sync import fleet  # noqa: F401  (the fixture of three real `clare serve` processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peer(host, name: str) -> dict:
    return {p["name"]: p for p in host.cli("peer", "list", "--json").json()}[name]


def _wait(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_a_peer_that_contacts_us_again_ends_our_backoff_toward_it(fleet):  # noqa: F811
    a, b = fleet("a", "b")
    port = _free_port()
    b.serve("--no-sync", "--port", str(port))
    (a.home / "clare.toml").write_text("[sync]\ninterval_s = 10\n")
    a.add_peer(b, token_env="B_TOKEN")
    a.serve()
    _wait(lambda: _peer(a, "b")["last_ok_ms"], timeout=20, what="a's first round with b")
    b.stop()  # the partition: a's next round fails, and it backs off 15-25 s
    _wait(lambda: _peer(a, "b")["n_failures"] >= 1, timeout=30, what="a failed round")
    b.proc = b.url = None
    (b.home / "clare.toml").write_text("[sync]\ninterval_s = 0.3\n")
    b.add_peer(a, token_env="A_TOKEN")
    started = time.monotonic()
    b.serve("--port", str(port))  # b is back and syncs with a at once
    _wait(lambda: _peer(a, "b")["n_failures"] == 0, timeout=10, what="a's own round with b, before its backoff ends")
    assert time.monotonic() - started < 10
    assert "sync with b: it contacted this host, trying again now" in a.stop()
    b.stop()


def test_backoff_is_capped_so_a_heal_takes_150_s_at_most():
    assert max(clare.backoff_s(n, interval_s=clare.SYNC_INTERVAL_S) for n in range(1, 60)) <= 150
