"""Sync: the protocol functions, cursors, and the seeded multi-host convergence simulation.

The simulation (DESIGN §4) runs in-process: a SimLink calls the serving host's sync
functions through a JSON round trip and injects faults. CLARE_SEED=N replays one seed.
"""

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest

import clare
from conftest import ROOT, projection_digest, seeds

START_MS = 1_780_000_000_000  # 2026-05-28, a fixed start so runs are reproducible
YEAR_MS = 365 * 86_400_000


class SimCrash(Exception):
    """The process died: whatever its open transaction held is rolled back."""


class Host:
    """One Clare: a real SQLite file and a wall clock that is the simulation's time plus a skew."""

    def __init__(self, sim: "Sim", name: str):
        self.sim, self.name = sim, name
        self.path = str(sim.tmp / f"{name}.db")
        self.db = clare.open_db(self.path, machine_id=name)
        self.skew_ms = 0
        self.max_now_ms = 0  # the latest this host's wall clock ever read
        self.backup: str | None = None

    def now(self) -> int:
        ms = self.sim.t + self.skew_ms
        self.max_now_ms = max(self.max_now_ms, ms)
        return ms

    def reopen(self) -> None:
        self.db.close()
        self.db = clare.open_db(self.path)


class SimLink(clare.PeerTransport):
    """The client's view of one serving host: JSON in and out, with faults when the sim says so."""

    def __init__(self, sim: "Sim", server: Host):
        self.sim, self.server = sim, server
        self.url = f"sim://{server.name}"

    def pull(self, *, after: int, limit: int) -> dict:
        limit = self.sim.rng.choice([1, 2, 3, 7, limit])  # small pages: many pages per pull
        return self._deliver(lambda b: clare.sync_page(self.server.db, after=b["after"], limit=b["limit"],
                                                       now_ms=self.server.now()), {"after": after, "limit": limit})

    def push(self, body: dict) -> dict:
        return self._deliver(lambda b: clare.sync_accept(self.server.db, b, now_ms=self.server.now()), body)

    def digest(self) -> dict:
        return self._deliver(lambda b: clare.sync_digest(self.server.db, now_ms=self.server.now()), {})

    def day(self, day: str) -> dict:
        return self._deliver(lambda b: clare.sync_day(self.server.db, b["day"], now_ms=self.server.now()),
                             {"day": day})

    def fetch(self, uuids: list[str]) -> dict:
        return self._deliver(lambda b: clare.sync_fetch(self.server.db, b, now_ms=self.server.now()),
                             {"uuids": uuids})

    def serve(self, handle, body: dict) -> dict:
        """Run the serving host's handler; if that host dies meanwhile, it restarts and the client sees a reset."""
        try:
            return handle(body)
        except SimCrash:
            self.server.reopen()
            raise clare.ClareError("sim: connection reset (the server died)") from None

    def _deliver(self, handle, request: dict) -> dict:
        rng, fault = self.sim.rng, self.sim.pick_fault()
        text = json.dumps(request)
        if fault == "drop_request":
            raise clare.ClareError("sim: connection refused")
        if fault == "cut_request":
            text = text[:rng.randrange(len(text))]
        try:
            body = json.loads(text)
        except ValueError:
            raise clare.ClareError("sim: 400 the body is not JSON") from None
        if self.sim.faults_on and rng.random() < 0.1:
            self.sim.local_op(self.server)  # the serving host's people keep working during a sync
        answer = self.serve(handle, body)  # a ClareError here is the server's 4xx
        if fault == "duplicate":
            self.serve(handle, json.loads(text))
        if fault == "delay":
            self.sim.delayed.append((self, handle, text))
        if fault == "drop_response":
            raise clare.ClareError("sim: connection reset by peer")
        out = json.dumps(answer)
        if fault == "cut_response":
            out = out[:rng.randrange(len(out))]
        try:
            answer = json.loads(out)
        except ValueError:
            raise clare.ClareError("sim: the answer is not JSON") from None
        if fault == "reorder" and isinstance(answer.get("events"), list):
            rng.shuffle(answer["events"])
        return answer


TOPOLOGIES = {
    "chain": lambda n: [(i, i + 1) for i in range(n - 1)],
    "star": lambda n: [(0, i) for i in range(1, n)],
    "ring": lambda n: [(i, (i + 1) % n) for i in range(n)] if n > 3 else [(0, 1), (1, 2)],
}
FAULTS = ("drop_request", "drop_response", "duplicate", "delay", "cut_request", "cut_response", "reorder")


