"""The xDS harness's retry back-off: Envoy's jittered exponential back-off, without a clock."""

from __future__ import annotations

import random

from meshpilot.perf.xds_push import Backoff


def test_delays_stay_below_an_interval_that_doubles_to_the_cap_and_a_response_resets_it() -> None:
    b = Backoff(0.5, 30.0, random.Random(7))
    intervals = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    delays = [b.next_delay() for _ in intervals]
    for n, (d, limit) in enumerate(zip(delays, intervals)):
        assert 0 <= d < limit, f"failure {n + 1}: expected a delay below {limit} s, got {d}"
    assert max(delays[-2:]) > 8.0, f"at the cap the delays should spread up to 30 s; got {delays[-2:]}"
    b.reset()
    first = [Backoff(0.5, 30.0, random.Random(s)).next_delay() for s in range(50)]
    assert b.next_delay() < 0.5 and max(first) < 0.5 and min(first) < 0.1, f"after a response the delay is below 500 ms again; got {first}"
