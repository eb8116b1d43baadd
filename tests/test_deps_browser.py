"""Dependencies (#16 part A) in a real browser: the project's queue, a cycle named, waits changed from the
task card, the dashboard's ready count; screenshots at desktop and phone width, light and dark."""

import clare
from test_browser import ARTIFACTS, browser, page_of, pytestmark, settle  # noqa: F401 (fixtures used by name)


def _cycle_from_another_host(db, x_id: str, y_id: str) -> None:
    """Close a cycle as two hosts apart do: this one waits x on y, birch waits y on x, then they sync."""
    birch = clare.open_db(":memory:", machine_id="birch")
    now = clare.now_ms()
    with clare.write_txn(birch) as cur:
        clare.receive_events(birch, cur, list(clare.iter_events(db)), now_ms=now)
    clare.edit_task(db, x_id, after=[y_id], now_ms=now)
    clare.edit_task(birch, y_id, after=[x_id], now_ms=now)
    with clare.write_txn(db) as cur:
        clare.receive_events(db, cur, list(clare.iter_events(birch)), now_ms=now)


def test_the_queue_the_cycle_and_the_ready_count_show_and_waits_change_from_the_task_card(server, db, page_of):  # noqa: F811
    svc = clare.Services(db)
    p = svc.create_project("alpha", goal="ship v1")
    schema = svc.create_task("alpha", "design the schema", priority=1)
    api = svc.create_task("alpha", "write the api", priority=1, after=[schema.id])
    docs = svc.create_task("alpha", "write the docs", priority=2, tags=["docs"])
    ship = svc.create_task("alpha", "ship it", priority=0, after=[schema.id, api.id])
    lexer = svc.create_task("alpha", "lexer", priority=3)
    parser = svc.create_task("alpha", "parser", priority=3)
    svc.edit_task(schema.id, status="done")
    _cycle_from_another_host(db, lexer.id, parser.id)

    ARTIFACTS.mkdir(exist_ok=True)
    for name, viewport in (("desktop", {"width": 1280, "height": 900}), ("phone", {"width": 390, "height": 844})):
        for scheme in ("light", "dark"):
            pg = page_of(viewport=viewport, color_scheme=scheme)
            pg.goto(f"{server.url}/projects/{p.id}")
            queue = pg.locator("#frag-queue")
            assert [x.inner_text() for x in queue.locator("ol.queue li a").all()] == ["write the api",
                                                                                       "write the docs"]
            waiting = queue.locator("ul.waits li", has_text="ship it")
            assert waiting.locator(".dep.over", has_text="design the schema").count() == 1  # done: struck
            assert waiting.locator(".dep:not(.over)", has_text="write the api").count() == 1
            alert = queue.locator("[role=alert]")
            first, then = sorted([(lexer.id, "lexer"), (parser.id, "parser")])  # named from the smaller id
            chain = f"{first[1]} ({first[0][:8]}) → {then[1]} ({then[0][:8]}) → {first[1]} ({first[0][:8]})"
            assert f"Cycle of waits: {chain}. These tasks are never ready" in alert.inner_text()
            assert f"clare task edit {first[0][:8]} --no-after {then[0][:8]}" in alert.inner_text()
            pg.screenshot(path=str(ARTIFACTS / f"deps-project-{name}-{scheme}.png"), full_page=True)
            pg.goto(server.url + "/")
            row = pg.locator("#frag-projects tr", has_text="alpha")
            assert row.locator(".badge", has_text="2 ready").count() == 1
            pg.screenshot(path=str(ARTIFACTS / f"deps-dashboard-{name}-{scheme}.png"), full_page=True)

    pg = page_of(viewport={"width": 1280, "height": 900})
    pg.goto(f"{server.url}/tasks/{docs.id}")
    card = pg.locator("#frag-task")
    assert card.locator("dd", has_text="—").count() >= 2  # waits on nothing, blocks nothing
    card.locator("input[name=after]").fill(api.id[:6])
    card.get_by_role("button", name="Change waits").click()
    settle(pg)
    assert pg.locator("#flash").inner_text() == "write the docs: waits on 1 task."
    assert pg.locator("#frag-task .dep", has_text="write the api").count() == 1
    pg.screenshot(path=str(ARTIFACTS / "deps-task-desktop-light.png"), full_page=True)
    pg.goto(f"{server.url}/tasks/{api.id}")
    assert pg.locator("#frag-task dd .dep", has_text="write the docs").count() == 1  # it blocks docs now
    pg.goto(f"{server.url}/projects/{p.id}")
    assert [x.inner_text() for x in pg.locator("#frag-queue ol.queue li a").all()] == ["write the api"]
    assert [t.id for t in svc.ready_tasks("alpha")] == [api.id]
    assert ship.id not in {t.id for t in svc.ready_tasks()}