class Sim:
    def __init__(self, seed: int, tmp, *, needs_verify: bool = False):
        self.rng = random.Random(seed)
        self.tmp = tmp
        self.t = START_MS
        self.faults_on = True
        self.delayed: list = []
        self.needs_verify = needs_verify  # faults only anti-entropy can repair happened
        n_hosts = self.rng.randint(3, 5)
        self.hosts = [Host(self, f"h{i}") for i in range(n_hosts)]
        self.topology = self.rng.choice(sorted(TOPOLOGIES))
        self.edges = TOPOLOGIES[self.topology](n_hosts)
        # Some hosts never run `clare serve` (a laptop): their events travel only by push.
        self.is_serving = [self.rng.random() < 0.6 for _ in self.hosts]
        for a, b in self.edges:
            if not (self.is_serving[a] or self.is_serving[b]):
                self.is_serving[self.rng.choice((a, b))] = True
        self.links = {(x, y): SimLink(self, self.hosts[y]) for a, b in self.edges for x, y in ((a, b), (b, a))
                      if self.is_serving[y]}
        self.crash_rate = 0.0
        self.log: list[str] = []
        self.random_skews = True  # hosts' clocks jump at random during the run
        self.restores = True  # hosts go back to old backups (what they held only there is lost, by design)
        self.far_hosts: set[str] = set()  # hosts whose clock stamped events that no real time reaches in a test

    def pick_fault(self) -> str | None:
        if not self.faults_on or self.rng.random() > 0.25:
            return None
        return self.rng.choice(FAULTS)

    # --- random operations through the real service functions ---
    def local_op(self, host: Host) -> None:
        rng, db, now = self.rng, host.db, host.now()
        projects = clare.list_projects(db)
        tasks = clare.list_tasks(db)
        groups = clare.list_groups(db)
        sessions = clare.find_sessions(db)
        op = rng.choice(["project", "project", "task", "task", "task", "edit_task", "edit_task", "edit_task",
                         "edit_project", "assign", "assign", "unassign", "group", "rm_group", "update", "future",
                         "observe", "observe"])
        try:
            if op == "project" or (not projects and op in ("task", "edit_project")):
                clare.create_project(db, rng.choice(["alpha", "beta", "gamma", "delta"]), goal=f"g{rng.random():.3f}",
                                     now_ms=now)
            elif op == "task":
                clare.create_task(db, rng.choice(projects).id, f"t{rng.randrange(1000)}",
                                  priority=rng.randrange(5), now_ms=now)
            elif op == "edit_project":
                p = rng.choice(projects)
                clare.edit_project(db, p.id, **rng.choice([{"goal": f"g{rng.randrange(99)}"},
                                                           {"status": rng.choice(clare.PROJECT_STATUSES)},
                                                           {"name": rng.choice(["alpha", "omega", "zeta"])},
                                                           {"owner": rng.choice(["ana", "bo"])}]), now_ms=now)
            elif op == "edit_task" and tasks:
                t = rng.choice(tasks)
                clare.edit_task(db, t.id, **rng.choice([{"title": f"T{rng.randrange(99)}"},
                                                        {"status": rng.choice(clare.TASK_STATUSES)},
                                                        {"priority": rng.randrange(5)},
                                                        {"description": f"d{rng.randrange(99)}",
                                                         "status": rng.choice(clare.TASK_STATUSES)}]), now_ms=now)
            elif op == "assign" and tasks:
                t = rng.choice(tasks)
                if groups and rng.random() < 0.4:
                    clare.assign_task(db, t.id, group_ref=rng.choice(groups).id, now_ms=now)
                elif sessions:
                    clare.assign_task(db, t.id, session_id=rng.choice(sessions).id, now_ms=now)
            elif op == "unassign" and tasks:
                clare.unassign_task(db, rng.choice(tasks).id, now_ms=now)
            elif op == "group":
                clare.create_group(db, rng.choice(["backend", "night"]), cwd="/srv/" + host.name, now_ms=now)
            elif op == "rm_group" and groups:
                clare.remove_group(db, rng.choice(groups).id, now_ms=now)
            elif op == "update" and tasks:
                clare.post_update(db, f"note {rng.randrange(999)}", task_ref=rng.choice(tasks).id, now_ms=now)
            elif op == "observe":  # this host looks at its own Claude sessions: some appear, change, go
                mine = [f"{host.name[1]}{k}" + "0" * 30 for k in range(4)]
                clare.observe_sessions(db, [clare.Observation(
                    sid, f"/srv/{sid[:2]}", None, f"main:{k}", f"%{k}", None, "claude",
                    rng.choice(clare.SESSION_STATES[:4]), now - rng.randrange(60_000), "", {"input": k})
                    for k, sid in enumerate(mine) if rng.random() < 0.6], now_ms=now)
            elif op == "future":  # an event type from a newer Clare: stored and relayed, never applied
                with clare.write_txn(db) as cur:
                    clare.record(db, cur, "widget.spun", {"widget_id": clare.new_id(), "n": rng.randrange(9)},
                                 now_ms=now)
        except clare.ClareError:
            pass  # a refusal (a name taken here, say) is a normal outcome and leaves no trace

    def sync(self, a: int, b: int, *, verify: bool = False) -> clare.SyncReport | None:
        client = self.hosts[a]
        try:
            return clare.sync_with(client.db, self.links[(a, b)], name=f"h{b}", wall=client.now, verify=verify)
        except clare.ClareError:
            return None
        except SimCrash:
            client.reopen()
            return None

    def step(self) -> None:
        rng = self.rng
        self.t += rng.randrange(0, 4000)
        r = rng.random()
        if r < 0.5:
            self.local_op(rng.choice(self.hosts))
        elif r < 0.88:
            self.sync(*rng.choice(sorted(self.links)))
        elif r < 0.92:
            if not self.random_skews:
                return
            host = rng.choice(self.hosts)
            host.skew_ms = rng.choice([0, 0, -rng.randrange(10 * 60_000), rng.randrange(4 * 60_000),
                                       rng.randrange(20 * 60_000), YEAR_MS])
        elif r < 0.95 and self.delayed:
            link, handle, text = self.delayed.pop(rng.randrange(len(self.delayed)))
            with contextlib.suppress(clare.ClareError):
                link.serve(handle, json.loads(text))
        elif r < 0.97:
            if not self.restores:
                return
            host = rng.choice(self.hosts)
            host.backup = f"{host.path}.bak"
            if os.path.exists(host.backup):
                os.remove(host.backup)
            host.db.conn.execute("VACUUM INTO ?", (host.backup,))
        elif r < 0.98:
            backed = [h for h in self.hosts if h.backup]
            if backed:
                self.restore(rng.choice(backed), renew=not self.needs_verify or rng.random() < 0.5)
        elif self.needs_verify and r < 0.99:
            self.skip_cursor(rng.choice(self.hosts))

    def close(self) -> None:
        for host in self.hosts:
            host.db.close()

    def restore(self, host: Host, *, renew: bool) -> None:
        """Put an old backup in place of the host's file: `clare restore` (a new db_id), or a copy by hand."""
        if renew:
            clare.restore_db(host.db, host.backup)
            return
        host.db.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(host.path + suffix):
                os.remove(host.path + suffix)
        shutil.copyfile(host.backup, host.path)
        host.db = clare.open_db(host.path)

    def skip_cursor(self, host: Host) -> None:
        """Move a pull cursor past events never stored: a lost page only anti-entropy can find."""
        rows = host.db.conn.execute("SELECT peer_machine_id, peer_db_id, pulled_rseq FROM sync_cursors").fetchall()
        if rows:
            m, d, r = self.rng.choice(rows)
            rate, self.crash_rate = self.crash_rate, 0.0
            with clare.write_txn(host.db) as cur:
                clare.save_cursor(cur, m, d, pulled_rseq=r + self.rng.randrange(1, 5))
            self.crash_rate = rate

    def heal(self, *, verify: bool = False) -> int:
        """Sync along every edge, both ways, without faults, until a whole pass moves nothing.

        Clocks are fixed first, and real time passes every stamp: what a clock ahead made was held
        back (deferred) by the others, and comes through now.
        """
        self.faults_on = False
        self.crash_rate = 0.0
        for link, handle, text in self.delayed:
            with contextlib.suppress(clare.ClareError):
                link.serve(handle, json.loads(text))
        self.delayed.clear()
        assert_bounded(self)
        for host in self.hosts:
            host.skew_ms = 0
        newest = max((int(h.db.conn.execute("SELECT coalesce(max(hlc), '0') FROM events").fetchone()[0][:13])
                      for h in self.hosts if h.name not in self.far_hosts), default=0)
        self.t = max(self.t, newest + 1000)
        for n_pass in range(1, 3 * len(self.hosts) + 2):
            moved = 0
            for x, y in sorted(self.links):
                self.t += 1000
                report = self.sync(x, y, verify=verify)
                assert report is not None, f"sync h{x} -> h{y} failed during heal"
                moved += report.n_pulled + report.n_pushed
            if not moved:
                return n_pass
        raise AssertionError("no quiescence after many passes")


def event_set(db: clare.Db) -> set[tuple]:
    return {(e.uuid, e.hlc, e.machine_id, e.event_type, clare.canonical_json(e.payload), e.created_at)
            for e in clare.iter_events(db)}


def assert_bounded(sim: Sim) -> None:
    """No host stores an event stamped beyond the latest its wall clock read + MAX_OFFSET_MS."""
    for host in sim.hosts:
        newest = host.db.conn.execute("SELECT max(hlc) FROM events").fetchone()[0]
        assert newest is None or int(newest[:13]) <= host.max_now_ms + clare.MAX_OFFSET_MS, \
            f"{host.name} stored {newest}, beyond its clock's bound"


def assert_converged(sim: Sim) -> None:
    first = sim.hosts[0]
    events = event_set(first.db)
    digest = projection_digest(first.db)
    for host in sim.hosts:
        assert event_set(host.db) == events, f"{host.name} holds other events than {first.name}"
        assert projection_digest(host.db) == digest, f"{host.name}'s projections differ from {first.name}'s"
    for host in sim.hosts:
        clare.replay(host.db)
        assert projection_digest(host.db) == digest, f"{host.name}: incremental != replay"
        clock = clare.load_clock(host.db.conn.cursor(), machine_id=host.name, now_ms=host.now())
        assert clock is None or clock.wall_ms <= host.max_now_ms + clare.MAX_OFFSET_MS, \
            f"{host.name}'s clock was dragged past its now + MAX_OFFSET"


def _crashing(sim: Sim, real, *, when):
    """Wrap a clare function so the process 'dies' just before some of its calls."""
    def crashing(*args, **kw):
        if when(kw) and sim.rng.random() < sim.crash_rate:
            raise SimCrash(f"killed before {real.__name__}")
        return real(*args, **kw)
    return crashing


def run_sim(seed: int, tmp, monkeypatch, *, n_steps: int, needs_verify: bool = False) -> Sim:
    ids = random.Random(f"ids-{seed}")  # ids from the seed too, so CLARE_SEED replays a run exactly
    monkeypatch.setattr(clare, "new_uuid", lambda: str(uuid.UUID(int=ids.getrandbits(128), version=4)))
    sim = Sim(seed, tmp, needs_verify=needs_verify)
    sim.crash_rate = 0.05
    monkeypatch.setattr(clare, "PUSH_BATCH_EVENTS", sim.rng.choice([2, 5, 1000]))  # many batches per push
    # Deaths between storing a page and saving its cursor, and in the middle of storing it.
    monkeypatch.setattr(clare, "save_cursor", _crashing(sim, clare.save_cursor,
                                                        when=lambda kw: kw.get("pulled_rseq") is not None))
    monkeypatch.setattr(clare, "receive_events", _crashing(sim, clare.receive_events, when=lambda kw: True))
    for _ in range(n_steps):
        sim.step()
    return sim


@pytest.mark.parametrize("seed", seeds(250, "sync-sim"), ids=lambda s: f"seed={s}")
def test_random_fleet_converges_after_heal(seed, tmp_path, monkeypatch):
    sim = run_sim(seed, tmp_path, monkeypatch, n_steps=120)
    sim.heal()
    assert_converged(sim)
    sim.close()


def test_a_seed_replays_the_same_run(tmp_path, monkeypatch):
    runs = []
    for attempt in ("first", "second"):
        (tmp_path / attempt).mkdir()
        sim = run_sim(20261125, tmp_path / attempt, monkeypatch, n_steps=60)
        runs.append([sorted(event_set(h.db)) for h in sim.hosts])
        sim.close()
        monkeypatch.undo()
    assert runs[0] == runs[1] and any(runs[0])


