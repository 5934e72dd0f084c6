"""rlhf.outbox's SQLite side: group-committed writes, per-job isolation, idempotent event
ids, backlog bookkeeping, rows of a lost log requeued. The relay to a real broker is
tests/integration/test_gateway_outbox.py and test_lost_log.py."""

import sqlite3
import threading
import time

import pytest

from rlhf.outbox import Outbox


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


def _put(box: Outbox, event_id: str, topic: str = "t") -> None:
    box.submit(lambda c: Outbox.put(c, event_id, topic, "key", event_id.encode())).result()


def test_committed_rows_survive_reopen_in_order(tmp_path):
    box = Outbox(tmp_path / "o.db")
    futures = [box.submit(lambda c, i=i: Outbox.put(c, f"e{i}", "t", None, b"x")) for i in range(50)]
    for f in futures:
        f.result()
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert [r.event_id for r in box.pending(100)] == [f"e{i}" for i in range(50)]
    assert box.stats()[0] == 50
    box.close()


def test_failing_job_rolls_back_only_itself(outbox):
    def bad(conn: sqlite3.Connection) -> None:
        Outbox.put(conn, "bad", "t", None, b"x")
        raise ValueError("refused")

    # queue them together so they share one transaction
    gate = threading.Event()
    blocker = outbox.submit(lambda c: gate.wait(5))
    ok1 = outbox.submit(lambda c: Outbox.put(c, "ok1", "t", None, b"x"))
    failed = outbox.submit(bad)
    ok2 = outbox.submit(lambda c: Outbox.put(c, "ok2", "t", None, b"x"))
    gate.set()
    blocker.result()
    ok1.result()
    ok2.result()
    with pytest.raises(ValueError, match="refused"):
        failed.result()
    assert [r.event_id for r in outbox.pending(10)] == ["ok1", "ok2"]


def test_same_event_id_is_stored_once(outbox):
    _put(outbox, "dup")
    _put(outbox, "dup")
    assert [r.event_id for r in outbox.pending(10)] == ["dup"]


def test_sent_rows_leave_the_backlog_and_are_pruned(outbox):
    for i in range(3):
        _put(outbox, f"e{i}")
    rows = outbox.pending(10)
    outbox.mark_sent([rows[0].seq, rows[2].seq]).result()
    assert [r.event_id for r in outbox.pending(10)] == ["e1"]
    count, age = outbox.stats()
    assert count == 1 and age >= 0
    assert outbox.prune(time.time() + 1).result() == 2
    outbox.mark_sent([rows[1].seq]).result()
    assert outbox.stats() == (0, 0.0)


def test_rows_of_a_lost_log_go_back_to_pending(outbox):
    """What the relay does when a topic's log identity changes (rlhf.bus.watch): rows the
    old log acknowledged, or an unknown one, are pending again; rows in the new log stay sent."""
    for name in ("old", "new", "unknown", "other-topic"):
        _put(outbox, name, topic="u" if name == "other-topic" else "t")
    seq = {r.event_id: r.seq for r in outbox.pending(10)}
    outbox.mark_sent({seq["old"]: "c1/t1", seq["new"]: "c2/t1", seq["other-topic"]: "c1/u1"}).result()
    outbox.mark_sent([seq["unknown"]]).result()
    assert outbox.stats()[0] == 0

    n, old = outbox.requeue_lost("t", "c2/t1").result()
    assert n == 2 and sorted(old, key=str) == sorted(["c1/t1", None], key=str)
    assert sorted(r.event_id for r in outbox.pending(10)) == ["old", "unknown"]
    assert outbox.requeue_lost("t", "c2/t1").result() == (0, [])  # idempotent: nothing sent elsewhere now


def test_an_outbox_from_before_log_ids_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, "
            "topic TEXT NOT NULL, key BLOB, payload BLOB NOT NULL, created REAL NOT NULL, "
            "attempts INTEGER NOT NULL DEFAULT 0, sent REAL)"
        )
        db.execute("INSERT INTO outbox (event_id, topic, payload, created, sent) VALUES ('e', 't', x'00', 0, 1)")
    box = Outbox(path)
    try:
        # sent before log ids were recorded: which log holds it is unknown, so it is sent again
        assert box.requeue_lost("t", "c/t").result() == (1, [None])
        assert [r.event_id for r in box.pending(10)] == ["e"]
    finally:
        box.close()
