"""The hybrid logical clock: text form, order, tick, carry, merge bounds."""

import random

import pytest
from hypothesis import given, strategies as st

import clare
from conftest import seeds

M = "alpha"


def test_text_form_is_padded_and_round_trips():
    h = clare.Hlc(42, 7, M)
    assert str(h) == "0000000000042.000007.alpha"
    assert clare.parse_hlc(str(h)) == h


@given(st.lists(st.tuples(st.integers(0, clare.MAX_WALL_MS), st.integers(0, clare.MAX_COUNTER),
                          st.from_regex(clare.MACHINE_ID_RE.pattern, fullmatch=True)), min_size=2, max_size=20))
def test_text_sorts_exactly_like_the_tuple(triples):
    hlcs = [clare.Hlc(*t) for t in triples]
    assert sorted(hlcs, key=str) == sorted(hlcs)


@pytest.mark.parametrize("bad", ["", "1.2.a", "0000000000042.000007", "0000000000042.0000007.a",
                                 "0000000000042.000007.Alpha", "0000000000042.000007.a.b", None, 42,
                                 "000000000042x.000007.a"])
def test_malformed_text_is_refused_with_the_expected_form(bad):
    with pytest.raises(clare.ClareError, match="expected WALLMS"):
        clare.parse_hlc(bad)


def test_tick_follows_the_wall_clock_and_counts_within_one_ms():
    a = clare.tick(None, machine_id=M, now_ms=1000)
    b = clare.tick(a, machine_id=M, now_ms=1000)
    c = clare.tick(b, machine_id=M, now_ms=2000)
    assert (a, b, c) == (clare.Hlc(1000, 0, M), clare.Hlc(1000, 1, M), clare.Hlc(2000, 0, M))


def test_counter_overflow_carries_into_the_wall_field():
    full = clare.Hlc(1000, clare.MAX_COUNTER, M)
    nxt = clare.tick(full, machine_id=M, now_ms=1000)
    assert nxt == clare.Hlc(1001, 0, M)
    assert str(full) < str(nxt) and len(str(nxt)) == len(str(full))


def test_wall_clock_going_backwards_never_moves_the_clock_back():
    last = clare.tick(None, machine_id=M, now_ms=10_000)
    for now in (9_000, 5_000, 10_000):
        nxt = clare.tick(last, machine_id=M, now_ms=now)
        assert nxt > last
        last = nxt


def test_merge_moves_past_a_remote_clock_within_the_bound():
    remote = clare.Hlc(5_000, 3, "beta")
    last = clare.merge(clare.Hlc(1_000, 0, M), remote, machine_id=M, now_ms=1_000)
    assert clare.tick(last, machine_id=M, now_ms=1_000) > remote


def test_a_remote_clock_far_in_the_future_is_bounded():
    now = 1_700_000_000_000
    year_ahead = clare.Hlc(now + 365 * 86_400_000, 0, "skewed")
    last = clare.merge(None, year_ahead, machine_id=M, now_ms=now)
    assert last.wall_ms == now + clare.MAX_OFFSET_MS
    assert clare.tick(last, machine_id=M, now_ms=now).wall_ms <= now + clare.MAX_OFFSET_MS


def test_merge_never_moves_the_clock_back():
    last = clare.Hlc(9_000, 5, M)
    assert clare.merge(last, clare.Hlc(1, 0, "beta"), machine_id=M, now_ms=9_000) == last


@pytest.mark.parametrize("seed", seeds(20, "hlc-monotonic"), ids=lambda s: f"seed={s}")
def test_random_ticks_and_merges_are_strictly_increasing(seed):
    rng = random.Random(seed)
    now, last, issued = 1_000_000, None, []
    for _ in range(2000):
        now += rng.choice([-5000, -1, 0, 0, 0, 1, 2, 300])
        if rng.random() < 0.2:
            remote = clare.Hlc(max(0, now + rng.randint(-10_000, 10**9)), rng.randint(0, clare.MAX_COUNTER), "peer")
            last = clare.merge(last, remote, machine_id=M, now_ms=now)
        last = clare.tick(last, machine_id=M, now_ms=now)
        issued.append(str(last))
    assert issued == sorted(issued) and len(set(issued)) == len(issued), f"CLARE_SEED={seed}"


def test_clock_is_seeded_from_the_log_after_a_wall_clock_jump_back(db):
    with clare.write_txn(db) as cur:
        first = clare.make_event(db, cur, "test.made", {}, now_ms=2_000_000_000_000)
    with clare.write_txn(db) as cur:
        second = clare.make_event(db, cur, "test.made", {}, now_ms=1_000_000_000_000)
    assert second.hlc > first.hlc