@pytest.mark.parametrize("seed", seeds(40, "sync-sim-verify"), ids=lambda s: f"seed={s}")
def test_anti_entropy_repairs_lost_pages_and_unmarked_restores(seed, tmp_path, monkeypatch):
    sim = run_sim(seed, tmp_path, monkeypatch, n_steps=120, needs_verify=True)
    sim.heal(verify=True)
    assert_converged(sim)
    sim.close()


Y2286_MS = 9_990_000_000_000  # 2286-07-26: near the largest wall time an HLC can hold


def stored_keys(db: clare.Db) -> dict[str, str]:
    return dict(db.conn.execute("SELECT uuid, hlc FROM events"))


@pytest.mark.parametrize("seed", seeds(30, "sync-sim-clocks"), ids=lambda s: f"seed={s}")
def test_a_clock_2h_ahead_and_a_peer_in_2286_are_bounded_and_lose_nothing(seed, tmp_path, monkeypatch):
    """h0 runs 2 h ahead, then is fixed; the last host jumps to 2286, then is fixed (its HLC stays there).

    No host stores another's event beyond its own now + MAX_OFFSET; after heal (real time past the
    2 h) every event any host acknowledged is stored everywhere, except the 2286 ones: those stay
    on their host and are deferred, with a reason, by its neighbours. Projections stay a function
    of the stored events.
    """
    ids = random.Random(f"ids-{seed}")
    monkeypatch.setattr(clare, "new_uuid", lambda: str(uuid.UUID(int=ids.getrandbits(128), version=4)))
    sim = Sim(seed, tmp_path)
    sim.random_skews = sim.restores = False
    sim.crash_rate = 0.05
    monkeypatch.setattr(clare, "save_cursor", _crashing(sim, clare.save_cursor,
                                                        when=lambda kw: kw.get("pulled_rseq") is not None))
    monkeypatch.setattr(clare, "receive_events", _crashing(sim, clare.receive_events, when=lambda kw: True))
    ahead, far = sim.hosts[0], sim.hosts[-1]
    sim.far_hosts = {far.name}
    ahead.skew_ms = 2 * 3_600_000
    acknowledged: dict[str, str] = {}
    for step in range(160):
        if step == 40:
            far.skew_ms = Y2286_MS - sim.t
        if step == 80:
            far.skew_ms = ahead.skew_ms = 0  # both clocks fixed: their stored HLCs stay ahead
            assert clare.check_clock(ahead.db.conn, machine_id=ahead.name, now_ms=ahead.now()).hlc_message
        sim.step()
        assert_bounded(sim)
        for host in sim.hosts:
            acknowledged.update(stored_keys(host.db))
            if host is not far:
                newest = max(stored_keys(host.db).values(), default="0")
                assert int(newest[:13]) < Y2286_MS, f"{host.name} stored an event of 2286"
    sim.heal()
    bound = sim.t + clare.MAX_OFFSET_MS
    future = {u for u, hlc in acknowledged.items() if int(hlc[:13]) > bound}
    assert all(int(acknowledged[u][:13]) >= Y2286_MS for u in future)
    near = set(acknowledged) - future
    for host in sim.hosts:
        held = set(stored_keys(host.db))
        assert near <= held, f"{host.name} lacks {len(near - held)} acknowledged events"
        assert held - near <= (future if host is far else set()), f"{host.name} stores events beyond the bound"
    if future:
        deferred = {d.uuid for h in sim.hosts for d in clare.list_deferred(h.db)}
        assert future <= deferred, "an event beyond the bound is neither stored nor deferred"
        assert all("ahead of this host's clock" in d.reason for h in sim.hosts for d in clare.list_deferred(h.db))
    digest = projection_digest(sim.hosts[0].db)
    for host in sim.hosts:
        if host is not far or not future:
            assert projection_digest(host.db) == digest, f"{host.name}'s projections differ"
        before = projection_digest(host.db)
        clare.replay(host.db)
        assert projection_digest(host.db) == before, f"{host.name}: incremental != replay"
    sim.close()


# --- named cases -----------------------------------------------------------------------------

class Link(clare.PeerTransport):
    """A fault-free in-process link to one host, through JSON, counting the events it carries."""

    def __init__(self, server: "Node"):
        self.server = server
        self.url = f"sim://{server.db.machine_id}"
        self.n_events_carried = 0

    def _json(self, value: dict) -> dict:
        value = json.loads(json.dumps(value))
        self.n_events_carried += len(value.get("events", []))
        return value

    def pull(self, *, after: int, limit: int) -> dict:
        return self._json(clare.sync_page(self.server.db, after=after, limit=limit, now_ms=self.server.now()))

    def push(self, body: dict) -> dict:
        return self._json(clare.sync_accept(self.server.db, self._json(body), now_ms=self.server.now()))

    def digest(self) -> dict:
        return self._json(clare.sync_digest(self.server.db, now_ms=self.server.now()))

    def day(self, day: str) -> dict:
        return self._json(clare.sync_day(self.server.db, day, now_ms=self.server.now()))

    def fetch(self, uuids: list[str]) -> dict:
        return self._json(clare.sync_fetch(self.server.db, {"uuids": uuids}, now_ms=self.server.now()))


class Node:
    """A host for hand-written scenarios: a database and a clock that moves 1 s per reading."""

    def __init__(self, tmp, name: str, *, skew_ms: int = 0):
        self.db = clare.open_db(str(tmp / f"{name}.db"), machine_id=name)
        self.t = START_MS + skew_ms

    def now(self) -> int:
        self.t += 1000
        return self.t

    def sync(self, other: "Node", **kw) -> clare.SyncReport:
        return clare.sync_with(self.db, Link(other), name=other.db.machine_id, wall=self.now, **kw)


def test_relay_delivers_an_older_hlc_that_reached_the_relay_after_the_last_pull(nodes):
    a, b, c = nodes("a"), nodes("b"), nodes("c", skew_ms=-120_000)  # c's clock runs 2 min late
    clare.create_project(b.db, "alpha", now_ms=b.now())
    a.sync(b)
    newest_at_a = max(e.hlc for e in clare.iter_events(a.db))
    late = clare.create_project(c.db, "from-c", now_ms=c.now())  # made after a's pull, older HLC
    b.sync(c)
    assert [p.name for p in clare.list_projects(b.db)] == ["alpha", "from-c"]
    old_event = next(e for e in clare.iter_events(b.db) if e.payload.get("project_id") == late.id)
    assert old_event.hlc < newest_at_a  # a cursor "since the newest HLC a has seen" would skip it forever
    report = a.sync(b)
    assert report.n_pulled == 1
    assert [p.name for p in clare.list_projects(a.db)] == ["alpha", "from-c"]


def test_title_edited_on_a_and_status_on_c_both_survive_everywhere(nodes):
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    task = clare.create_task(a.db, clare.create_project(a.db, "alpha", now_ms=a.now()).id, "parse", now_ms=a.now())
    a.sync(b), c.sync(b)
    clare.edit_task(a.db, task.id, title="parse v2 files", now_ms=a.now())
    clare.edit_task(c.db, task.id, status="in_progress", now_ms=c.now())
    clare.edit_task(a.db, task.id, priority=0, now_ms=a.now())  # the same field on both: one winner
    clare.edit_task(c.db, task.id, priority=4, now_ms=c.now())
    for _ in range(2):
        a.sync(b), c.sync(b)
    results = [clare.get_task(n.db, task.id) for n in (a, b, c)]
    assert {(t.title, t.status) for t in results} == {("parse v2 files", "in_progress")}
    assert len({t.priority for t in results}) == 1
    last_priority_edit = max((e for e in clare.iter_events(a.db) if "priority" in e.payload and
                              e.event_type == "task.updated"), key=lambda e: (e.hlc, e.uuid))
    assert results[0].priority == last_priority_edit.payload["priority"]


def test_same_project_name_on_two_hosts_keeps_both_and_a_name_refuses_with_the_ids(nodes, home, cli):
    a = Node(home.parent, "a")
    a.db.close()
    a.db = clare.open_db(str(home / "clare.db"), machine_id="a")  # the database the CLI uses
    b = nodes("b")
    p1 = clare.create_project(a.db, "alpha", now_ms=a.now())
    p2 = clare.create_project(b.db, "alpha", now_ms=b.now())
    a.sync(b)
    for node in (a, b):
        assert sorted(p.id for p in clare.list_projects(node.db)) == sorted([p1.id, p2.id])
        with pytest.raises(clare.Conflict) as err:
            clare.get_project(node.db, "alpha")
        assert p1.id[:8] in str(err.value) and p2.id[:8] in str(err.value)
    a.db.close()
    ran = cli("task", "add", "alpha", "write the parser")
    assert ran.code != 0
    assert "ambiguous" in ran.err and p1.id[:8] in ran.err and p2.id[:8] in ran.err
    assert cli("task", "add", p1.id[:12], "write the parser").code == 0


