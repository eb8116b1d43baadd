#!/usr/bin/env python3
"""Clare's benchmarks: one table of metric, Clare, baseline, ratio and goal (issue #6).

    make bench                                  # full sizes: about seven minutes on 2 cores
    CLARE_BENCH_QUICK=1 make bench              # tiny sizes, under a minute (tests/test_bench.py)
    .venv/bin/python bench/run.py --only replay # one group: list replay append sync http pull fleet serve
    .venv/bin/python bench/run.py --json out.json

A full run writes about 2 GB of transcripts and 1.5 GB of databases under $TMPDIR and
removes them. The peers: `apt-get install -y taskwarrior wrk`.

Every figure is the median of several runs; every baseline is measured in the same run,
interleaved with the Clare figure beside it, so the ratio holds when the machine is busy.
Rows at 10x less and 10x more data show how a cost grows. The bench reports and exits 0:
a missed goal is a "no" in the last column, a missing peer is "n/a (install X)".
Standard library only; the peers are Taskwarrior (Debian `taskwarrior`) and wrk (Debian `wrk`).

Honest by construction:
- every row prints its goal (a ratio against its baseline: "<= 1.5x", ">= 0.33x"; or an absolute
  "<= 100 MB" where there is no baseline) and "yes" / "**no**"; a row shown only to say how a cost
  grows, or what something costs, says "none (shows growth or cost)";
- the HTTP baseline is the tuned trivial server: one prebuilt buffer (head + a body of the same size
  as Clare's page), one write, keep-alive, TCP_NODELAY; it runs interleaved with Clare, and every
  server is pinned to one core and wrk to the other (`taskset`, util-linux; without it the bench says
  so and runs unpinned); p99 goals are ratios against the baseline's p99;
- CPU time (rusage of the child, or process time in-process) is printed beside wall time.

Adding a row (perf work on another branch): declare the group and its row keys once, fill them:

    @group("cache", "cache.hit")                 # group name (for --only), then its row keys in order
    def bench_cache(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
        clare_ms, base_ms = ..., ...              # measure both, interleaved (time_interleaved, wrk)
        rows["cache.hit"] = Row("cache.hit", "what is measured, at what size", "<= 2x",
                                clare=clare_ms, base=base_ms, base_name="what the baseline is")

The table lists the groups in the order they are declared, each group's rows in the order given;
tests/test_bench.py checks that a quick run prints every declared key.
"""

import argparse
import contextlib
import datetime
import http.server
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLARE_PY = ROOT / "clare.py"
sys.path.insert(0, str(ROOT))
import clare  # noqa: E402  (the file under test, found beside bench/)

PY = sys.executable  # the interpreter itself: a version-manager shim would add its own start-up
FLOOR = [PY, "-c", "import sqlite3, json, argparse"]
HAS_SESSIONS = "session.appeared" in clare.APPLIERS  # the fleet section has landed
TASKRC_LINES = ("confirmation=off", "bulk=0", "recurrence.confirmation=no", "verbose=nothing",
                "hooks=off", "news.version=2.6.2", "color=off")


@dataclass(frozen=True)
class Sizes:
    """How much data each metric runs on; QUICK keeps the same rows with tiny sizes."""
    tasks: tuple[int, ...]  # task list / task add: 10x less, goal, 10x more around 100 and 10,000
    cli_runs: int  # runs per CLI figure (the median is shown)
    replay: tuple[int, ...]  # events; the last one carries the goal
    replay_runs: int
    append: int  # events appended through the services
    sync: int  # events moved by a full sync / import
    wrk_seconds: int
    transcripts: int  # files for `clare pull`
    transcript_bytes: int  # their total size, written for real (make_transcripts)
    serve_events: int
    panes: tuple[int, ...] = (20, 200)  # Claude panes for the fleet pull rows


FULL = Sizes(tasks=(10, 100, 1_000, 10_000, 100_000), cli_runs=9, replay=(10_000, 100_000, 1_000_000),
             replay_runs=3, append=20_000, sync=100_000, wrk_seconds=5, transcripts=1_000,
             transcript_bytes=2 * 1024**3, serve_events=1_000_000)
QUICK = Sizes(tasks=(2, 5, 10, 20, 40), cli_runs=3, replay=(200, 1_000, 3_000), replay_runs=3,
              append=300, sync=1_000, wrk_seconds=1, transcripts=20, transcript_bytes=20 * 256 * 1024,
              serve_events=1_000, panes=(4, 8))

@dataclass
class Row:
    key: str
    metric: str
    goal: str = ""  # "<= 1.5x" (times: lower is better) or ">= 0.5x" (rates: higher is better); "": growth only
    unit: str = "ms"  # ms, ev/s, req/s, MB
    clare: float | None = None
    base: float | None = None
    base_name: str = ""
    note: str = ""  # why a figure is missing
    cpu: str = ""  # Clare's CPU time beside its wall time, as printed: "38 ms CPU / 52 ms wall"
    base_cpu: str = ""  # the same for the baseline

    @property
    def ratio(self) -> float | None:
        """Return Clare over the baseline."""
        if self.clare is None or self.base is None or self.base == 0:
            return None
        return self.clare / self.base

    @property
    def is_met(self) -> bool | None:
        """Return whether the goal holds; None when there is no goal or no figure."""
        m = re.fullmatch(r"([<>]=?) ([0-9.]+)(x| ms| MB)", self.goal)
        value = self.ratio if m and m[3] == "x" else self.clare
        if not m or value is None:
            return None
        bound = float(m[2])
        return {"<=": value <= bound, "<": value < bound, ">=": value >= bound, ">": value > bound}[m[1]]


class BenchError(Exception):
    """A step of the bench failed; its row shows the message."""


BenchFn = Callable[[dict[str, Row], "Sizes", Path], None]
GROUPS: list[tuple[str, BenchFn, tuple[str, ...]]] = []  # (name, function, its row keys), in table order


def group(name: str, *keys: str) -> Callable[[BenchFn], BenchFn]:
    """Register a bench function under a group name with the keys of the rows it fills, in table order."""
    def register(fn: BenchFn) -> BenchFn:
        GROUPS.append((name, fn, keys))
        return fn
    return register


def cpu_text(cpu_ms: float | None, wall_ms: float | None, *, per: str = "") -> str:
    """Return CPU time beside wall time as a table cell: "38 ms CPU / 52 ms wall"."""
    if cpu_ms is None:
        return ""
    wall = "" if wall_ms is None else f" / {fmt(wall_ms, 'ms')}{per} wall"
    return f"{fmt(cpu_ms, 'ms')}{per} CPU{wall}"


# --------------------------------------------------------------------------
# Running and timing
# --------------------------------------------------------------------------

def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 600,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion; raise BenchError with its stderr when it fails."""
    p = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[:200]}")
    return p


def time_cmd(argv: list[str], env: dict[str, str] | None) -> tuple[float, float]:
    """Return the wall time and the CPU time (user + system, rusage) of one run of a command, in ms."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait(timeout=) polls with growing sleeps, which rounds every time up to its steps: a timer kills instead.
    watchdog = threading.Timer(600, child.kill)
    watchdog.start()
    _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage, not the sum of all children
    elapsed = (time.perf_counter() - started) * 1000
    watchdog.cancel()
    child.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise BenchError(f"{' '.join(argv[:4])} exited {code}")
    return elapsed, (usage.ru_utime + usage.ru_stime) * 1000


Timings = dict[str, tuple[float, float]]  # name -> (median wall ms, median CPU ms)


