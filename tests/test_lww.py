"""Last writer wins by (hlc, uuid): between two events of one HLC, the larger uuid wins, in any order."""

import itertools

import pytest

import clare

T0 = 1_750_000_000_000
TASK_ID = "7a5c0000000040008000000000000001"
PROJECT_ID = "9e0e0000000040008000000000000001"


def _event(n: int, hlc_ms: int, event_type: str, payload: dict) -> clare.Event:
    return clare.check_received({
        "uuid": f"00000000-0000-4000-8000-{n:012d}", "hlc": f"{hlc_ms:013d}.000000.ash", "machine_id": "ash",
        "event_type": event_type, "payload": payload, "created_at": clare.iso_ms(hlc_ms)})


def _tables_after(events: list[clare.Event]) -> clare.Task:
    db = clare.open_db(":memory:", machine_id="birch")
    for ev in events:  # one per transaction, as sync may deliver them
        with clare.write_txn(db) as cur:
            clare.receive_events(db, cur, [ev], now_ms=T0 + 10_000)
    task = clare.get_task(db, TASK_ID)
    clare.replay(db)
    assert clare.get_task(db, TASK_ID) == task  # replay agrees with the arrival order
    return task


BASE = [_event(1, T0, "project.created", {"project_id": PROJECT_ID, "name": "alpha", "goal": "", "owner": "",
                                          "status": "active"}),
        _event(2, T0 + 1, "task.created", {"task_id": TASK_ID, "project_id": PROJECT_ID, "title": "first",
                                           "description": "", "priority": 2, "status": "todo"})]
# Two edits stamped with one HLC (a restored clock, or two writers sharing a machine id): uuid ...09 > ...08.
TIED = [_event(8, T0 + 5, "task.updated", {"task_id": TASK_ID, "title": "smaller uuid", "status": "blocked"}),
        _event(9, T0 + 5, "task.updated", {"task_id": TASK_ID, "title": "larger uuid", "status": "done"})]


@pytest.mark.parametrize("order", list(itertools.permutations(TIED)), ids=["smaller-first", "larger-first"])
def test_two_edits_with_one_hlc_are_decided_by_the_larger_uuid_in_any_order(order):
    task = _tables_after([*BASE, *order])
    assert (task.title, task.status) == ("larger uuid", "done")


def test_two_assignments_with_one_hlc_are_decided_by_the_larger_uuid_in_any_order():
    sid = "5e551011-0000-4000-8000-000000000001"
    gid = "6a0b0000000040008000000000000001"
    group = _event(3, T0 + 2, "group.created", {"group_id": gid, "name": "g", "cwd": None, "host": None,
                                                "tmux_name": None})
    tied = [_event(8, T0 + 5, "task.assigned", {"task_id": TASK_ID, "group_id": gid}),
            _event(9, T0 + 5, "task.unassigned", {"task_id": TASK_ID}),
            _event(7, T0 + 5, "task.assigned", {"task_id": TASK_ID, "session_id": sid})]
    for order in itertools.permutations(tied):
        task = _tables_after([*BASE, group, *order])
        assert (task.session_id, task.group_id) == (None, None), [e.uuid[-2:] for e in order]