def test_a_crash_between_storing_a_page_and_saving_the_cursor_stores_neither(nodes, monkeypatch):
    a, b = nodes("a"), nodes("b")
    for name in ("alpha", "beta"):
        clare.create_project(b.db, name, now_ms=b.now())

    def crash(*args, **kw):
        raise SimCrash("killed")
    real = clare.save_cursor
    monkeypatch.setattr(clare, "save_cursor", crash)
    with pytest.raises(SimCrash):
        a.sync(b)
    monkeypatch.setattr(clare, "save_cursor", real)
    assert clare.count_events(a.db) == 0 and clare.list_projects(a.db) == []
    assert a.sync(b).n_pulled == 2


def test_pull_then_push_does_not_send_events_back_and_push_then_pull_does_not_fetch_them(nodes):
    a, b = nodes("a"), nodes("b")
    for i in range(5):
        clare.create_project(b.db, f"b{i}", now_ms=b.now())
    link = Link(b)
    report = clare.sync_with(a.db, link, name="b", wall=a.now)
    assert (report.n_pulled, report.n_pushed, link.n_events_carried) == (5, 0, 5)
    for i in range(3):
        clare.create_project(a.db, f"a{i}", now_ms=a.now())
    link = Link(b)
    report = clare.sync_with(a.db, link, name="b", wall=a.now)
    assert (report.n_pulled, report.n_pushed) == (0, 3)
    assert link.n_events_carried == 3
    link = Link(b)
    assert clare.sync_with(a.db, link, name="b", wall=a.now).n_duplicates == 0
    assert link.n_events_carried == 0  # a's own events are not pulled back


def test_a_restored_peer_with_a_new_db_id_is_read_again_from_zero(nodes, tmp_path):
    a, b = nodes("a"), nodes("b")
    clare.create_project(b.db, "alpha", now_ms=b.now())
    backup = str(tmp_path / "b.bak")
    b.db.conn.execute("VACUUM INTO ?", (backup,))
    clare.create_project(b.db, "beta", now_ms=b.now())
    a.sync(b)
    old_id = b.db.db_id
    assert clare.restore_db(b.db, backup) != old_id
    clare.create_project(b.db, "gamma", now_ms=b.now())  # reuses the receipt number beta had
    report = a.sync(b)
    assert report.db_id == b.db.db_id and report.n_pulled == 1 and report.n_pushed == 1  # gamma in, beta back
    assert {p.name for p in clare.list_projects(b.db)} == {"alpha", "beta", "gamma"}


def test_a_peer_log_shorter_than_our_cursor_is_read_again_from_zero(nodes, tmp_path):
    a, b = nodes("a"), nodes("b")
    clare.create_project(b.db, "alpha", now_ms=b.now())
    a.sync(b)
    with clare.write_txn(a.db) as cur:  # as if b had been restored without a new db_id
        clare.save_cursor(cur, "b", b.db.db_id, pulled_rseq=50)
    clare.create_project(b.db, "beta", now_ms=b.now())
    assert a.sync(b).n_pulled == 1
    assert clare.get_cursor(a.db, "b", b.db.db_id)[0] == clare.head_rseq(b.db.conn)


def test_a_peer_a_year_ahead_is_reported_and_never_drags_our_clock(nodes):
    a, b = nodes("a"), nodes("b", skew_ms=YEAR_MS)
    clare.create_project(b.db, "future", now_ms=b.now())
    report = a.sync(b)
    assert report.is_skewed and report.offset_ms > YEAR_MS - 60_000
    assert "ahead of" in clare.skew_message("b", report.offset_ms)
    mine = clare.create_project(a.db, "mine", now_ms=a.now())
    mine_hlc = clare.parse_hlc(clare.list_history(a.db, [mine.id])[0].hlc)
    assert mine_hlc.wall_ms <= a.t + clare.MAX_OFFSET_MS  # not minted from the peer's future
    status = clare.list_peer_status(a.db)[0]
    assert status.offset_ms == report.offset_ms and status.last_error is None


def test_verify_finds_what_cursors_missed_in_both_directions(nodes):
    a, b = nodes("a"), nodes("b")
    clare.create_project(b.db, "alpha", now_ms=b.now())
    a.sync(b)
    clare.create_project(b.db, "beta", now_ms=b.now())
    clare.create_project(a.db, "gamma", now_ms=a.now())
    with clare.write_txn(a.db) as cur:  # both cursors wrongly past the new events
        clare.save_cursor(cur, "b", b.db.db_id, pulled_rseq=clare.head_rseq(b.db.conn),
                          pushed_rseq=clare.head_rseq(a.db.conn))
    assert (a.sync(b).n_pulled, a.sync(b).n_pushed) == (0, 0)
    report = a.sync(b, verify=True)
    assert report.verify["fetched"] == 1 and report.verify["sent"] == 1 and report.verify["days_differ"]
    assert projection_digest(a.db) == projection_digest(b.db)
    assert a.sync(b, verify=True).verify["days_differ"] == []


def test_a_long_sync_reports_progress_up_to_the_total(nodes):
    a, b = nodes("a"), nodes("b")
    with clare.write_txn(b.db) as cur:
        now = b.now()  # one reading: b's clock must not run 7,000 s ahead of a's
        for i in range(7000):
            clare.record(b.db, cur, "widget.spun", {"n": i}, now_ms=now)
    seen = []
    report = clare.sync_with(a.db, Link(b), name="b", wall=a.now, progress=lambda *p: seen.append(p))
    assert report.n_pulled == 7000 and report.n_behind == 0
    assert seen == [("pulled", clare.SYNC_PAGE_LIMIT, 7000), ("pulled", 7000, 7000)]


# --- garbage from a peer ------------------------------------------------------------------------

def _event(**over) -> dict:
    ev = {"uuid": "0b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", "hlc": f"{START_MS:013d}.000000.peer",
          "machine_id": "peer", "event_type": "project.created", "created_at": "2026-05-28T00:00:00.000Z",
          "payload": {"project_id": "p" * 32, "name": "alpha", "goal": "", "owner": "", "status": "active"}}
    return {**ev, **over}


@pytest.mark.parametrize("body, says", [
    (None, '"events" list'), ([], '"events" list'), ("events", '"events" list'), ({"events": {}}, '"events" list'),
    ({"events": [_event()] * 100_000}, "over the limit"),
], ids=["null", "list", "string", "events-object", "100000-events"])
def test_a_malformed_batch_is_refused_whole_with_a_4xx_reason(db, body, says):
    with pytest.raises(clare.ClareError) as err:
        clare.sync_accept(db, body, now_ms=START_MS)
    assert says in str(err.value) and 400 <= err.value.http_status < 500
    assert clare.count_events(db) == 0


def test_a_mixed_batch_keeps_the_good_events_and_gives_a_reason_for_each_bad_one(db):
    good = _event()
    unknown = _event(uuid="1b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", event_type="widget.spun", payload={"n": 1})
    bad = [
        _event(uuid="2b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", hlc="yesterday"),
        _event(uuid="3b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", payload="not an object"),
        _event(uuid="4b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", payload={"big": "x" * (clare.MAX_PAYLOAD_BYTES + 1)}),
        _event(uuid="5b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", payload={"project_id": 7}),
        _event(uuid=12),
        "not an event",
        {k: v for k, v in _event(uuid="6b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c").items() if k != "hlc"},
        _event(uuid="7b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", hlc=f"{START_MS:013d}.000000.other"),
    ]
    answer = clare.sync_accept(db, {"events": [good, *bad, unknown]}, now_ms=START_MS)
    assert answer["accepted"] == 2 and answer["conflicts"] == [] and answer["duplicates"] == 0
    reasons = {r["index"]: r["reason"] for r in answer["rejected"]}
    assert sorted(reasons) == list(range(1, 9))
    assert "HLC" in reasons[1] and "payload" in reasons[2] and "bytes" in reasons[3] and "project_id" in reasons[4]
    assert "string" in reasons[5] and "object" in reasons[6] and "hlc" in reasons[7] and "machine_id" in reasons[8]
    assert {e.uuid for e in clare.iter_events(db)} == {good["uuid"], unknown["uuid"]}
    assert [p.name for p in clare.list_projects(db)] == ["alpha"]
    again = clare.sync_accept(db, {"events": [good, unknown]}, now_ms=START_MS)
    assert (again["accepted"], again["duplicates"]) == (0, 2)
    changed = clare.sync_accept(db, {"events": [_event(created_at="another time")]}, now_ms=START_MS)
    assert changed["conflicts"] == [good["uuid"]] and clare.count_events(db) == 2