def time_interleaved(cmds: dict[str, tuple[list[str], dict[str, str] | None]], runs: int) -> Timings:
    """Return the median wall and CPU ms of each command, run in turn so drift hits them all alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    for argv, env in cmds.values():  # warm the page cache and the interpreter's files
        time_cmd(argv, env)
    for _ in range(runs):
        for name, (argv, env) in cmds.items():
            times[name].append(time_cmd(argv, env))
    return {name: (statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs))
            for name, xs in times.items()}


def timed_row(key: str, metric: str, goal: str, t: Timings, name: str, base: str, base_name: str, *,
              note: str = "") -> Row:
    """Return a row of wall times from interleaved timings: Clare's `name` beside the baseline `base`."""
    wall, cpu = t.get(name, (None, None))
    base_wall, base_cpu = t.get(base, (None, None))
    return Row(key, metric, goal, clare=wall, base=base_wall, base_name=base_name, note=note,
               cpu=cpu_text(cpu, wall), base_cpu=cpu_text(base_cpu, base_wall))


def median_of(fn: Callable[[], float], runs: int) -> float:
    """Return the median of several calls of fn."""
    return statistics.median(fn() for _ in range(runs))


# --------------------------------------------------------------------------
# Data: written through Clare's own functions, one transaction per data set
# --------------------------------------------------------------------------

# A user's environment: PYTHONDONTWRITEBYTECODE (set in some dev shells) would make `python3 -m clare`
# compile 700 KB on every run; the launcher runs with -I, which ignores it anyway.
USER_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def clare_env(home: Path) -> dict[str, str]:
    """Return the environment of a clare.py process on `home`."""
    return {**USER_ENV, "CLARE_HOME": str(home)}


def make_tasks_home(home: Path, n_tasks: int, *, n_sessions: int = 0) -> None:
    """Create a Clare home holding n_tasks tasks in projects of 100, through record() in one txn."""
    home.mkdir(parents=True, exist_ok=True)
    db = clare.open_db(str(home / "clare.db"), machine_id="bench")
    now = clare.now_ms()
    try:
        with clare.write_txn(db) as cur:
            for i in range(n_sessions if HAS_SESSIONS else 0):
                clare.record(db, cur, "session.appeared", {
                    "session_id": str(uuid.uuid4()), "host": "bench", "cwd": f"/srv/app-{i % 20}/worktree-{i}",
                    "state": ("working", "waiting", "idle")[i % 3]}, now_ms=now)
            project_id = ""
            for i in range(n_tasks):
                if i % 100 == 0:
                    project_id = clare.new_id()
                    name = "alpha" if i == 0 else f"project-{i // 100}"
                    clare.record(db, cur, "project.created", {
                        "project_id": project_id, "name": name, "goal": "ship it", "owner": "ana",
                        "status": "active"}, now_ms=now)
                clare.record(db, cur, "task.created", {
                    "task_id": clare.new_id(), "project_id": project_id, "title": f"write part {i} of the parser",
                    "description": "tokens first, then the tree", "priority": i % 5, "status": "todo"},
                    now_ms=now)
    finally:
        db.close()


def task_payloads(n_events: int) -> Iterator[tuple[str, dict]]:
    """Yield n_events of a realistic mix: each task is made, moved, assigned and noted on."""
    yield from itertools.islice(_task_story(), n_events)


def _task_story() -> Iterator[tuple[str, dict]]:
    for i in itertools.count():
        if i % 100 == 0:
            project_id = clare.new_id()
            yield "project.created", {"project_id": project_id, "name": f"project-{i // 100}", "goal": "",
                                      "owner": "", "status": "active"}
        task_id = clare.new_id()
        note = {"task_id": task_id, "session_id": None, "source": "message", "text": "progress: " + "x" * 60}
        yield "task.created", {"task_id": task_id, "project_id": project_id, "title": f"task {i}",
                               "description": "d" * 40, "priority": 2, "status": "todo"}
        yield "task.updated", {"task_id": task_id, "status": "in_progress"}
        yield "task.assigned", {"task_id": task_id, "session_id": clare.new_id()}
        yield "update.posted", {**note, "update_id": clare.new_id()}
        yield "update.posted", {**note, "update_id": clare.new_id()}
        yield "task.updated", {"task_id": task_id, "title": f"task {i}, second try", "priority": 1}
        yield "update.posted", {**note, "update_id": clare.new_id(), "source": "hook", "text": "ok"}
        yield "task.updated", {"task_id": task_id, "status": "blocked"}
        yield "task.unassigned", {"task_id": task_id}
        yield "task.updated", {"task_id": task_id, "status": "done"}


def make_events(n_events: int, *, machine_id: str = "bench") -> Iterator[clare.Event]:
    """Yield n_events well-formed events with increasing HLCs, one per millisecond."""
    wall = 1_700_000_000_000
    for k, (event_type, payload) in enumerate(task_payloads(n_events)):
        yield clare.Event(str(uuid.uuid4()), f"{wall + k:013d}.000000.{machine_id}", machine_id, event_type,
                          payload, clare.iso_ms(wall + k))


def make_log(path: Path, n_events: int) -> int:
    """Create a database holding n_events events (stored by insert_events in one txn, then replayed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = clare.open_db(str(path), machine_id="bench")
    try:
        with clare.write_txn(db) as cur:
            clare.insert_events(cur, make_events(n_events))
        clare.replay(db)
        return clare.count_events(db)
    finally:
        db.close()


def export_log(db_path: Path, out: Path) -> None:
    """Write a database's log as JSON lines with `clare export`."""
    run([PY, str(CLARE_PY), "--db", str(db_path), "export", str(out)])


# --------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------

class Taskwarrior:
    """A private Taskwarrior: its own TASKRC and TASKDATA, no prompts, no hooks."""

    def __init__(self, where: Path):
        where.mkdir(parents=True, exist_ok=True)
        self.rc = where / "taskrc"
        self.rc.write_text("\n".join(TASKRC_LINES) + "\n")
        self.data = where / "data"
        self.data.mkdir(exist_ok=True)
        self.env = {**os.environ, "TASKRC": str(self.rc), "TASKDATA": str(self.data)}

    def fill(self, n_tasks: int) -> None:
        """Import n_tasks pending tasks in projects of 100, as one JSON file."""
        src = self.data.parent / "import.json"
        with open(src, "w") as f:
            for i in range(n_tasks):
                f.write(json.dumps({"uuid": str(uuid.uuid4()), "description": f"write part {i} of the parser",
                                    "status": "pending", "entry": "20260101T000000Z",
                                    "project": "alpha" if i < 100 else f"project-{i // 100}",
                                    "priority": "HML"[i % 3]}) + "\n")
        run(["task", "import", str(src)], env=self.env, timeout=1800)
        src.unlink()


def missing(program: str, package: str) -> str | None:
    """Return the n/a note when a peer program is not installed."""
    return None if shutil.which(program) else f"n/a (install {package})"


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

@group("list", *(f"list.{i}.floor" for i in range(5)), *(f"list.{i}.taskwarrior" for i in range(5)),
       *(f"list.{i}.twlist" for i in range(5)), "list.1.script", "list.1.module",
       *(f"add.{i}.floor" for i in range(5)), *(f"add.{i}.taskwarrior" for i in range(5)), "add.1.durability")
