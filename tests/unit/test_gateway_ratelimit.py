"""The gateway's per-principal rate limit (services/gateway/guard.py, on `limits`)."""

from __future__ import annotations

import time

from services.gateway.guard import RateLimiter


def test_burst_then_refused_per_principal():
    limiter = RateLimiter(rate=0.2, burst=3)
    assert (limiter.amount, limiter.window_s) == (3, 15)
    assert [limiter.acquire("k1") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("k1")
    assert 0 < wait <= 15
    assert limiter.acquire("k2") == 0.0  # another principal keeps its own burst
    assert "0.2 requests/s" in limiter.describe() and "rate_limit_burst=3" in limiter.describe()


def test_window_never_slower_than_the_rate():
    # burst / rate under a second: the window is one second holding `rate` requests
    limiter = RateLimiter(rate=100, burst=20)
    assert (limiter.amount, limiter.window_s) == (100, 1)
    assert all(limiter.acquire("k") == 0.0 for _ in range(100))
    assert limiter.acquire("k") > 0


def test_retry_after_is_honest():
    limiter = RateLimiter(rate=3, burst=3)
    for _ in range(3):
        assert limiter.acquire("k") == 0.0
    wait = limiter.acquire("k")
    assert wait > 0
    time.sleep(wait + 0.05)
    assert limiter.acquire("k") == 0.0


def test_idle_principals_are_forgotten():
    # memory stays bounded: the storage drops a principal's counters after its windows pass
    limiter = RateLimiter(rate=3, burst=3)
    limiter.acquire("idle")
    assert any("idle" in key for key in limiter.storage.storage)
    deadline = time.monotonic() + 30
    while any("idle" in key for key in limiter.storage.storage) and time.monotonic() < deadline:
        limiter.acquire("busy")  # expiry runs after any request
        time.sleep(0.2)
    assert not any("idle" in key for key in limiter.storage.storage)
    assert limiter.acquire("idle") == 0.0