def test_an_unknown_event_type_is_stored_and_relayed(nodes):
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    with clare.write_txn(a.db) as cur:
        clare.record(a.db, cur, "widget.spun", {"n": 1}, now_ms=a.now())
    b.sync(a), c.sync(b)
    assert [e.event_type for e in clare.iter_events(c.db)] == ["widget.spun"]


@pytest.mark.parametrize("call, says", [
    (lambda db: clare.sync_page(db, after="-1", now_ms=0), "whole number"),
    (lambda db: clare.sync_page(db, after="1e9", now_ms=0), "whole number"),
    (lambda db: clare.sync_page(db, after=0, limit="many", now_ms=0), "whole number"),
    (lambda db: clare.sync_day(db, "2026-13-45", now_ms=0), "YYYY-MM-DD"),
    (lambda db: clare.sync_day(db, "../etc", now_ms=0), "YYYY-MM-DD"),
    (lambda db: clare.sync_fetch(db, {"uuids": ["x"]}, now_ms=0), "uuids"),
    (lambda db: clare.sync_fetch(db, {"uuids": [_event()["uuid"]] * 5001}, now_ms=0), "over the limit"),
], ids=["negative-after", "float-after", "word-limit", "bad-date", "path-day", "bad-uuid", "too-many-uuids"])
def test_bad_sync_requests_get_a_4xx_reason(db, call, says):
    with pytest.raises(clare.ClareError) as err:
        call(db)
    assert says in str(err.value) and 400 <= err.value.http_status < 500


def test_a_page_is_limited_and_says_what_comes_next(db):
    clare.sync_accept(db, {"events": [_event()]}, now_ms=START_MS)
    with clare.write_txn(db) as cur:
        for i in range(5):
            clare.record(db, cur, "widget.spun", {"n": i}, now_ms=START_MS)
    page = clare.sync_page(db, after="2", limit="3", now_ms=START_MS)
    assert [e["payload"]["n"] for e in page["events"]] == [1, 2, 3]
    assert (page["next_after"], page["has_more"], page["head"]) == (5, True, 6)
    assert clare.sync_page(db, after=6, limit=10**6, now_ms=0)["events"] == []


def test_a_page_of_large_events_ends_at_its_size_limit(db):
    with clare.write_txn(db) as cur:
        for i in range(80):
            clare.record(db, cur, "widget.spun", {"n": i, "blob": "x" * 60_000}, now_ms=START_MS)
    page = clare.sync_page(db, after=0, now_ms=START_MS)
    n = len(page["events"])
    assert n * 60_000 >= clare.SYNC_PAGE_CHARS > (n - 1) * 60_000 and page["has_more"]
    assert page["next_after"] == n


def test_a_malformed_page_from_a_peer_fails_the_round_and_stores_nothing(db):
    class Liar(clare.PeerTransport):
        url = "sim://liar"

        def pull(self, *, after, limit):
            return {"machine_id": "liar", "db_id": "x", "now_ms": 0, "events": [_event()], "next_after": after,
                    "has_more": True, "head": after + 5}
    with pytest.raises(clare.ClareError, match="does not advance"):
        clare.sync_with(db, Liar(), name="liar", wall=lambda: START_MS)
    assert clare.count_events(db) == 0
    assert "does not advance" in clare.list_peer_status(db)[0].last_error


def test_backoff_doubles_per_failure_in_a_row_and_is_capped():
    assert clare.backoff_s(0, interval_s=30) == 30
    assert 45 <= clare.backoff_s(1, interval_s=30) <= 75
    assert 90 <= clare.backoff_s(2, interval_s=30) <= 150
    assert clare.backoff_s(40, interval_s=30) <= clare.MAX_BACKOFF_S * 1.25


# --- the CLI ------------------------------------------------------------------------------------

def test_peer_add_appends_to_clare_toml_keeping_what_is_there(home, cli):
    import tomllib
    (home / "clare.toml").write_text('token = "s3cret"\n[rclaude]\nsessions_command = "rclaude ls"')
    ran = cli("peer", "add", "http://10.9.0.2:8765/", "--name", "apricot", "--token-env", "APRICOT_TOKEN")
    assert ran.code == 0 and "apricot" in ran.out
    assert cli("peer", "add", "http://10.9.0.3:8765").code == 0  # named after its host
    config = tomllib.loads((home / "clare.toml").read_text())
    assert config["token"] == "s3cret" and config["rclaude"] == {"sessions_command": "rclaude ls"}
    assert config["peers"] == [{"name": "apricot", "url": "http://10.9.0.2:8765", "token_env": "APRICOT_TOKEN"},
                               {"name": "10.9.0.3-8765", "url": "http://10.9.0.3:8765"}]
    again = cli("peer", "add", "http://10.9.0.9:8765", "--name", "apricot")
    assert again.code == 1 and "configured already" in again.err
    for bad in (["ftp://x"], ["http://x", "--name", "a b"], ["http://x", "--token-env", "1X"]):
        ran = cli("peer", "add", *bad)
        assert ran.code == 2 and ran.err.startswith("clare: error: ")
    listed = cli("peer", "list", "--json").json()
    assert [(p["name"], p["last_ok_ms"], p["is_configured"]) for p in listed] == [
        ("apricot", None, True), ("10.9.0.3-8765", None, True)]


PEERS_TOML = """# Clare on this laptop
token = "s3cret"

[[peers]]  # the build box
name = "apricot"
url = "http://10.9.0.2:8765"
token_env = "APRICOT_TOKEN"

# the NAS, always on
[[peers]]
name = "nas"
url = "http://10.9.0.3:8765"

[rclaude]
sessions_command = "rclaude ls"  # see docs
"""


def test_peer_rm_removes_one_peer_and_keeps_the_rest_of_clare_toml_with_its_comments(home, cli):
    import tomllib
    (home / "clare.toml").write_text(PEERS_TOML)
    (home / "clare.toml").chmod(0o600)  # it holds a token
    ran = cli("peer", "rm", "apricot", "--json")
    assert ran.code == 0 and ran.json()["name"] == "apricot"
    text = (home / "clare.toml").read_text()
    assert text == PEERS_TOML.replace(
        '[[peers]]  # the build box\nname = "apricot"\nurl = "http://10.9.0.2:8765"\n'
        'token_env = "APRICOT_TOKEN"\n\n', "")
    assert [p["name"] for p in tomllib.loads(text)["peers"]] == ["nas"]
    assert (home / "clare.toml").stat().st_mode & 0o777 == 0o600
    assert [p["name"] for p in cli("peer", "list", "--json").json()] == ["nas"]
    gone = cli("peer", "rm", "apricot")
    assert gone.code == 1 and gone.err.count("\n") == 1 and "nas" in gone.err and "apricot" in gone.err
    assert (home / "clare.toml").read_text() == text  # nothing lost on a bad name
    ran = cli("peer", "rm", "nas")
    assert ran.code == 0 and "removed peer nas" in ran.out
    assert "peers" not in tomllib.loads((home / "clare.toml").read_text())


def test_peer_rm_refuses_to_rewrite_peers_written_as_an_inline_array(home, cli):
    text = 'peers = [{name = "apricot", url = "http://10.9.0.2:8765"}]\n'
    (home / "clare.toml").write_text(text)
    ran = cli("peer", "rm", "apricot")
    assert ran.code == 1 and "by hand" in ran.err and (home / "clare.toml").read_text() == text


def test_sync_with_an_unreachable_peer_fails_that_peer_and_records_why(home, cli):
    assert cli("sync").code == 2  # no peers yet: says how to add one
    assert cli("peer", "add", "http://127.0.0.1:9", "--name", "dead").code == 0
    ran = cli("sync")
    assert ran.code == 1 and "cannot reach http://127.0.0.1:9" in ran.err
    assert cli("sync", "nobody").code == 1
    listed = cli("peer", "list").out
    assert "dead" in listed and "never" in listed and "cannot reach" in listed and "(1 in a row)" in listed


def test_a_token_variable_that_is_not_set_is_named(home, cli, monkeypatch):
    monkeypatch.delenv("APRICOT_TOKEN", raising=False)
    cli("peer", "add", "http://127.0.0.1:9", "--name", "apricot", "--token-env", "APRICOT_TOKEN")
    ran = cli("sync", "apricot")
    assert ran.code == 1 and "APRICOT_TOKEN is not set" in ran.err