def bench_cli(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """`task list --json` and `task add` at each size, beside the floor and Taskwarrior."""
    tw_missing = missing("task", "taskwarrior")
    clare_cmd = clare_command(work)
    # The goals: list <= 1.5x the floor at 100 tasks and <= 2x at 10,000; at 10,000 <= 0.7x
    # `task export` and <= 0.3x `task list`; add <= 1.5x the floor and faster than `task add`.
    goals = {1: ("<= 1.5x", "", "", "<= 1.5x", "< 1x"), 3: ("<= 2x", "<= 0.7x", "<= 0.3x", "<= 1.5x", "< 1x")}
    for i, n in enumerate(sizes.tasks):
        home = work / f"tasks-{n}"
        make_tasks_home(home, n)
        tw = None if tw_missing else Taskwarrior(work / f"tw-{n}")
        if tw:
            tw.fill(n)
        size_note = {0: ", 10x less", 2: ", growth", 4: ", 10x more"}.get(i, "")
        g_list, g_tw, g_twlist, g_add, g_add_tw = goals.get(i, ("", "", "", "", ""))
        cmds = {"clare": ([*clare_cmd, "task", "list", "--json"], clare_env(home)), "floor": (FLOOR, None)}
        if tw:
            cmds["tw"] = (["task", "export"], tw.env)
            cmds["twlist"] = (["task", "list"], tw.env)
        check = json.loads(run(cmds["clare"][0], env=cmds["clare"][1]).stdout)
        if len(check) != n:
            raise BenchError(f"task list printed {len(check)} tasks, expected {n}")
        t = time_interleaved(cmds, sizes.cli_runs)
        what = f"{n:,} tasks{size_note}"
        rows[f"list.{i}.floor"] = timed_row(f"list.{i}.floor", f"`task list --json`, {what}", g_list, t,
                                            "clare", "floor", "interpreter floor")
        if i == 1:
            rows["list.1.script"], rows["list.1.module"] = list_other_ways(home, what, sizes)
        rows[f"list.{i}.taskwarrior"] = timed_row(
            f"list.{i}.taskwarrior", f"`task list --json` vs `task export`, {what}", g_tw, t, "clare", "tw",
            "Taskwarrior `task export`", note=tw_missing or "")
        rows[f"list.{i}.twlist"] = timed_row(
            f"list.{i}.twlist", f"`task list --json` vs `task list`, {what}", g_twlist, t, "clare", "twlist",
            "Taskwarrior `task list`", note=tw_missing or "")
        add = {"clare": ([*clare_cmd, "task", "add", "alpha", "one more task"], clare_env(home)),
               "floor": (FLOOR, None)}
        if tw:
            add["tw"] = (["task", "add", "one more task", "project:alpha"], tw.env)
        if i == 1:  # what durability costs: the same add with SQLite's synchronous=NORMAL
            add["normal"] = (add["clare"][0], {**clare_env(home), "CLARE_SYNCHRONOUS": "NORMAL"})
        t = time_interleaved(add, sizes.cli_runs)
        rows[f"add.{i}.floor"] = timed_row(f"add.{i}.floor", f"`task add`, {what}", g_add, t, "clare", "floor",
                                           "interpreter floor")
        rows[f"add.{i}.taskwarrior"] = timed_row(
            f"add.{i}.taskwarrior", f"`task add` vs Taskwarrior, {what}", g_add_tw, t, "clare", "tw",
            "Taskwarrior `task add`", note=tw_missing or "")
        if i == 1:
            rows["add.1.durability"] = timed_row(
                "add.1.durability", f"`task add`, {what}: what durability costs (synchronous=FULL, the default, "
                "vs NORMAL)", "", t, "clare", "normal", "the same add, CLARE_SYNCHRONOUS=NORMAL")
        shutil.rmtree(home)
        if tw:
            shutil.rmtree(tw.data.parent)


def clare_command(work: Path) -> list[str]:
    """Return how a user runs Clare: the launcher `clare install` writes, else `python3 clare.py`."""
    if not has_command("install"):
        return [PY, str(CLARE_PY)]
    run([PY, str(CLARE_PY), "install", "--bin", str(work / "bin")])
    return [str(work / "bin" / "clare")]


def list_other_ways(home: Path, what: str, sizes: Sizes) -> tuple[Row, Row]:
    """`task list --json` run as `python3 clare.py` (compiled on every start) and as `python3 -m clare`."""
    env = clare_env(home)
    cmds = {"script": ([PY, str(CLARE_PY), "task", "list", "--json"], env),
            "module": ([PY, "-m", "clare", "task", "list", "--json"], {**env, "PYTHONPATH": str(ROOT)}),
            "floor": (FLOOR, None)}
    t = time_interleaved(cmds, sizes.cli_runs)
    return (timed_row("list.1.script", f"`task list --json`, {what}, as `python3 clare.py` (no launcher: the file "
                      "is compiled on every run)", "", t, "script", "floor", "interpreter floor"),
            timed_row("list.1.module", f"`task list --json`, {what}, as `python3 -m clare` beside the file "
                      "(cached bytecode)", "<= 1.5x", t, "module", "floor", "interpreter floor"))


def bare_replay(path: Path) -> tuple[float, float]:
    """Read every event, parse its JSON and upsert one table, in one transaction; return wall and CPU s."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS bench_bare (id TEXT PRIMARY KEY, event_type TEXT, v TEXT)")
        started, cpu = time.perf_counter(), time.process_time()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM bench_bare")
        upsert = ("INSERT INTO bench_bare (id, event_type, v) VALUES (?, ?, ?) ON CONFLICT (id) DO UPDATE "
                  "SET event_type = excluded.event_type, v = excluded.v")
        for ev_uuid, hlc, event_type, payload in conn.execute(
                "SELECT uuid, hlc, event_type, payload FROM events ORDER BY rseq"):
            p = json.loads(payload)
            conn.execute(upsert, (p.get("task_id") or p.get("project_id"), event_type, f"{hlc} {ev_uuid}"))
        conn.execute("COMMIT")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        conn.execute("DROP TABLE bench_bare")
        return seconds, cpu
    finally:
        conn.close()


def clare_replay(path: Path) -> tuple[float, float]:
    """Run Clare's replay on a freshly opened database; return wall and CPU seconds."""
    db = clare.open_db(str(path))
    try:
        started, cpu = time.perf_counter(), time.process_time()
        clare.replay(db)
        return time.perf_counter() - started, time.process_time() - cpu
    finally:
        db.close()


@group("replay", "replay.0", "replay.1", "replay.2")
def bench_replay(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """Replay of the whole log beside a bare read-parse-upsert loop over the same rows."""
    for i, n in enumerate(sizes.replay):
        path = work / f"replay-{n}.db"
        n = make_log(path, n)
        clare_s, bare_s = [], []
        for _ in range(sizes.replay_runs):
            clare_s.append(clare_replay(path))
            bare_s.append(bare_replay(path))
        last = i == len(sizes.replay) - 1
        (wall, cpu), (base_wall, base_cpu) = (
            (statistics.median(x[0] for x in xs) * 1000, statistics.median(x[1] for x in xs) * 1000)
            for xs in (clare_s, bare_s))
        rows[f"replay.{i}"] = Row(f"replay.{i}", f"`replay`, {n:,} events" + ("" if last else ", growth"),
                                  ">= 0.5x" if last else "", unit="ev/s", clare=n / wall * 1000,
                                  base=n / base_wall * 1000, base_name="bare loop, one txn",
                                  cpu=cpu_text(cpu, wall), base_cpu=cpu_text(base_cpu, base_wall))
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{path}{suffix}")


@group("append", "append.services", "append.import")
def bench_append(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """Appending through the services, one call (one commit) per event and one batch, beside bare INSERT loops.

    One call per event compares with a bare loop that commits once per row too, at the same
    synchronous setting (FULL unless CLARE_SYNCHRONOUS says otherwise); the batch with one transaction.
    """
    n = sizes.append
    home = work / "append"
    make_tasks_home(home, n)  # the projects: alpha, project-1, ... of 100 tasks each
    db = clare.open_db(str(home / "clare.db"))
    svc = clare.Services(db)
    names = [p.name for p in svc.list_projects()]
    n_before = svc.count_events()
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(n):  # each service call is its own transaction, as the CLI and the server make them
        svc.create_task(names[i % len(names)], f"task {i}")
    services_s, services_cpu = time.perf_counter() - started, time.process_time() - cpu
    rows_ = [tuple(r) for r in db.conn.execute(
        "SELECT uuid, hlc, machine_id, event_type, payload, created_at, hash FROM events WHERE rseq > ? ORDER BY "
        "rseq", (n_before,))]
    db.close()
    per_row_s, per_row_cpu = bare_insert(work / "bare-per-row.db", rows_, is_per_row=True)
    rows["append.services"] = Row(
        "append.services", f"append via services, one call per event, {n:,} tasks "
        f"(synchronous={clare.synchronous_mode()})", ">= 0.25x", unit="ev/s", clare=n / services_s,
        base=len(rows_) / per_row_s, base_name="bare INSERT loop, one commit per row",
        cpu=cpu_text(services_cpu * 1000, services_s * 1000), base_cpu=cpu_text(per_row_cpu * 1000, per_row_s * 1000))
    lines = work / "append.jsonl"
    export_log(home / "clare.db", lines)
    db = clare.open_db(str(work / "import.db"), machine_id="other")
    with open(lines) as f:
        text = f.readlines()
    started, cpu = time.perf_counter(), time.process_time()
    result, bad = clare.Services(db).import_events(text)
    import_s, import_cpu = time.perf_counter() - started, time.process_time() - cpu
    db.close()
    if bad or len(result.inserted) != len(text):
        raise BenchError(f"import stored {len(result.inserted)} of {len(text)} events: {bad[:1]}")
    batch_s, batch_cpu = bare_insert(work / "bare-insert.db", rows_, is_per_row=False)
    rows["append.import"] = Row(
        "append.import", f"append via services, one batch (import), {len(text):,} events", ">= 0.25x", unit="ev/s",
        clare=len(text) / import_s, base=len(rows_) / batch_s, base_name="bare INSERT, one txn",
        cpu=cpu_text(import_cpu * 1000, import_s * 1000), base_cpu=cpu_text(batch_cpu * 1000, batch_s * 1000))
    shutil.rmtree(home)


def bare_insert(path: Path, rows_: list[tuple], *, is_per_row: bool) -> tuple[float, float]:
    """INSERT rows into an events table of the same schema, in one txn or one per row; return wall and CPU s."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {clare.synchronous_mode() if is_per_row else 'NORMAL'}")
        conn.executescript(clare.EVENTS_SCHEMA)
        insert = ("INSERT OR IGNORE INTO events (uuid, hlc, machine_id, event_type, payload, created_at, hash) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?)")
        started, cpu = time.perf_counter(), time.process_time()
        if is_per_row:
            for r in rows_:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(insert, r)
                conn.execute("COMMIT")
        else:
            conn.execute("BEGIN IMMEDIATE")
            for r in rows_:
                conn.execute(insert, r)
            conn.execute("COMMIT")
        return time.perf_counter() - started, time.process_time() - cpu
    finally:
        conn.close()


def has_command(*path: str) -> bool:
    """Return whether clare.py has a CLI command."""
    return any(c.path == path for c in clare.COMMANDS)


def has_route(method: str, path: str) -> bool:
    """Return whether `clare serve` answers a method and path."""
    return any(m == method and rx.fullmatch(path) for m, rx, _ in getattr(clare, "ROUTES", ()))


@group("sync", "sync.less", "sync.full", "sync.incremental")
def bench_sync(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """A full sync into an empty peer beside `clare import` of the same events; an incremental sync."""
    is_ready = has_command("sync") and has_route("GET", "/api/v1/sync/events")
    incremental = Row("sync.incremental", "incremental sync of 10 new events between up-to-date peers", "<= 3x",
                      base_name="one HTTP round trip")
    rows["sync.incremental"] = incremental
    for key, n, goal in (("sync.less", sizes.sync // 10, ""), ("sync.full", sizes.sync, "<= 2x")):
        src = work / f"sync-src-{n}"
        n = make_log(src / "clare.db", n)
        row = rows[key] = Row(key, f"`clare sync` of {n:,} events into an empty peer, loopback"
                              + (", 10x less" if key == "sync.less" else ""), goal,
                              base_name="`clare import` of the same events")
        lines = work / "sync.jsonl"
        export_log(src / "clare.db", lines)
        row.base = median_of(lambda lines=lines: time_clare(work / "sync-import", "import", str(lines)), 3)
        lines.unlink()
        if not is_ready:
            row.note = incremental.note = "n/a (needs `clare sync` and the sync routes of `clare serve`)"
            continue
        server = ClareServer(src)
        try:
            row.clare = median_of(lambda url=server.url: time_clare(work / "sync-dst", "sync", url), 3)
            if count_events(work / "sync-dst" / "clare.db") != n:
                raise BenchError("the synced peer does not hold every event")
            if key == "sync.full":
                incremental.clare, incremental.base = incremental_sync(
                    src / "clare.db", work / "sync-dst" / "clare.db", server.url)
        finally:
            server.stop()


def time_clare(home: Path, *argv: str) -> float:
    """Return the ms of one `clare` command on a new, empty home."""
    shutil.rmtree(home, ignore_errors=True)
    started = time.perf_counter()
    run([PY, str(CLARE_PY), "--home", str(home), *argv])
    return (time.perf_counter() - started) * 1000


def count_events(path: Path) -> int:
    """Return how many events a database holds."""
    db = clare.open_db(str(path))
    try:
        return clare.count_events(db)
    finally:
        db.close()


def incremental_sync(src: Path, dst: Path, url: str, *, runs: int = 7) -> tuple[float, float]:
    """Return the median ms of a sync round that moves 10 new events, and of one HTTP round trip.

    Both in this process, so neither pays an interpreter start: the round trip is a GET of the
    sync page after the newest event, what a peer asks when it is up to date.
    """
    import urllib.request

    src_db, dst_db = clare.open_db(str(src)), clare.open_db(str(dst))
    svc = clare.Services(src_db)
    project = svc.list_projects()[0].id
    peer = clare.HttpPeer(url, token=os.environ["CLARE_TOKEN"])
    sync_ms, trip_ms = [], []
    try:
        clare.sync_with(dst_db, peer, name="bench")  # up to date, cursor saved
        for i in range(runs):
            for k in range(10):
                svc.create_task(project, f"new task {i}.{k}")
            started = time.perf_counter()
            report = clare.sync_with(dst_db, peer, name="bench")
            sync_ms.append((time.perf_counter() - started) * 1000)
            if report.n_pulled != 10:
                raise BenchError(f"an incremental sync pulled {report.n_pulled} events, expected 10")
            head = clare.count_events(src_db)
            started = time.perf_counter()
            with urllib.request.urlopen(authorized(f"{url}/api/v1/sync/events?after={head + 10**9}&limit=1000"),
                                        timeout=30) as reply:
                reply.read()
            trip_ms.append((time.perf_counter() - started) * 1000)
    finally:
        src_db.close()
        dst_db.close()
    return statistics.median(sync_ms), statistics.median(trip_ms)


def authorized(url: str) -> urllib.request.Request:
    """Return a GET of `url` that carries this run's token."""
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['CLARE_TOKEN']}"})


class FixedPage(http.server.BaseHTTPRequestHandler):
    """The tuned HTTP baseline: one prebuilt buffer (head + body), one write, keep-alive, TCP_NODELAY, no log."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY on every accepted socket
    response = b""  # set by serve_fixed_page: the whole answer, head and body, built once

    def do_GET(self) -> None:
        self.wfile.write(self.response)  # an unbuffered socket writer: one sendall

    def log_message(self, *args: object) -> None:
        pass


class FixedPageServer(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops connections under wrk and spoils p99
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # wrk resets its connections when it stops: not news


def fixed_response(n_body: int) -> bytes:
    """Return a whole HTTP/1.1 200 answer whose body is n_body bytes of HTML."""
    body = (b"<!doctype html><title>fixed</title>" + b"x" * n_body)[:n_body]
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def serve_fixed_page(n_body: int) -> None:
    """Serve FixedPage with an n_body-byte page on a free port; print the port; run until killed (a child)."""
    FixedPage.response = fixed_response(n_body)
    server = FixedPageServer(("127.0.0.1", 0), FixedPage)
    print(server.server_address[1], flush=True)
    server.serve_forever()


# Every server runs on one core and wrk on the other, so neither takes the other's time slices.
TASKSET = shutil.which("taskset")
SERVER_CORE, LOAD_CORE = 0, 1
CAN_PIN = TASKSET is not None and {SERVER_CORE, LOAD_CORE} <= os.sched_getaffinity(0)


def pinned(argv: list[str], core: int) -> list[str]:
    """Return argv run on one core with taskset, or argv itself when it cannot be pinned (main says so)."""
    return [TASKSET, "-c", str(core), *argv] if CAN_PIN and TASKSET else argv


def wrk(url: str, seconds: int) -> tuple[float, float]:
    """Return req/s and p99 latency in ms of wrk at 16 connections against url, pinned to the load core."""
    threads = "-t1" if CAN_PIN else "-t2"  # one core: one thread
    auth = f"Authorization: Bearer {os.environ['CLARE_TOKEN']}"  # the page itself, not the 401 of a stranger
    # --timeout: a slow answer counts with its latency (wrk's default 2 s would drop it as a timeout)
    out = run(pinned(["wrk", threads, "-c16", f"-d{seconds}s", "--timeout", "30s", "--latency", "-H", auth, url],
                     LOAD_CORE), timeout=seconds + 90).stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1])
    if rate == 0:
        raise BenchError(f"wrk completed no request in {seconds} s at {url}: each takes longer")
    if "Non-2xx" in out:
        raise BenchError(f"wrk got error answers from {url}: {out.strip().splitlines()[-3]}")
    value, unit = re.search(r"^\s+99%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M).groups()
    return rate, float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def cpu_ms_of(pid: int) -> float:
    """Return the CPU time (user + system) a running process has used so far, in ms."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


class Load:
    """wrk runs against one server; the median req/s, p99 and server CPU per request over them."""

    def __init__(self, url: str, pid: int):
        self.url, self.pid = url, pid
        self.runs: list[tuple[float, float, float]] = []  # req/s, p99 ms, server CPU ms per request

    def measure(self, seconds: int) -> None:
        """Run wrk once and keep its figures."""
        cpu = cpu_ms_of(self.pid)
        rate, p99 = wrk(self.url, seconds)
        self.runs.append((rate, p99, (cpu_ms_of(self.pid) - cpu) / (rate * seconds)))

    @property
    def rate(self) -> float:
        return statistics.median(r[0] for r in self.runs)

    @property
    def p99(self) -> float:
        return statistics.median(r[1] for r in self.runs)

    @property
    def cpu(self) -> str:
        return cpu_text(statistics.median(r[2] for r in self.runs), None, per="/req")


class FixedPageProcess:
    """The tuned baseline as a child process on the server core, serving a page of n_body bytes."""

    def __init__(self, n_body: int):
        self.child = subprocess.Popen(pinned([PY, str(Path(__file__).resolve()), "--serve-fixed-page", str(n_body)],
                                             SERVER_CORE), stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.child.stdout.readline())}/"

    def stop(self) -> None:
        self.child.terminate()
        self.child.wait(timeout=10)


class ClareServer:
    """`clare serve` on a free port, as a child process; stopped with SIGTERM."""

    def __init__(self, home: Path, *, env: dict[str, str] | None = None, is_pinned: bool = False):
        argv = [PY, str(CLARE_PY), "--home", str(home), "serve", "--port", "0"]
        self.child = subprocess.Popen(pinned(argv, SERVER_CORE) if is_pinned else argv, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.child.stdout.readline()
        m = re.search(r"(http://[0-9.:]+)/", line)
        if not m:
            self.stop()
            raise BenchError(f"clare serve did not say where it serves: {line.strip()!r}")
        self.url = m[1]

    def get(self, path: str) -> int:
        """GET a path; return the size of the body."""
        import urllib.request

        with urllib.request.urlopen(authorized(self.url + path), timeout=120) as reply:
            return len(reply.read())

    def peak_rss_mb(self) -> float:
        """Return the server's peak resident memory so far (VmHWM)."""
        with open(f"/proc/{self.child.pid}/status") as f:
            kb = int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)[1])
        return kb / 1024

    def stop(self) -> None:
        """Stop the server (SIGTERM: a clean shutdown) and reap it."""
        self.child.terminate()
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


