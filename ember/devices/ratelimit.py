"""Token-bucket rate limiting of device I/O, with Firecracker's rate limiter semantics.

A limiter has up to two buckets: ``bandwidth`` counts bytes, ``ops`` counts
requests. A bucket holds up to ``size`` tokens, refills from empty in
``refill_time_ms`` and starts full; ``one_time_burst`` extra tokens are spent
first and never come back. A request takes from both buckets or from neither.
One larger than a bucket is let through when that bucket is full and leaves it
in debt, so it is paced rather than refused. A bucket of size 0 or refill time
0 limits nothing, as in Firecracker. Devices ask ``admit`` before serving a
request and, when told to wait, leave it queued and come back that much later.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
_ROUNDING = 1e-6  # tokens: float refill arithmetic may fall this short of a whole token


class TokenBucket:
    """``size`` tokens, refilled at size / refill_time, plus a one-time burst."""

    def __init__(self, size: int, refill_time_ms: int, one_time_burst: int = 0, *,
                 clock: Clock = time.monotonic) -> None:
        if size <= 0 or refill_time_ms <= 0:
            raise ValueError("a token bucket needs a positive size and refill time")
        self.size = size
        self.rate = size * 1000.0 / refill_time_ms  # tokens per second
        self.budget = float(size)
        self.burst = one_time_burst
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.budget = min(float(self.size), self.budget + (now - self._last) * self.rate)
        self._last = now

    def wait_for(self, tokens: int) -> float:
        """Seconds until ``tokens`` may be taken (0.0: now). Takes nothing."""
        self._refill()
        needed = min(tokens - self.burst, self.size)  # more than size: wait for a full bucket
        shortfall = needed - self.budget
        return shortfall / self.rate if shortfall > _ROUNDING else 0.0

    def take(self, tokens: int) -> None:
        from_burst = min(self.burst, tokens)
        self.burst -= from_burst
        self.budget -= tokens - from_burst  # may go below zero: the debt of an oversized request


class RateLimiter:
    """A device's bandwidth (bytes) and ops (requests) buckets; either may be absent."""

    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None) -> None:
        self.bandwidth, self.ops = bandwidth, ops

    def admit(self, nbytes: int) -> float:
        """Take one op and ``nbytes`` bytes and return 0.0, or take nothing and return
        the seconds to wait before asking again."""
        wait = 0.0
        if self.ops is not None:
            wait = self.ops.wait_for(1)
        if self.bandwidth is not None and nbytes:
            wait = max(wait, self.bandwidth.wait_for(nbytes))
        if wait:
            return wait
        if self.ops is not None:
            self.ops.take(1)
        if self.bandwidth is not None and nbytes:
            self.bandwidth.take(nbytes)
        return 0.0


def bucket(spec, clock: Clock = time.monotonic) -> TokenBucket | None:
    """A bucket from a config TokenBucket (size, refill_time, one_time_burst), or None for no limit."""
    if spec is None or spec.size <= 0 or spec.refill_time <= 0:
        return None
    return TokenBucket(spec.size, spec.refill_time, spec.one_time_burst or 0, clock=clock)


def from_config(spec, clock: Clock = time.monotonic) -> RateLimiter | None:
    """The limiter a config RateLimiter describes, or None when it limits nothing."""
    if spec is None:
        return None
    limiter = RateLimiter(bucket(spec.bandwidth, clock), bucket(spec.ops, clock))
    return None if limiter.bandwidth is None and limiter.ops is None else limiter