def test_the_progress_line_rewrites_itself_on_a_terminal_and_ends_with_a_newline():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    line = clare.ProgressLine("apricot", stream=out)
    line("pulled", 1000, 5000)
    line("pulled", 1001, 5000)  # too soon after the last: skipped
    line("pulled", 5000, 5000)
    line.close()
    assert out.getvalue() == "\rapricot: pulled 1000/5000 events\x1b[K\rapricot: pulled 5000/5000 events\x1b[K\n"


# --- over HTTP: one in-process server -----------------------------------------------------------

TOKEN = "sync-test-token-0123456789"


@pytest.fixture
def remote(serve):
    """A live server with a token, holding one project, and a client database beside it."""
    served = serve(token=TOKEN)
    clare.create_project(clare.open_db(served.config.db_path), "served", now_ms=clare.now_ms())
    return served


def test_sync_over_http_pulls_pushes_and_verifies(remote, tmp_path):
    mine = clare.open_db(str(tmp_path / "mine.db"), machine_id="mine")
    clare.create_project(mine, "mine", now_ms=clare.now_ms())
    peer = clare.HttpPeer(remote.url, token=TOKEN)
    report = clare.sync_with(mine, peer, name="srv", verify=True)
    assert (report.n_pulled, report.n_pushed, report.verify["days_differ"]) == (1, 1, [])
    assert abs(report.offset_ms) < 5000 and not report.is_skewed
    assert sorted(p["name"] for p in remote.request("GET", "/api/v1/projects").json()) == ["mine", "served"]
    with pytest.raises(clare.ClareError, match="answered 401.*token"):
        clare.sync_with(mine, clare.HttpPeer(remote.url, token="wrong-token-0123456789"), name="srv")
    peers = remote.request("GET", "/api/v1/sync/peers").json()
    assert peers == []  # the server itself syncs with nobody


def _post_raw(remote, body: bytes, *, ctype: str = "application/json"):
    return remote.request("POST", "/api/v1/sync/events", body=body, headers={"Content-Type": ctype})


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "not valid JSON"),
    (b"[" * 100_000, 400, "not valid JSON"),
    (b'"events"', 422, "JSON object"),
    (b'{"events": "all of them"}', 400, '"events" list'),
    (b'{"events": [], "hack": 1}', 422, "unknown field"),
    (json.dumps({"events": [_event()] * 6000}).encode(), 400, "over the limit of 5000"),
], ids=["bad-json", "deep-nesting", "string", "events-string", "unknown-field", "6000-events"])
def test_garbage_posted_to_the_sync_endpoint_gets_a_4xx_naming_it(remote, body, status, says):
    n_before = remote.request("GET", "/api/v1/status").json()["n_events"]
    reply = _post_raw(remote, body)
    assert reply.status == status and says in reply.json()["error"]["message"]
    assert remote.request("GET", "/api/v1/status").json()["n_events"] == n_before


def test_100000_events_in_one_post_get_413_before_the_body_is_read(remote):
    import http.client

    body = json.dumps({"events": [_event()] * 100_000}).encode()
    assert len(body) > clare.MAX_SYNC_BODY_BYTES
    conn = http.client.HTTPConnection("127.0.0.1", remote.port, timeout=10)
    conn.putrequest("POST", "/api/v1/sync/events")
    for k, v in (("Content-Type", "application/json"), ("Authorization", f"Bearer {TOKEN}"),
                 ("Content-Length", str(len(body)))):
        conn.putheader(k, v)
    conn.endheaders()  # the body is never sent: the answer comes first
    reply = conn.getresponse()
    assert reply.status == 413 and "over the limit" in json.loads(reply.read())["error"]["message"]
    conn.close()
    assert remote.request("GET", "/api/v1/status").status == 200  # and it keeps serving


def test_a_push_over_the_servers_body_limit_fails_with_one_line_naming_the_limit(remote, tmp_path, monkeypatch):
    mine = clare.open_db(str(tmp_path / "mine.db"), machine_id="mine")
    with clare.write_txn(mine) as cur:
        for _ in range(800):  # one 4 MB batch: more than the sockets buffer
            clare.make_event(mine, cur, "note.added", {"text": "x" * 5000}, now_ms=clare.now_ms())
    monkeypatch.setattr(clare, "MAX_SYNC_BODY_BYTES", 64 * 1024)  # a server that takes less than we send
    with pytest.raises(clare.ClareError) as err:
        clare.sync_with(mine, clare.HttpPeer(remote.url, token=TOKEN), name="srv")
    message = str(err.value)
    assert "413" in message and "over the limit of 65536" in message and "\n" not in message
    assert remote.request("GET", "/api/v1/status").status == 200  # and it keeps serving


def test_a_peer_that_cuts_the_connection_during_a_large_push_is_named_without_broken_pipe(tmp_path):
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))  # an old server: reads the head, then closes

    def cut():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.close()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    peer = clare.HttpPeer(f"http://127.0.0.1:{listener.getsockname()[1]}", token=None)
    with pytest.raises(clare.ClareError) as err:
        peer.push({"events": [{"payload": "x" * 8_000_000}]})
    thread.join(10)
    listener.close()
    assert "cut the connection" in str(err.value) and "413" in str(err.value)
    assert "Broken pipe" not in str(err.value)


def test_pushed_batches_stay_under_the_servers_body_limit():
    mid = "m" * 63
    events = [clare.Event(str(uuid.uuid4()), f"{1_700_000_000_000 + i:013d}.{i % 999_999:06d}.{mid}", mid,
                          "e" * 30 + "." + "d" * 33, {"t": '"\n' * (200 + i % 700)}, "2026-11-25T14:00:00.000Z")
              for i in range(12_000)]
    batches = list(clare._batches(events))
    assert sum(map(len, batches)) == len(events) and len(batches) > 1
    for batch in batches:
        body = {"machine_id": mid, "db_id": str(uuid.uuid4()), "now_ms": 0, "events": [e.to_json() for e in batch]}
        size = len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())
        assert size <= clare.MAX_SYNC_BODY_BYTES and len(batch) <= clare.MAX_SYNC_BATCH


def test_a_mixed_batch_over_http_keeps_the_good_events(remote):
    bad = _event(uuid="2b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", hlc="13 o'clock")
    reply = remote.request("POST", "/api/v1/sync/events", json_body={"events": [_event(), bad]})
    answer = reply.json()
    assert reply.status == 200 and answer["accepted"] == 1
    assert answer["rejected"] == [{"index": 1, "uuid": bad["uuid"], "reason": answer["rejected"][0]["reason"]}]
    assert "HLC" in answer["rejected"][0]["reason"]


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/api/v1/sync/events?after=abc", None, 400),
    ("GET", "/api/v1/sync/days/2026-02-31", None, 400),
    ("GET", "/api/v1/sync/days/..%2F..%2Fx", None, 404),
    ("POST", "/api/v1/sync/fetch", {"uuids": "all"}, 400),
    ("DELETE", "/api/v1/sync/events", None, 405),
], ids=["after-word", "bad-date", "path-day", "uuids-string", "delete"])
def test_bad_sync_requests_over_http_get_4xx(remote, method, path, body, status):
    assert remote.request(method, path, json_body=body).status == status


def test_sync_endpoints_need_the_token(remote):
    assert remote.request("GET", "/api/v1/sync/events", auth=False).status == 401
    assert remote.request("POST", "/api/v1/sync/events", json_body={"events": []}, auth=False).status == 401
    assert _post_raw(remote, b'{"events": []}', ctype="text/plain").status == 415


# --- end to end: three real `clare serve` processes ---------------------------------------------

