"""The bench's honesty rules, checked on its parts (no timing is asserted): the tuned baseline, goals, registry."""

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

BENCH_PY = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run_honest", BENCH_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_baseline_answers_a_page_of_the_asked_size_in_one_write_with_keep_alive():
    bench = load_bench()
    child = subprocess.Popen([sys.executable, str(BENCH_PY), "--serve-fixed-page", "34567"], stdout=subprocess.PIPE,
                             text=True)
    try:
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(2):  # the same connection answers twice: keep-alive
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 34567:
                    chunk = sock.recv(65536)
                    assert chunk, "the baseline closed the connection"
                    got += chunk
                head, body = got.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 34567" in head
                assert len(body) == 34567
    finally:
        child.terminate()
        child.wait(timeout=10)
    assert bench.fixed_response(100).endswith(b"\r\n\r\n" + bench.fixed_response(100).split(b"\r\n\r\n")[1])
    assert bench.FixedPage.disable_nagle_algorithm


def test_every_row_prints_its_goal_and_whether_it_is_met():
    bench = load_bench()
    rows = [bench.Row("a", "faster", "<= 1.5x", clare=10, base=10),
            bench.Row("b", "slower", "<= 1.5x", clare=20, base=10),
            bench.Row("c", "a rate", ">= 0.33x", unit="req/s", clare=1, base=2),
            bench.Row("d", "growth", clare=1, base=1), bench.Row("e", "missing", "<= 2x", note="n/a (install wrk)")]
    lines = bench.table(rows).splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [(c[4], c[5]) for c in cells] == [("<= 1.5x", "yes"), ("<= 1.5x", "**no**"), (">= 0.33x", "yes"),
                                             ("none (shows growth or cost)", "—"), ("<= 2x", "not measured")]


def test_a_group_declares_its_rows_once_and_the_table_keeps_their_order():
    bench = load_bench()
    assert len(set(bench.ROW_KEYS)) == len(bench.ROW_KEYS)
    names = [name for name, _, _ in bench.GROUPS]
    assert names[:5] == ["list", "replay", "append", "sync", "http"]
    new_rows = {"http.p99", "http.moving.rate", "http.moving.p99", "list.3.twlist", "add.1.durability"}
    assert new_rows <= set(bench.ROW_KEYS)
    before = len(bench.GROUPS)

    @bench.group("extra", "extra.one")
    def bench_extra(rows, sizes, work):
        rows["extra.one"] = bench.Row("extra.one", "x", "<= 1x", clare=1, base=1)

    assert bench.GROUPS[before] == ("extra", bench_extra, ("extra.one",))


def test_pinning_uses_taskset_on_two_cores_or_says_it_cannot():
    bench = load_bench()
    argv = bench.pinned(["wrk"], bench.LOAD_CORE)
    assert argv == ([bench.TASKSET, "-c", "1", "wrk"] if bench.CAN_PIN else ["wrk"])
