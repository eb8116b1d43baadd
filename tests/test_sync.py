"""Sync: the protocol functions, cursors, and the seeded multi-host convergence simulation.

The simulation (DESIGN §4) runs in-process: a SimLink calls the serving host's sync
functions through a JSON round trip and injects faults. CLARE_SEED=N replays one seed.
"""

import json
import os
import random
import shutil

import pytest

import clare
from conftest import seeds

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
        answer = handle(body)  # a ClareError here is the server's 4xx
        if fault == "duplicate":
            handle(json.loads(text))
        if fault == "delay":
            self.sim.delayed.append((handle, text))
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
        op = rng.choice(["project", "project", "task", "task", "task", "edit_task", "edit_task", "edit_task",
                         "edit_project", "assign", "assign", "unassign", "group", "rm_group", "update", "future"])
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
                else:
                    clare.assign_task(db, t.id, session_id=rng.choice(["a1b2c3", "d4e5f6"]), now_ms=now)
            elif op == "unassign" and tasks:
                clare.unassign_task(db, rng.choice(tasks).id, now_ms=now)
            elif op == "group":
                clare.create_group(db, rng.choice(["backend", "night"]), cwd="/srv/" + host.name, now_ms=now)
            elif op == "rm_group" and groups:
                clare.remove_group(db, rng.choice(groups).id, now_ms=now)
            elif op == "update" and tasks:
                clare.post_update(db, f"note {rng.randrange(999)}", task_ref=rng.choice(tasks).id, now_ms=now)
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
            host = rng.choice(self.hosts)
            host.skew_ms = rng.choice([0, 0, -rng.randrange(10 * 60_000), rng.randrange(4 * 60_000),
                                       rng.randrange(20 * 60_000), YEAR_MS])
        elif r < 0.95 and self.delayed:
            handle, text = self.delayed.pop(rng.randrange(len(self.delayed)))
            try:
                handle(json.loads(text))
            except clare.ClareError:
                pass
        elif r < 0.97:
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

    def restore(self, host: Host, *, renew: bool) -> None:
        """Put an old backup in place of the host's file; a proper restore gives it a new db_id."""
        host.db.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(host.path + suffix):
                os.remove(host.path + suffix)
        shutil.copyfile(host.backup, host.path)
        host.db = clare.open_db(host.path)
        if renew:
            clare.renew_db_id(host.db)

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
        """Sync along every edge, both ways, without faults, until a whole pass moves nothing."""
        self.faults_on = False
        self.crash_rate = 0.0
        for handle, text in self.delayed:
            try:
                handle(json.loads(text))
            except clare.ClareError:
                pass
        self.delayed.clear()
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


def assert_converged(sim: Sim) -> None:
    first = sim.hosts[0]
    events = event_set(first.db)
    digest = clare.projection_digest(first.db)
    for host in sim.hosts:
        assert event_set(host.db) == events, f"{host.name} holds other events than {first.name}"
        assert clare.projection_digest(host.db) == digest, f"{host.name}'s projections differ from {first.name}'s"
    for host in sim.hosts:
        clare.replay(host.db)
        assert clare.projection_digest(host.db) == digest, f"{host.name}: incremental != replay"
        clock = clare.load_clock(host.db.conn.cursor(), machine_id=host.name, now_ms=host.now())
        assert clock is None or clock.wall_ms <= host.max_now_ms + clare.MAX_OFFSET_MS, \
            f"{host.name}'s clock was dragged past its now + MAX_OFFSET"


def _crashing_save_cursor(sim: Sim, real):
    def save_cursor(cur, *args, **kw):
        if kw.get("pulled_rseq") is not None and sim.rng.random() < sim.crash_rate:
            raise SimCrash("killed between storing a page and saving the cursor")
        return real(cur, *args, **kw)
    return save_cursor


def run_sim(seed: int, tmp, monkeypatch, *, n_steps: int, needs_verify: bool = False) -> Sim:
    sim = Sim(seed, tmp, needs_verify=needs_verify)
    sim.crash_rate = 0.05
    monkeypatch.setattr(clare, "save_cursor", _crashing_save_cursor(sim, clare.save_cursor))
    for _ in range(n_steps):
        sim.step()
    return sim


@pytest.mark.parametrize("seed", seeds(250, "sync-sim"), ids=lambda s: f"seed={s}")
def test_random_fleet_converges_after_heal(seed, tmp_path, monkeypatch):
    sim = run_sim(seed, tmp_path, monkeypatch, n_steps=120)
    sim.heal()
    assert_converged(sim)


@pytest.mark.parametrize("seed", seeds(40, "sync-sim-verify"), ids=lambda s: f"seed={s}")
def test_anti_entropy_repairs_lost_pages_and_unmarked_restores(seed, tmp_path, monkeypatch):
    sim = run_sim(seed, tmp_path, monkeypatch, n_steps=120, needs_verify=True)
    sim.heal(verify=True)
    assert_converged(sim)