class Clare:
    """One host: its own home, a `clare serve` process with its own token, and its CLI."""

    def __init__(self, tmp, name: str, env: dict):
        self.name, self.home, self.env = name, tmp / name, env
        self.token = f"token-of-{name}-" + "x" * 16
        self.proc = None
        self.url = None
        assert self.cli("init", "--machine-id", name).code == 0

    def cli(self, *argv: str):
        import subprocess
        import sys

        from conftest import CLARE_PY, Ran

        p = subprocess.run([sys.executable, str(CLARE_PY), "--home", str(self.home), *argv], capture_output=True,
                           text=True, timeout=60, env=self.env)
        return Ran(p.returncode, p.stdout, p.stderr)

    def serve(self, *extra: str) -> None:
        import subprocess
        import sys

        from conftest import CLARE_PY, serving_url

        self.proc = subprocess.Popen(
            [sys.executable, str(CLARE_PY), "--home", str(self.home), "serve", "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**self.env, "CLARE_TOKEN": self.token})
        self.url = serving_url(self.proc, self.name)

    def add_peer(self, other: "Clare", *, token_env: str) -> None:
        assert self.cli("peer", "add", other.url, "--name", other.name, "--token-env", token_env).code == 0

    def stop(self) -> str:
        """Stop the server (SIGTERM); return what it wrote on stderr."""
        if self.proc is None or self.proc.returncode is not None:
            return ""
        self.proc.terminate()
        return self.proc.communicate(timeout=15)[1]


@pytest.fixture
def fleet(tmp_path, home):
    import os as _os

    env = {k: v for k, v in _os.environ.items() if k not in ("CLARE_TOKEN", "CLARE_HOME", "CLARE_URL")}
    hosts: dict[str, Clare] = {}

    def make(*names: str) -> list[Clare]:
        for name in names:
            hosts[name] = Clare(tmp_path, name, env)
        for name in names:
            env[f"{name.upper()}_TOKEN"] = hosts[name].token  # each host's CLI knows the others' tokens
        return [hosts[n] for n in names]
    yield make
    for host in hosts.values():
        host.stop()


def _task(host: Clare, task_id: str) -> dict:
    ran = host.cli("task", "show", task_id, "--json")
    assert ran.code == 0, ran.err
    return ran.json()


def test_three_servers_relay_an_older_event_and_merge_fields_through_the_cli(fleet):
    a, b, c = fleet("a", "b", "c")
    for host in (a, b, c):
        host.serve("--no-sync")
    a.add_peer(b, token_env="B_TOKEN")
    c.add_peer(b, token_env="B_TOKEN")  # no a <-> c: everything goes through b
    assert c.cli("project", "new", "from-c").code == 0  # made first: the oldest HLC of all
    assert a.cli("project", "new", "alpha").code == 0
    task_id = a.cli("task", "add", "alpha", "parse", "--json").json()["id"]
    ran = a.cli("sync")
    assert ran.code == 0 and "b: pulled 0, pushed 2" in ran.out, ran.err
    ran = c.cli("sync")  # b gets from-c after a's last pull, with an HLC older than all a has seen
    assert ran.code == 0 and "pulled 2, pushed 1" in ran.out, ran.err
    ran = a.cli("sync", "b")
    assert ran.code == 0 and "b: pulled 1, pushed 0" in ran.out, ran.err
    assert sorted(p["name"] for p in a.cli("project", "list", "--json").json()) == ["alpha", "from-c"]

    assert a.cli("task", "edit", task_id, "--title", "parse v2 files").code == 0
    assert c.cli("task", "start", task_id).code == 0
    for host in (a, c, a):
        ran = host.cli("sync")
        assert ran.code == 0, ran.err
    for host in (a, b, c):
        t = _task(host, task_id)
        assert (t["title"], t["status"]) == ("parse v2 files", "in_progress"), host.name
    status = a.cli("peer", "list", "--json").json()
    assert [(s["name"], s["n_behind"], s["last_error"]) for s in status] == [("b", 0, None)]
    assert abs(status[0]["offset_ms"]) < 5000


def test_serve_syncs_in_the_background_and_a_dead_peer_delays_nobody(fleet):
    a, b, c = fleet("a", "b", "c")
    b.serve("--no-sync")
    for host in (a, c):
        (host.home / "clare.toml").write_text("[sync]\ninterval_s = 0.3\n")
        host.add_peer(b, token_env="B_TOKEN")
    # a's first peer is dead (nothing listens on port 9): its thread backs off, b's goes on.
    (a.home / "clare.toml").write_text((a.home / "clare.toml").read_text().replace(
        "[[peers]]", '[[peers]]\nname = "dead"\nurl = "http://127.0.0.1:9"\n\n[[peers]]', 1))
    a.serve()
    c.serve()
    assert a.cli("project", "new", "alpha").code == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = [p["name"] for p in c.cli("project", "list", "--json").json()]
        if names == ["alpha"]:
            break
        time.sleep(0.2)
    assert names == ["alpha"], "a's project did not reach c through b in the background"
    status = {s["name"]: s for s in a.cli("peer", "list", "--json").json()}
    assert status["b"]["last_error"] is None and status["b"]["last_ok_ms"] is not None
    assert "cannot reach" in status["dead"]["last_error"] and status["dead"]["n_failures"] >= 1
    assert "sync with dead failed (1 in a row)" in a.stop()


def test_restore_from_a_backup_gets_a_new_db_id_and_peers_give_back_the_rest(home, cli, nodes, tmp_path):
    a = Node(tmp_path, "a")
    a.db.close()
    a.db = clare.open_db(str(home / "clare.db"), machine_id="a")
    b = nodes("b")
    clare.create_project(a.db, "alpha", now_ms=a.now())
    backup = str(tmp_path / "backup.db")
    a.db.conn.execute("VACUUM INTO ?", (backup,))
    clare.create_project(a.db, "beta", now_ms=a.now())
    b.sync(a)
    old_id = a.db.db_id
    a.db.close()
    assert cli("restore", backup).code == 2  # without --yes: says what it would do
    ran = cli("restore", backup, "--yes", "--json")
    assert ran.code == 0 and ran.json()["n_events"] == 1 and ran.json()["db_id"] != old_id
    a.db = clare.open_db(str(home / "clare.db"))
    assert [p.name for p in clare.list_projects(a.db)] == ["alpha"]
    clare.create_project(a.db, "gamma", now_ms=a.now())
    report = b.sync(a)  # b reads the restored log from 0 under its new db_id, and pushes it all back
    assert (report.n_pulled, report.n_pushed) == (1, 1)  # gamma in, beta back
    assert projection_digest(a.db) == projection_digest(b.db)
    other = nodes("other")
    ran = cli("restore", other.db.path, "--yes")
    assert ran.code == 1 and "not a backup of this database" in ran.err
    assert cli("restore", str(tmp_path / "missing.db"), "--yes").code == 2


def test_syncing_with_itself_is_refused(nodes):
    a = nodes("a")
    with pytest.raises(clare.ClareError, match="this very database"):
        a.sync(a)


def test_sync_answers_match_the_openapi_schemas(server):
    from test_http import _validate

    doc = server.request("GET", "/api/v1/openapi.json").json()
    clare.create_project(clare.open_db(server.config.db_path), "alpha", now_ms=clare.now_ms())
    day = clare.sync_digest(clare.open_db(server.config.db_path), now_ms=0)["days"].popitem()[0]
    for path in ("/api/v1/sync/events", "/api/v1/sync/days", "/api/v1/sync/days/{day}", "/api/v1/sync/peers"):
        r = server.request("GET", path.replace("{day}", day))
        assert r.status == 200
        ok = doc["paths"][path]["get"]["responses"]["200"]
        _validate(r.json(), ok["content"]["application/json"]["schema"], doc, path)
    uid = server.request("GET", "/api/v1/sync/events").json()["events"][0]["uuid"]
    for path, body in (("/api/v1/sync/fetch", {"uuids": [uid]}), ("/api/v1/sync/events", {"events": [{"x": 1}]})):
        r = server.request("POST", path, json_body=body)
        assert r.status == 200, r.body
        ok = doc["paths"][path]["post"]["responses"]["200"]
        _validate(r.json(), ok["content"]["application/json"]["schema"], doc, path)


def test_the_dashboard_shows_each_peer_and_how_its_last_sync_went(server, home, db):
    (home / "clare.toml").write_text('[[peers]]\nname = "apricot"\nurl = "http://10.9.0.2:8765"\n'
                                     '[[peers]]\nname = "fig"\nurl = "http://10.9.0.3:8765"\n')
    clare.save_peer_status(db, "http://10.9.0.2:8765", name="apricot", now_ms=clare.now_ms(),
                           error="cannot reach <script>alert(1)</script>")
    clare.save_peer_status(db, "http://10.9.0.3:8765", name="fig", now_ms=clare.now_ms() - 120_000,
                           machine_id="fig", db_id="d", n_behind=3, offset_ms=200)
    page = server.request("GET", "/").text
    assert 'id="frag-peers"' in page and "apricot" in page and "failing ×1" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    frag = server.request("GET", "/frag/peers").text
    assert frag.startswith('<section class="card" id="frag-peers" hx-get="/frag/peers"')
    assert "in sync" in frag and "2.0 min ago" in frag and "+200 ms" in frag and ">3<" in frag


@pytest.mark.parametrize("digest, day, fetch", [
    (["not", "a", "dict"], None, None),
    ({"days": {"2026-05-28": {"n": 9, "hash": "x"}}}, {"uuids": [{"a": 1}, 7]}, None),
    ({"days": {"2026-05-28": {"n": 9, "hash": "x"}}}, {"uuids": [_event()["uuid"]]}, "events"),
    ({"days": {"2026-05-28": {"n": 9, "hash": "x"}}}, {"uuids": [_event()["uuid"]]}, {"events": [{"x": 1}]}),
], ids=["digest-list", "uuids-garbage", "fetch-string", "fetch-bad-event"])
def test_verify_against_a_lying_peer_fails_cleanly_or_stores_nothing_invalid(nodes, digest, day, fetch):
    a, b = nodes("a"), nodes("b")
    a.sync(b)

    class Liar(Link):
        def digest(self):
            return digest

        def day(self, d):
            return day

        def fetch(self, uuids):
            return fetch
    report = None
    try:
        report = clare.sync_with(a.db, Liar(b), name="b", wall=a.now, verify=True)
    except clare.ClareError as err:
        assert "is it a Clare" in str(err)
    assert clare.count_events(a.db) == 0
    if report is not None:
        assert report.verify["fetched"] == 0


@pytest.mark.parametrize("status, body, says", [
    (200, b"<html>hello</html>", "not JSON"),
    (200, b"[" * 100_000, "not JSON"),
    (500, b'{"error": {"code": "internal", "message": "boom"}}', "answered 500 to GET /api/v1/sync/events: boom"),
    (401, b"{}", "set the peer's token"),
], ids=["html", "deep-nesting", "error-500", "unauthorized"])
def test_the_http_client_turns_a_bad_answer_into_one_clear_error(tmp_path, status, body, says):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = clare.open_db(str(tmp_path / "a.db"), machine_id="a")
    try:
        with pytest.raises(clare.ClareError, match=re.escape(says)):
            clare.sync_with(db, clare.HttpPeer(f"http://127.0.0.1:{server.server_address[1]}",
                                               token="s3cr3t-value"), name="x")
        assert "s3cr3t" not in clare.list_peer_status(db)[0].last_error
    finally:
        server.shutdown()
        server.server_close()
        db.close()


def test_a_push_of_large_non_ascii_events_is_split_under_the_body_limit(remote, tmp_path):
    mine = clare.open_db(str(tmp_path / "mine.db"), machine_id="mine")
    with clare.write_txn(mine) as cur:
        for i in range(150):  # 150 × ~60 KB of UTF-8: over the 8 MB limit in one body
            clare.record(mine, cur, "note.kept", {"n": i, "text": "中" * 20_000}, now_ms=clare.now_ms())
    report = clare.sync_with(mine, clare.HttpPeer(remote.url, token=TOKEN), name="srv")
    assert report.n_pushed == 150
    assert remote.request("GET", "/api/v1/status").json()["n_events"] == 151


def test_a_peer_whose_identity_changes_at_every_request_is_refused(nodes):
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    clare.create_project(c.db, "gamma", now_ms=c.now())

    class Flip(Link):
        n = 1

        def pull(self, *, after, limit):  # behind a load balancer: c, then b, c, b, ...
            Flip.n += 1
            return clare.sync_page((b if Flip.n % 2 else c).db, after=after, limit=limit, now_ms=0)
    assert clare.sync_with(a.db, Flip(b), name="lb", wall=a.now).n_pulled == 1  # from c: cursor 1 on c
    with pytest.raises(clare.ClareError, match="different Clare at every request"):
        clare.sync_with(a.db, Flip(b), name="lb", wall=a.now)  # b wants 0, c wants 1, b wants 0, ...


def _fuzzed_events():
    """Batches of valid events with some fields replaced by any JSON, dropped, or the whole item garbage."""
    from hypothesis import strategies as st

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=3), max_leaves=8)
    uuids = ["0b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c", "1b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c",
             "2b7e3c1a-2f4d-4e5a-9b6c-7d8e9f0a1b2c"]
    fields = {"uuid": st.sampled_from([*uuids, "nope"]) | json_values,
              "hlc": st.sampled_from([f"{START_MS + 1:013d}.000000.peer", "1.2.3"]) | json_values,
              "machine_id": st.sampled_from(["other"]) | json_values,
              "event_type": st.sampled_from(["task.updated", "widget.spun", "Bad"]) | json_values,
              "payload": st.sampled_from([{"task_id": "t" * 32, "title": "x"}, {}, {"title": 5}]) | json_values,
              "created_at": st.sampled_from(["x" * 41]) | json_values}
    mutated = st.builds(
        lambda uid, changes, drops: {k: v for k, v in {**_event(uuid=uid), **changes}.items() if k not in drops},
        st.sampled_from(uuids), st.fixed_dictionaries({}, optional=fields),
        st.sets(st.sampled_from(sorted(fields)), max_size=2))
    return st.lists(mutated | json_values, max_size=6)


