"""rlhf.outbox's SQLite side: group-committed writes, per-job isolation, idempotent event
ids, backlog bookkeeping. The relay to a real broker is tests/integration/test_gateway_outbox.py."""

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