@group("http", "http.rate", "http.p99", "http.moving.rate", "http.moving.p99", "http.less", "http.more")
def bench_http(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """`GET /` under wrk at 16 connections beside the tuned trivial server with a page of the same size.

    Runs interleaved (baseline, Clare, Clare while the log moves; three rounds), the servers pinned
    to one core and wrk to the other. The moving log: an event every 100 ms, as a fleet with hooks makes.
    """
    note = missing("wrk", "wrk") or ("" if has_command("serve") else "n/a (needs `clare serve`)")
    n_tasks = 5_000 if sizes is FULL else 500
    base_name = "tuned trivial server, page of the same size" + ("" if CAN_PIN else " (unpinned: no taskset)")
    rate_row = Row("http.rate", f"`GET /`, {dashboard_what(n_tasks)}: req/s at 16 connections", ">= 0.33x",
                   unit="req/s", base_name=base_name, note=note)
    p99_row = Row("http.p99", "`GET /` p99 latency at 16 connections", "<= 2x", base_name=base_name, note=note)
    moving_rate = Row("http.moving.rate", "`GET /` while the log moves (an event every 100 ms): req/s", ">= 0.5x",
                      unit="req/s", base_name="the same `GET /` over a static log", note=note)
    moving_p99 = Row("http.moving.p99", "`GET /` p99 latency while the log moves", "<= 3x",
                     base_name="the same `GET /` over a static log", note=note)
    growth = {key: Row(key, f"`GET /`, {dashboard_what(n)}, {what}: req/s at 16 connections", unit="req/s",
                       base_name=base_name, note=note)
              for key, n, what in (("http.less", n_tasks // 10, "10x less"), ("http.more", n_tasks * 10, "10x more"))}
    rows.update({r.key: r for r in (rate_row, p99_row, moving_rate, moving_p99, *growth.values())})
    if note:
        return
    base, static, moving = dashboard_under_wrk(work / "dashboard", n_tasks, sizes, runs=3, is_moving=True)
    rate_row.base, rate_row.clare, p99_row.base, p99_row.clare = base.rate, static.rate, base.p99, static.p99
    rate_row.cpu = p99_row.cpu = moving_rate.base_cpu = moving_p99.base_cpu = static.cpu
    rate_row.base_cpu = p99_row.base_cpu = base.cpu
    moving_rate.base, moving_rate.clare = static.rate, moving.rate
    moving_p99.base, moving_p99.clare = static.p99, moving.p99
    moving_rate.cpu = moving_p99.cpu = moving.cpu
    for row, n in ((growth["http.less"], n_tasks // 10), (growth["http.more"], n_tasks * 10)):
        base, static, _ = dashboard_under_wrk(work / f"dashboard-{n}", n, sizes, runs=1, is_moving=False)
        row.base, row.clare, row.cpu, row.base_cpu = base.rate, static.rate, static.cpu, base.cpu
        row.metric += f"; p99 {static.p99:.1f} ms (baseline {base.p99:.1f} ms)"


def dashboard_what(n_tasks: int) -> str:
    """Describe the data behind a dashboard row: projects of 100 tasks, a session per 25 tasks."""
    n_projects = max(1, n_tasks // 100)
    return f"{n_projects:,} project{'s' * (n_projects > 1)}, {n_tasks:,} tasks" + (
        f", {n_tasks // 25:,} sessions" if HAS_SESSIONS else " (no sessions: fleet not on main)")


def dashboard_under_wrk(home: Path, n_tasks: int, sizes: Sizes, *, runs: int,
                        is_moving: bool) -> tuple[Load, Load, Load]:
    """Return wrk's figures: the baseline, `GET /` over n_tasks, and the same while the log moves."""
    make_tasks_home(home, n_tasks, n_sessions=n_tasks // 25)
    server = ClareServer(home, is_pinned=True)
    fixed = None
    try:
        n_body = server.get("/")  # warm: the first request opens the database and fills the page cache
        fixed = FixedPageProcess(n_body)
        base, static = Load(fixed.url, fixed.child.pid), Load(server.url + "/", server.child.pid)
        moving = Load(server.url + "/", server.child.pid)
        for _ in range(runs):
            base.measure(sizes.wrk_seconds)
            static.measure(sizes.wrk_seconds)
            if is_moving:
                with LogMover(home):
                    moving.measure(sizes.wrk_seconds)
    finally:
        server.stop()
        if fixed is not None:
            fixed.stop()
    shutil.rmtree(home)
    return base, static, moving


class LogMover:
    """While in a `with`: one task change every 100 ms through the services, from a thread of its own."""

    def __init__(self, home: Path, every_s: float = 0.1):
        self.db_path, self.every_s = str(home / "clare.db"), every_s
        self.stopping = threading.Event()
        self.n_events, self.error = 0, None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        db = clare.open_db(self.db_path)
        try:
            svc = clare.Services(db)
            task_id = svc.list_tasks()[0].id
            deadline = time.monotonic()
            while not self.stopping.is_set():
                svc.edit_task(task_id, priority=self.n_events % 5)
                self.n_events += 1
                deadline += self.every_s
                self.stopping.wait(max(0.0, deadline - time.monotonic()))
        except (clare.ClareError, sqlite3.Error) as err:
            self.error = err
        finally:
            db.close()

    def __enter__(self) -> "LogMover":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        if self.error is not None or self.n_events == 0:
            raise BenchError(f"the log did not move: {self.error or 'no event written'}")


def make_transcripts(where: Path, n_files: int, total_bytes: int) -> list[Path]:
    """Write n_files Claude Code transcripts (JSON lines with token usage) of total_bytes in all."""
    where.mkdir(parents=True, exist_ok=True)
    size = total_bytes // n_files
    lines = []
    for k in range(40):
        lines.append(json.dumps({"type": "user", "message": {"role": "user", "content": f"step {k}: go on"},
                                 "uuid": str(uuid.UUID(int=2 * k))}))
        lines.append(json.dumps({"type": "assistant", "uuid": str(uuid.UUID(int=2 * k + 1)), "message": {
            "id": f"msg_{k}", "role": "assistant", "content": [{"type": "text", "text": "done: " + "y" * 600}],
            "stop_reason": "end_turn", "usage": {"input_tokens": 10, "output_tokens": 20,
                                                 "cache_read_input_tokens": 300}}}))
    block = ("\n".join(lines) + "\n").encode()
    body = block * (size // len(block) + 1)
    body = body[:body.rindex(b"\n", 0, size) + 1]
    paths = []
    for i in range(n_files):
        p = where / f"{uuid.UUID(int=i)}.jsonl"
        p.write_bytes(body)
        paths.append(p)
    return paths


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (their own pages only, nothing else's)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_tails(paths: list[Path], *, cold: bool) -> float:
    """Read the last 64 KB of each file in a bare loop; return ms. Cold: evict the files first."""
    if cold:
        evict(paths)
    started = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            f.seek(-65536, os.SEEK_END)
            f.read(65536)
    return (time.perf_counter() - started) * 1000


PULL_PASS = """
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
import clare
db = clare.open_db(sys.argv[2])
paths = sys.argv[3:]
started = time.perf_counter()
cache = clare.get_transcript_cache(db)
fresh = []
for path in paths:  # what _observe does for each session's transcript
    reading = clare.read_transcript(path, cache.get(path))
    if reading is not None and reading is not cache.get(path):
        fresh.append((path, path[-42:-6], *reading))
if fresh:
    clare.save_transcript_cache(db, fresh)
ms = (time.perf_counter() - started) * 1000
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's size at fork
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1])
print(json.dumps({"ms": ms, "rss_mb": hwm_kb / 1024, "n_read": len(fresh)}))
"""


def pull_pass(paths: list[Path], db_path: Path) -> dict:
    """Run pull's transcript pass over the files in a fresh process; return ms, peak RSS, files read."""
    out = run([PY, "-c", PULL_PASS, str(ROOT), str(db_path), *map(str, paths)]).stdout
    return json.loads(out)


@group("pull", "pull.cold", "pull.warm")
def bench_pull(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """`clare pull`'s transcript pass, cold and warm, beside reading the files' tails in a bare loop."""
    paths = make_transcripts(work / "transcripts", sizes.transcripts, sizes.transcript_bytes)
    cold = median_of(lambda: read_tails(paths, cold=True), 3)
    warm = median_of(lambda: read_tails(paths, cold=False), 5)
    what = f"{sizes.transcripts:,} transcripts, {sizes.transcript_bytes / 1024**3:.3g} GB"
    cold_row = Row("pull.cold", f"`clare pull` transcript pass, {what}, cold (first look, files not cached)", "",
                   base=cold, base_name="bare loop reading each file's last 64 KB")
    warm_row = Row("pull.warm", f"`clare pull` transcript pass, {what}, warm (unchanged since the last pull)",
                   "<= 2x", base=warm, base_name="bare loop reading each file's last 64 KB")
    rows["pull.cold"], rows["pull.warm"] = cold_row, warm_row
    if not hasattr(clare, "read_transcript"):
        cold_row.note = warm_row.note = "n/a (needs `clare pull`)"
        return
    colds, warms = [], []
    for _ in range(3):
        db_path = work / "pull.db"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{db_path}{suffix}")
        clare.open_db(str(db_path), machine_id="bench").close()
        evict(paths)
        colds.append(pull_pass(paths, db_path))
        warms.append(pull_pass(paths, db_path))
    cold_row.clare = statistics.median(r["ms"] for r in colds)
    warm_row.clare = statistics.median(r["ms"] for r in warms)
    cold_row.metric += f"; peak RSS {max(r['rss_mb'] for r in colds):.0f} MB"
    warm_row.metric += f"; peak RSS {max(r['rss_mb'] for r in warms):.0f} MB"
    if any(r["n_read"] != len(paths) for r in colds) or any(r["n_read"] for r in warms):
        raise BenchError("the transcript pass did not read every file once")
    shutil.rmtree(work / "transcripts")


FLEET_PULL_PASS = """
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import clare
db = clare.open_db(sys.argv[2], machine_id="bench")
first = clare.pull_fleet(db, config={}, now_ms=clare.now_ms())
times, n_events = [], 0
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    n_events += len(clare.pull_fleet(db, config={}, now_ms=clare.now_ms()).events)
    times.append((time.perf_counter() - t) * 1000)
print(json.dumps({"ms": statistics.median(times), "n_sessions": len(first.observations), "n_events": n_events}))
"""


class BenchFleet:
    """Claude panes in a private tmux server: each a process named claude with its registry entry and transcript.

    What a pull reads is real (tmux, /proc, the registry, transcripts); the processes are `sleep`
    under the name claude, so 200 of them cost nothing while the pull is measured.
    """

    def __init__(self, n_panes: int):
        self.base = Path(tempfile.mkdtemp(prefix="clare-bf-"))  # short: a socket path must fit in 108 bytes
        self.claude_dir = self.base / "claude"
        (self.claude_dir / "sessions").mkdir(parents=True)
        (self.base / "t").mkdir()  # without it tmux falls back to /tmp: never the user's server
        self.env = {**os.environ, "TMUX_TMPDIR": str(self.base / "t"), "CLAUDE_CONFIG_DIR": str(self.claude_dir),
                    "CLARE_HOME": str(self.base / "clare")}
        self.env.pop("TMUX", None)
        self.socket = str(self.base / "t" / f"tmux-{os.getuid()}" / "bench")
        self.sessions: dict[str, tuple[int, str, str]] = {}  # session id -> (pid, pane, cwd)
        for i in range(n_panes):
            cwd = self.base / "work" / f"p{i}"
            cwd.mkdir(parents=True)
            self.tmux("new-session", "-d", "-s", f"s{i}", "-x", "80", "-y", "24", "-c", str(cwd),
                      "bash", "-c", "exec -a claude sleep 1000000")
        for line in self.tmux("list-panes", "-a", "-F", "#{pane_id} #{pane_pid} #{session_name}").splitlines():
            pane, pid, name = line.split(" ", 2)
            cwd = str(self.base / "work" / f"p{name[1:]}")
            sid = str(uuid.uuid4())
            self.sessions[sid] = (int(pid), pane, cwd)
            self.write_registry(sid, "idle")
            transcript = self.claude_dir / "projects" / clare.cwd_slug(cwd) / f"{sid}.jsonl"
            transcript.parent.mkdir(parents=True, exist_ok=True)
            stamp = clare.iso_ms(clare.now_ms() - 5000)
            transcript.write_text("".join(json.dumps(line) + "\n" for line in (
                {"type": "user", "sessionId": sid, "cwd": cwd, "timestamp": stamp,
                 "message": {"role": "user", "content": "hello"}},
                {"type": "assistant", "sessionId": sid, "cwd": cwd, "timestamp": stamp,
                 "message": {"id": f"msg_{sid[:8]}", "role": "assistant", "content": [{"type": "text", "text": "hi"}],
                             "usage": {"input_tokens": 3, "output_tokens": 2}}},
                {"type": "system", "subtype": "turn_duration", "durationMs": 10, "timestamp": stamp})))

    def tmux(self, *args: str) -> str:
        return run(["tmux", "-L", "bench", "-f", "/dev/null", *args], env=self.env).stdout

    def write_registry(self, sid: str, status: str) -> int:
        """Write a session's registry entry as Claude does when its status changes; return the time (ms)."""
        pid, _, cwd = self.sessions[sid]
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        at = clare.now_ms()
        entry = {"pid": pid, "procStart": stat[stat.rfind(b")") + 2:].split()[19].decode(), "sessionId": sid,
                 "cwd": cwd, "status": status, "statusUpdatedAt": at, "version": "bench", "kind": "interactive"}
        path = self.claude_dir / "sessions" / f"{pid}.json"
        path.with_suffix(".tmp").write_text(json.dumps(entry))
        os.replace(path.with_suffix(".tmp"), path)
        return at

    def stop(self) -> None:
        subprocess.run(["tmux", "-L", "bench", "-f", "/dev/null", "kill-server"], env=self.env, capture_output=True,
                       timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)


def time_list_panes(fleet: BenchFleet, runs: int = 7) -> float:
    """Return the median time of the one `tmux list-panes -a` a pull must run per server, in ms."""
    return median_of(lambda: time_cmd([clare.tmux_binary(), "-S", fleet.socket, "list-panes", "-a", "-F",
                                       clare.PANE_FORMAT], fleet.env)[0], runs)


@group("fleet", "fleet.pull.0", "fleet.pull.1", "fleet.latency.nohooks", "fleet.latency.hooks")
def bench_fleet(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """A pull that finds nothing changed, at two fleet sizes; and a state change's latency to the dashboard."""
    note = missing("tmux", "tmux")
    for i, n in enumerate(sizes.panes):
        rows[f"fleet.pull.{i}"] = Row(f"fleet.pull.{i}", f"`pull` finding nothing changed, {n} Claude panes "
                                      "(in `serve`'s loop)", "<= 10x", base_name="one `tmux list-panes -a`",
                                      note=note or "")
    poll_ms = getattr(clare, "FLEET_POLL_S", clare.POLL_S) * 1000
    lat = {key: Row(f"fleet.latency.{key}", f"state change to the dashboard's row, {what}, poll interval included "
                    "(median of 5)", goal, note=note or "", base=poll_ms,
                    base_name="the dashboard's poll interval: the most it adds")
           for key, what, goal in (("nohooks", "without hooks", "<= 3000 ms"),
                                   ("hooks", "with hooks", "<= 2500 ms"))}
    rows.update({f"fleet.latency.{k}": r for k, r in lat.items()})
    if note:
        return
    if not hasattr(clare, "pull_fleet"):
        for r in (*lat.values(), *(rows[f"fleet.pull.{i}"] for i in range(len(sizes.panes)))):
            r.note = "n/a (needs `clare pull`)"
        return
    for i, n in enumerate(sizes.panes):
        fleet = BenchFleet(n)
        try:
            rows[f"fleet.pull.{i}"].base = time_list_panes(fleet)
            out = json.loads(run([PY, "-c", FLEET_PULL_PASS, str(ROOT), str(fleet.base / "pull.db"), "7"],
                                 env=fleet.env).stdout)
            if out["n_sessions"] != n or out["n_events"]:
                raise BenchError(f"the pull saw {out['n_sessions']} of {n} sessions and wrote {out['n_events']} "
                                 "events where nothing changed")
            rows[f"fleet.pull.{i}"].clare = out["ms"]
        finally:
            fleet.stop()
    for key, r in lat.items():
        r.clare = fleet_latency(is_hooked=key == "hooks")


def fleet_latency(*, is_hooked: bool, n_tries: int = 5) -> float:
    """Median ms from a session's state change to the dashboard's row showing it, as a browser polls it."""
    import random
    import urllib.request

    fleet = BenchFleet(3)
    (fleet.base / "clare").mkdir()
    server = None
    try:
        server = ClareServer(fleet.base / "clare", env=fleet.env)
        sid, (pid, pane, cwd) = next(iter(fleet.sessions.items()))
        # The command `clare hooks install` writes (it imports clare: cached bytecode, not a script compiled anew).
        hook_argv = shlex.split(clare.hook_command(str(fleet.base / "clare" / "clare.db")))
        poll_s = getattr(clare, "FLEET_POLL_S", clare.POLL_S)
        label = clare.SESSION_LABELS

        def row_state() -> str:
            with urllib.request.urlopen(authorized(server.url + "/frag/fleet"), timeout=30) as reply:
                page = reply.read().decode()
            at = page.find(f'data-row="/sessions/{sid}"')
            row = page[at:page.find("</tr>", at)] if at >= 0 else ""
            return next((s for s, text in label.items() if f">{text}<" in row), "")

        deadline = time.monotonic() + 30
        while row_state() != "waiting":  # serve found the session
            if time.monotonic() > deadline:
                raise BenchError("serve did not show the bench session within 30 s")
            time.sleep(0.2)
        latencies = []
        for n in range(n_tries):
            status, want = ("busy", "working") if n % 2 == 0 else ("idle", "waiting")
            time.sleep(random.uniform(0, poll_s))  # the browser's poll has its own phase
            if is_hooked:  # Claude starts its hook as the state changes; no registry change to find
                changed = clare.now_ms()
                event = "UserPromptSubmit" if want == "working" else "Stop"
                run(hook_argv, env={**fleet.env, "TMUX_PANE": pane, "TMUX": f"{fleet.socket},1,0"},
                    stdin=json.dumps({"session_id": sid, "cwd": cwd, "hook_event_name": event}))
            else:
                changed = fleet.write_registry(sid, status)
            next_poll = time.monotonic() + random.uniform(0, poll_s)
            while True:
                time.sleep(max(0.0, next_poll - time.monotonic()))
                if row_state() == want:
                    latencies.append(clare.now_ms() - changed)
                    break
                next_poll += poll_s
                if clare.now_ms() - changed > 60_000:
                    raise BenchError(f"the dashboard did not show {want} within 60 s")
        return statistics.median(latencies)
    finally:
        if server is not None:
            server.stop()
        fleet.stop()


SERVE_PATHS = ("/", "/projects", "/frag/projects", "/frag/activity", "/api/v1/status", "/api/v1/projects",
               "/api/v1/tasks", "/api/v1/events", "/api/v1/updates")


@group("serve", "serve.rss")
def bench_serve(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """Peak RSS of `clare serve` over a large log, after it served each page and list once."""
    row = Row("serve.rss", f"peak RSS of `serve`, {sizes.serve_events:,} events", "<= 100 MB", unit="MB")
    rows["serve.rss"] = row
    if not has_command("serve"):
        row.note = "n/a (needs `clare serve`)"
        return
    home = work / "serve"
    make_log(home / "clare.db", sizes.serve_events)
    server = ClareServer(home)
    try:
        for path in SERVE_PATHS:
            server.get(path)
        row.clare = server.peak_rss_mb()
    finally:
        server.stop()
    row.base_name = f"none; measured after GET of {len(SERVE_PATHS)} pages and lists"


@group("dispatch", "dispatch.off", "dispatch.on")
def bench_dispatch(rows: dict[str, Row], sizes: Sizes, work: Path) -> None:
    """The dispatch round every pull runs (issue #16), beside the readiness query it needs anyway."""
    n = sizes.tasks[-2]
    db = clare.open_db(str(work / "dispatch.db"), machine_id="bench")
    try:
        now = clare.now_ms()
        projects = [clare.create_project(db, f"p{i}", now_ms=now) for i in range(50)]
        with clare.write_txn(db) as cur:  # tasks in bulk: one transaction
            for i in range(n):
                clare.record(db, cur, "task.created", {"task_id": clare.new_id(), "project_id": projects[i % 50].id,
                                                       "title": f"t{i}", "description": "", "priority": i % 5,
                                                       "status": "todo"}, now_ms=now + i)

        def per_call_ms(fn: Callable[[], object], runs: int = 200) -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(runs):
                fn()
            return (time.perf_counter() - wall) * 1000 / runs, (time.process_time() - cpu) * 1000 / runs

        def round_() -> object:
            return clare.dispatch_round(db, config={}, now_ms=now)

        def ready() -> object:
            return clare.list_ready_tasks(db, project_id=projects[0].id)

        for key, label in (("dispatch.off", "no project dispatching here"),
                           ("dispatch.on", "one project dispatching, all its tasks bound")):
            if key == "dispatch.on":
                clare.edit_project(db, "p0", dispatch=True, max_sessions=1, now_ms=now)
                with clare.write_txn(db) as cur:  # nothing ready: the round looks and places nothing
                    for t in clare.list_tasks(db, project_id=projects[0].id):
                        clare.record(db, cur, "task.updated", {"task_id": t.id, "status": "in_progress"}, now_ms=now)
            (wall, cpu), (base_wall, base_cpu) = per_call_ms(round_), per_call_ms(ready)
            rows[key] = Row(key, f"dispatch round in each pull (every second under serve), {label}, {n:,} tasks",
                            "<= 1 ms" if key == "dispatch.off" else "<= 5 ms", clare=wall, base=base_wall,
                            base_name="the project's ready-task query alone", cpu=cpu_text(cpu, wall),
                            base_cpu=cpu_text(base_cpu, base_wall))
    finally:
        db.close()


ROW_KEYS = tuple(key for _, _, keys in GROUPS for key in keys)  # every row of the table, in order


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

def fmt(value: float | None, unit: str) -> str:
    """Format one figure with its unit."""
    if value is None:
        return ""
    if unit in ("ev/s", "req/s"):
        return f"{value / 1000:,.1f}k {unit}" if value >= 10_000 else f"{value:,.0f} {unit}"
    if unit == "ms" and value < 10:
        return f"{value:.2f} ms"
    return f"{value:,.1f} {unit}" if value < 1000 else f"{value:,.0f} {unit}"


def table(rows: list[Row]) -> str:
    """Return the rows as a Markdown table: metric, Clare, baseline, ratio, goal, met, then CPU beside wall."""
    out = ["| metric | Clare | baseline | ratio | goal | met | Clare CPU | baseline CPU |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        clare_cell = fmt(r.clare, r.unit) or r.note or "n/a"
        base_cell = f"{fmt(r.base, r.unit)} ({r.base_name})" if r.base is not None else (
            r.note if r.note and r.clare is not None else r.base_name or "—")
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        goal = r.goal or "none (shows growth or cost)"
        met = "—" if not r.goal else {True: "yes", False: "**no**", None: "not measured"}[r.is_met]
        out.append(f"| {r.metric} | {clare_cell} | {base_cell} | {ratio} | {goal} | {met} | {r.cpu} | {r.base_cpu} |")
    return "\n".join(out)


def machine() -> str:
    """Return a line naming the date, machine and versions the table was measured on."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    peers = []
    for argv in (["task", "--version"], ["wrk", "-v"]):
        if shutil.which(argv[0]):
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            first = (p.stdout or p.stderr).strip().splitlines()
            peers.append(f"{argv[0]} {first[0].split()[1] if argv[0] == 'wrk' else first[0]}" if first else argv[0])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{when} · {os.cpu_count()} cores ({cpu}), load {load} · Python {platform.python_version()} "
            f"({os.path.realpath(PY)}) · SQLite {sqlite3.sqlite_version} · " + " · ".join(peers))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("CLARE_BENCH_QUICK")),
                        help="tiny sizes, for a smoke run (env CLARE_BENCH_QUICK=1)")
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX", help="run only these groups")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--serve-fixed-page", type=int, metavar="N_BODY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fixed_page is not None:
        serve_fixed_page(args.serve_fixed_page)
        return 0
    sizes = QUICK if args.quick else FULL
    # Every bind needs a token: one for the servers, `clare sync` and the in-process clients of this run.
    os.environ["CLARE_TOKEN"] = os.environ.get("CLARE_TOKEN") or f"bench-{os.getpid()}-" + "t" * 16
    rows: dict[str, Row] = {}
    print(f"Clare bench{' (quick)' if args.quick else ''}: {machine()}", file=sys.stderr, flush=True)
    if not CAN_PIN:
        print("note: taskset (util-linux) is missing or fewer than 2 cores are ours: servers and wrk run unpinned",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="clare-bench-") as tmp:
        for name, bench, _ in GROUPS:
            if args.only and not any(name.startswith(p) or p.startswith(name) for p in args.only):
                continue
            started = time.perf_counter()
            try:
                bench(rows, sizes, Path(tmp) / name)
            except (BenchError, OSError, sqlite3.Error, clare.ClareError, subprocess.SubprocessError) as err:
                for key in ROW_KEYS:
                    if key.split(".")[0] == name:
                        row = rows.setdefault(key, Row(key, key))
                        if row.clare is None and not row.note:
                            row.note = f"error: {err}"
            print(f"  {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    ordered = [rows[k] for k in ROW_KEYS if k in rows]
    print(f"\nMeasured {machine()}{' (quick sizes)' if args.quick else ''}\n")
    print(table(ordered))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "quick": args.quick, "rows": [
                {"key": r.key, "metric": r.metric, "clare": r.clare, "baseline": r.base, "ratio": r.ratio,
                 "unit": r.unit, "goal": r.goal, "met": r.is_met, "note": r.note, "cpu": r.cpu,
                 "baseline_cpu": r.base_cpu} for r in ordered]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