def test_fuzzed_batches_store_only_valid_events_and_never_crash(tmp_path):
    from hypothesis import HealthCheck, given, settings

    db = clare.open_db(str(tmp_path / "fuzz.db"), machine_id="fuzz")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_fuzzed_events())
    def check(items):
        n_before = clare.count_events(db)
        answer = clare.sync_accept(db, {"events": items}, now_ms=START_MS)
        assert answer["accepted"] + answer["duplicates"] + len(answer["conflicts"]) + len(answer["rejected"]) \
            == len(items)
        assert clare.count_events(db) == n_before + answer["accepted"]
        for ev in clare.iter_events(db):
            clare.check_received(ev.to_json())  # everything stored passes the checks a peer would apply
    check()
    assert clare.count_events(db) >= 2  # well-formed events were among the examples, and were kept
    db.close()


def test_cli_sync_warns_loudly_about_a_peer_a_year_ahead(remote, cli, monkeypatch, tmp_path):
    real_now = clare.now_ms
    monkeypatch.setattr(clare, "now_ms", lambda: real_now() + YEAR_MS)  # the server's clock; the CLI keeps its own
    monkeypatch.setenv("CLARE_TOKEN", TOKEN)
    other = tmp_path / "other"  # the CLI's own host, beside the server's
    ran = cli("--home", other, "sync", remote.url)
    assert ran.code == 0 and "pulled 1" in ran.out and "SKEWED" in ran.out
    assert "clare: warning: " in ran.err and "365.0 d ahead of this host's" in ran.err
    assert "SKEWED" in cli("--home", other, "peer", "list").out


# --- restore under a running server ---------------------------------------------------------------

def _backup(db: clare.Db, path) -> str:
    """Copy a live database to `path` with SQLite's backup API, as a user's backup would."""
    dest = clare.sqlite3.connect(str(path))
    db.conn.backup(dest)
    dest.close()
    return str(path)


def test_a_running_server_advertises_the_new_db_id_after_a_restore_underneath_it(remote, tmp_path):
    served = clare.open_db(remote.config.db_path)
    backup = _backup(served, tmp_path / "backup.db")
    clare.create_project(served, "after the backup", now_ms=clare.now_ms())
    before = remote.request("GET", "/api/v1/sync/events?after=0").json()
    new_db_id = clare.restore_db(clare.open_db(remote.config.db_path), backup)
    after = remote.request("GET", "/api/v1/sync/events?after=0").json()
    assert before["db_id"] != new_db_id and after["db_id"] == new_db_id
    assert after["head"] < before["head"]
    accepted = remote.request("POST", "/api/v1/sync/events", json_body={"events": []}).json()
    assert accepted["db_id"] == new_db_id


_CRASH_IN_RESTORE = """
import os, sys
import clare
db = clare.open_db(sys.argv[1])
clare.new_uuid = lambda: os._exit(9)  # the process dies where restore makes the new db_id
clare.restore_db(db, sys.argv[2])
"""


def test_a_crash_during_restore_leaves_the_old_file_or_the_backup_with_a_new_db_id(db, tmp_path):
    backup = _backup(db, tmp_path / "backup.db")
    old_db_id = db.db_id
    clare.create_project(db, "after the backup", now_ms=clare.now_ms())
    n_events = clare.count_events(db)
    db.close()
    ran = subprocess.run([sys.executable, "-c", _CRASH_IN_RESTORE, db.path, backup], capture_output=True,
                         timeout=60, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert ran.returncode == 9, ran.stderr
    reopened = clare.open_db(db.path)
    if reopened.db_id == old_db_id:
        assert clare.count_events(reopened) == n_events  # the old file, untouched
    else:
        assert clare.count_events(reopened) < n_events  # the backup, under a new db_id
    assert clare.restore_db(reopened, backup) != old_db_id  # the next restore works, whatever the crash left
    assert not [p for p in os.listdir(os.path.dirname(db.path)) if ".restore" in p]
