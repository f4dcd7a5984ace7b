"""The publisher and its debouncer, driven by hand: a clock that moves only when the test moves it,
producers that return what the test tells them, and the cache's own change notifications as the
record of what was written and in which order."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from meshpilot.publish import Bundle, Changes, Debouncer, Output, Producer, Publisher
from meshpilot.xds.cache import ResourceCache
from meshpilot.xds.resource import PUSH_ORDER, TYPE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the debouncer ------------------------------------------------------------------------------


def test_a_change_to_an_idle_control_plane_is_due_at_once() -> None:
    d = Debouncer(quiet_s=0.1, cap_s=1.0)
    assert d.next_deadline() is None and not d.due(0.0), "expected nothing due before any change"
    d.add(10.0)
    assert d.due(10.0) and d.next_deadline() == 10.0, f"expected the first change ever due at once, got {d.next_deadline()}"
    d.take()
    d.add(10.25)
    assert d.due(10.25), "expected a change 250 ms after the one before (idle for more than 100 ms) due at once"
    d.take()
    d.add(10.3)
    assert not d.due(10.3) and d.next_deadline() == 10.3 + 0.1, f"expected a change 50 ms after the one before to wait 100 ms, got {d.next_deadline()}"
    d.take()  # published at 10.4, the end of its quiet time
    d.add(10.41)
    assert d.due(10.41), "expected a change 110 ms after the one before due at once, though a batch was published 10 ms before it"


def test_busy_time_makes_changes_around_it_wait() -> None:
    d = Debouncer(quiet_s=0.1, cap_s=1.0)
    d.add(10.0)
    d.busy(10.0)  # e.g. the full build at start, or a publication that failed
    assert not d.due(10.0) and d.next_deadline() == 10.0 + 0.1, f"expected the pending change to wait for quiet, got {d.next_deadline()}"
    d.take()
    d.add(10.05)
    assert not d.due(10.05) and d.next_deadline() == 10.05 + 0.1, f"expected a change 50 ms after busy time to wait, got {d.next_deadline()}"
    d.take()
    d.busy(20.0)
    d.add(20.1)
    assert d.due(20.1), "expected a change 100 ms after busy time (and after the change before) due at once"


def test_a_burst_is_due_at_its_first_change_then_once_it_has_been_quiet() -> None:
    d = Debouncer(quiet_s=0.05, cap_s=2.0)
    d.add(10.0)
    assert d.due(10.0), "expected the burst's first change due at once"
    d.take()
    for i in range(1, 300):  # 299 more changes a millisecond apart
        d.add(10.0 + i / 1000)
        assert not d.due(10.0 + i / 1000), f"expected nothing due in the middle of the burst (change {i})"
    last = 10.0 + 299 / 1000
    assert d.next_deadline() == last + 0.05, f"expected the deadline 50 ms after the last change, got {d.next_deadline()}"
    assert not d.due(last + 0.049) and d.due(last + 0.05), "expected the burst due exactly 50 ms after its last change"
    d.take()
    assert d.next_deadline() is None and not d.due(last + 10), "expected nothing due once taken"


def test_a_steady_stream_of_changes_is_due_at_the_cap() -> None:
    d = Debouncer(quiet_s=0.1, cap_s=0.15)
    d.busy(0.0)
    due_at = []
    now = 0.0
    for _ in range(40):  # a change every 20 ms never leaves 100 ms of quiet
        d.add(now)
        if d.due(now):
            due_at.append(round(now, 3))
            d.take()
            d.add(now)
        now += 0.02
    assert len(due_at) >= 4, f"expected a publication at each 150 ms cap during 0.8 s of changes, got {due_at}"
    assert all(0.15 <= b - a <= 0.17 for a, b in zip([0.0, *due_at], due_at)), f"expected them 150-170 ms apart, got {due_at}"


def test_zero_quiet_time_is_due_at_once() -> None:
    d = Debouncer(quiet_s=0, cap_s=1.0)
    d.busy(5.0)
    d.add(5.0)
    assert d.due(5.0), "expected a change due at once without a quiet time"


@given(
    quiet=st.floats(0, 5, allow_nan=False),
    cap=st.floats(0, 5, allow_nan=False),
    idle=st.floats(0, 10, allow_nan=False),
    gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=30),
    probe=st.floats(0, 10, allow_nan=False),
)
def test_due_means_idle_before_or_quiet_enough_or_capped(quiet: float, cap: float, idle: float, gaps: list[float], probe: float) -> None:
    d = Debouncer(quiet, cap)
    d.busy(0.0)
    times = []
    now = idle
    for gap in gaps:
        now += gap
        times.append(now)
        d.add(now)
    at = now + probe
    want = times[0] >= quiet or at >= times[-1] + quiet or at >= times[0] + cap
    assert d.due(at) == want, f"quiet {quiet} cap {cap} published at 0, changes at {times}: expected due({at}) {want}, got {d.due(at)}"
    deadline = d.next_deadline()
    assert deadline is not None and deadline <= times[0] + cap, f"expected the deadline never past the cap, got {deadline}"


def _simulate(d: Debouncer, arrivals: list[float]) -> tuple[list[float], list[float]]:
    """Run ``d`` as the publisher's loop does over changes at these (sorted) times: publish when a
    deadline passes, and at once when a change is due as it arrives. Returns when each change was
    published and the publication times."""
    out = [float("nan")] * len(arrivals)
    pending: list[int] = []
    publications: list[float] = []

    def publish(at: float) -> None:
        d.take()
        for i in pending:
            out[i] = at
        pending.clear()
        publications.append(at)

    for i, t in enumerate(arrivals):
        deadline = d.next_deadline()
        while deadline is not None and deadline <= t:
            publish(deadline)
            deadline = d.next_deadline()
        d.add(t)
        pending.append(i)
        if d.due(t):
            publish(t)
    while (deadline := d.next_deadline()) is not None:
        publish(deadline)
    return out, publications


@given(
    quiet=st.floats(0, 2, allow_nan=False),
    cap=st.floats(0, 2, allow_nan=False),
    gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=40),
)
def test_no_change_waits_past_the_cap_and_an_isolated_one_waits_not_at_all(quiet: float, cap: float, gaps: list[float]) -> None:
    arrivals, now = [], 0.0
    for gap in gaps:
        now += gap
        arrivals.append(now)
    published_at, publications = _simulate(Debouncer(quiet, cap), arrivals)
    for t, p in zip(arrivals, published_at):
        assert t <= p <= t + cap + 1e-9, f"quiet {quiet} cap {cap} arrivals {arrivals}: a change at {t} published at {p}, past the cap"
    for i, t in enumerate(arrivals):
        if i == 0 or t >= arrivals[i - 1] + quiet:  # no change in the quiet time before it
            assert published_at[i] == t, f"quiet {quiet} arrivals {arrivals}: the change at {t} found the control plane idle and waited until {published_at[i]}"


@given(
    quiet=st.floats(0.001, 2, allow_nan=False),
    cap=st.floats(0.001, 2, allow_nan=False),
    start=st.floats(0, 5, allow_nan=False),
    fractions=st.lists(st.floats(0, 1, allow_nan=False, exclude_max=True), min_size=1, max_size=500),
)
def test_a_burst_within_the_window_is_published_at_most_twice(quiet: float, cap: float, start: float, fractions: list[float]) -> None:
    """Changes less than ``quiet`` apart, all within ``cap`` of the first, to an idle control plane:
    the first goes at once and the rest together once they settle."""
    step = min(quiet, cap / len(fractions))
    arrivals, now = [], start
    for f in fractions:
        now += f * step
        arrivals.append(now)
    assume(all(b < a + quiet for a, b in zip(arrivals, arrivals[1:])) and arrivals[-1] < arrivals[0] + cap)  # float rounding aside
    published_at, publications = _simulate(Debouncer(quiet, cap), arrivals)
    assert published_at[0] == arrivals[0], f"expected the burst's first change published at once, got {published_at[0]} for {arrivals[0]}"
    assert len(publications) <= 2, f"quiet {quiet} cap {cap}: expected at most 2 publications for a burst of {len(arrivals)}, got {publications}"


@given(
    quiet=st.floats(0, 2, allow_nan=False),
    cap=st.floats(0, 2, allow_nan=False),
    steps=st.lists(st.tuples(st.sampled_from(["add", "busy", "take"]), st.floats(-1, 1, allow_nan=False)), min_size=1, max_size=40),
)
def test_a_clock_stepping_back_never_brings_a_deadline_forward(quiet: float, cap: float, steps: list[tuple[str, float]]) -> None:
    """The object's time never goes backwards: fed a clock that steps back, it answers as if the
    clock had stood still, and a new change never makes the pending ones due earlier."""
    stepped, steady = Debouncer(quiet, cap), Debouncer(quiet, cap)
    now, latest = 0.0, float("-inf")
    for op, dt in steps:
        now += dt
        if op != "take":  # take is told no time
            latest = max(latest, now)
        before = stepped.next_deadline()
        for d, t in ((stepped, now), (steady, latest)):
            if op == "add":
                d.add(t)
            elif op == "busy":
                d.busy(t)
            else:
                d.take()
        after = stepped.next_deadline()
        assert after == steady.next_deadline(), f"{steps}: after {op} at {now} (latest {latest}) expected deadline {steady.next_deadline()}, got {after}"
        if op == "add" and before is not None:
            assert after is not None and after >= before, f"{steps}: a change at {now} brought the deadline forward from {before} to {after}"


# ---- the publisher ------------------------------------------------------------------------------


class Script(Producer):
    """A producer that returns the next output it was given."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.seen: list[Changes] = []

    def produce(self, changes: Changes, now: float) -> Output:
        self.seen.append(changes)
        return self.outputs.pop(0) if self.outputs else {}


def _record(cache: ResourceCache) -> list[tuple[str, str, str, frozenset[str]]]:
    """Every write the cache reports: (put|remove, type, scope, names)."""
    log: list[tuple[str, str, str, frozenset[str]]] = []

    def seen(type_url: str, scope: str, names: frozenset[str], stamp: float) -> None:
        present = {n for n in names if cache.get(type_url, n, scope) is not None and (not scope or n in cache.names(type_url, scope))}
        log.append(("put" if present else "remove", type_url, scope, names))

    cache.watch(seen)
    return log


def _publisher(*producers: Producer) -> tuple[Publisher, ResourceCache, Clock]:
    cache, clock = ResourceCache(), Clock()
    return Publisher(cache, list(producers), Debouncer(0.1, 1.0), clock), cache, clock


def _msg(text: str) -> bytes:
    return text.encode()


def test_a_key_replaces_what_it_held_and_none_removes_it() -> None:
    p = Script()
    pub, cache, _ = _publisher(p)
    p.outputs.append({("", "web"): Bundle({TYPE.CLUSTER: {"a": _msg("1"), "b": _msg("1")}, TYPE.DNS: {"web": _msg("d")}})})
    pub.publish(Changes(everything=True))
    assert cache.names(TYPE.CLUSTER) == ["a", "b"] and cache.names(TYPE.DNS) == ["web"], f"expected a, b and web, got {cache.names(TYPE.CLUSTER)}"
    p.outputs.append({("", "web"): Bundle({TYPE.CLUSTER: {"a": _msg("2")}})})
    pub.publish(Changes(services={"web"}))
    assert cache.names(TYPE.CLUSTER) == ["a"], f"expected b removed once the key no longer holds it, got {cache.names(TYPE.CLUSTER)}"
    assert cache.names(TYPE.DNS) == ["web"], "expected a bundle naming only clusters to leave the key's DNS entry alone"
    p.outputs.append({("", "web"): None})
    pub.publish(Changes(services={"web"}))
    assert cache.names(TYPE.CLUSTER) == [] and cache.names(TYPE.DNS) == [], "expected everything the key held removed by None"


def test_writes_go_in_push_order_and_removals_after_every_put() -> None:
    p = Script()
    pub, cache, _ = _publisher(p)
    p.outputs.append({("", "old"): Bundle({TYPE.CLUSTER: {"old": _msg("c")}, TYPE.ROUTE: {"r-old": _msg("r")}})})
    pub.publish(Changes(everything=True))
    log = _record(cache)
    # listed backwards on purpose: the publisher orders them
    p.outputs.append({
        ("", "old"): None,
        ("n1", "node"): Bundle({TYPE.LISTENER: {"l": _msg("l")}, TYPE.ROUTE: {"r": _msg("r")}, TYPE.CLUSTER: {"in": _msg("c")}}),
        ("", "new"): Bundle({TYPE.DNS: {"d": _msg("d")}, TYPE.ROUTE: {"r-new": _msg("r")}, TYPE.ENDPOINT: {"new": _msg("e")}, TYPE.CLUSTER: {"new": _msg("c")}}),
    })
    pub.publish(Changes(services={"old", "new"}))
    kinds = [(op, t) for op, t, _scope, _names in log]
    puts = [t for op, t in kinds if op == "put"]
    assert puts == sorted(puts, key=PUSH_ORDER.index), f"expected puts in push order {PUSH_ORDER}, got {puts}"
    first_removal = next(i for i, (op, _t) in enumerate(kinds) if op == "remove")
    assert all(op == "remove" for op, _t in kinds[first_removal:]), f"expected every removal after every put, got {kinds}"
    assert {(t, names) for op, t, _s, names in log if op == "remove"} == {(TYPE.CLUSTER, frozenset({"old"})), (TYPE.ROUTE, frozenset({"r-old"}))}, f"expected the old key's cluster and route removed, got {log}"


def test_a_name_moving_between_keys_stays_and_scopes_are_apart() -> None:
    p, q = Script(), Script()
    pub, cache, _ = _publisher(p, q)
    p.outputs.append({("", "a"): Bundle({TYPE.ROUTE: {"shared": _msg("1")}})})
    q.outputs.append({("n1", "own"): Bundle({TYPE.ROUTE: {"shared": _msg("mine")}})})
    pub.publish(Changes(everything=True))
    p.outputs.append({("", "a"): None, ("", "b"): Bundle({TYPE.ROUTE: {"shared": _msg("2")}})})
    pub.publish(Changes(services={"a", "b"}))
    entry = cache.get(TYPE.ROUTE, "shared")
    assert entry is not None, "expected a name that moved from key a to key b in one publication to stay"
    assert cache.names(TYPE.ROUTE, "n1") == ["shared"], "expected the node's own resource of the same name untouched"
    pub.forget_scope("n1")
    assert cache.names(TYPE.ROUTE, "n1") == [], "expected the node's scope dropped"
    q.outputs.append({("n1", "own"): Bundle({TYPE.ROUTE: {}})})
    pub.publish(Changes(nodes={"n1"}))  # nothing remembered for the dropped scope: nothing to remove
    assert cache.names(TYPE.ROUTE) == ["shared"], "expected the shared scope untouched by the node's"


def test_unlisted_types_stay_out_of_wildcard_subscriptions() -> None:
    p = Script()
    pub, cache, _ = _publisher(p)
    p.outputs.append({("", "grpc"): Bundle({TYPE.LISTENER: {"web:80": _msg("l")}, TYPE.ROUTE: {"r": _msg("r")}}, unlisted=frozenset({TYPE.LISTENER}))})
    pub.publish(Changes(everything=True))
    assert cache.get(TYPE.LISTENER, "web:80") is not None and cache.wildcard_names(TYPE.LISTENER) == set(), "expected the listener by name only"
    assert cache.wildcard_names(TYPE.ROUTE) == {"r"}, "expected the route listed as before"


def test_a_change_to_an_idle_publisher_goes_at_once_and_the_next_ones_wait_merged() -> None:
    p = Script()
    pub, _cache, clock = _publisher(p)
    pub.note(Changes(services={"z"}))
    assert pub.pending_for("z") and pub.next_deadline() == clock.now, f"expected a change to an idle publisher due now, got {pub.next_deadline()}"
    assert pub.publish_due() and len(p.seen) == 1 and p.seen[0].services == {"z"}, f"expected it published at once, got {p.seen}"
    assert not pub.pending_for("z"), "expected nothing waiting once published"
    clock.now += 0.01
    pub.note(Changes(services={"a"}))
    assert pub.pending_for("a") and not pub.publish_due(), "expected a change 10 ms after a publication to wait"
    clock.now += 0.05
    pub.note(Changes(endpoints={"b"}, instances={"i"}))
    assert not pub.publish_due() and len(p.seen) == 1, "expected nothing published 50 ms into a 100 ms quiet time"
    assert pub.next_deadline() == clock.now + 0.1, f"expected the deadline 100 ms after the last change, got {pub.next_deadline()}"
    assert pub.pending_for("a") and pub.pending_for("b"), "expected both services reported as waiting (the /synced route)"
    clock.now += 0.1
    assert pub.publish_due(), "expected the changes published once quiet"
    assert len(p.seen) == 2 and (p.seen[1].services, p.seen[1].endpoints, p.seen[1].instances) == ({"a"}, {"b"}, {"i"}), f"expected one merged publication, got {p.seen}"
    assert pub.next_deadline() is None and not pub.publish_due(), "expected nothing left pending"
    clock.now += 0.5
    pub.note(Changes(services={"c"}))
    assert pub.publish_due() and p.seen[-1].services == {"c"}, "expected a change after 500 ms of quiet published at once again"


def test_a_nodes_own_publication_does_not_hold_back_a_change() -> None:
    p = Script()
    pub, _cache, clock = _publisher(p)
    pub.publish(Changes(nodes={"n1"}))  # a sidecar connected: its listeners go out at once
    clock.now += 0.03
    pub.note(Changes(services={"a"}))
    assert pub.next_deadline() == clock.now and pub.publish_due(), f"expected a change 30 ms after a node connected published at once, got {pub.next_deadline()}"


def test_a_direct_publication_counts_as_activity() -> None:
    p = Script()
    pub, _cache, clock = _publisher(p)
    pub.publish(Changes(everything=True))  # the start's full build, or a node's own resources
    clock.now += 0.03
    pub.note(Changes(services={"a"}))
    assert not pub.publish_due() and pub.next_deadline() == clock.now + 0.1, f"expected a change 30 ms after a publication to wait for quiet, got {pub.next_deadline()}"


class Failing(Script):
    """A producer whose first ``fail`` publications raise, as a bug or a bad document would."""

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail

    def produce(self, changes: Changes, now: float) -> Output:
        if self.fail:
            self.fail -= 1
            self.seen.append(changes)
            raise RuntimeError("producer failed")
        return super().produce(changes, now)


def test_a_batch_a_producer_failed_on_is_published_with_the_next_one() -> None:
    p = Failing(fail=1)
    pub, cache, clock = _publisher(p)
    pub.note(Changes(services={"a"}))
    clock.now += 0.1
    try:
        pub.publish_due()
    except RuntimeError:
        pass
    else:
        raise AssertionError("expected the producer's failure to reach the run loop")
    assert pub.pending_for("a") and not pub.publish_due(), "expected the failed batch pending, waiting for quiet rather than retried at once"
    pub.note(Changes(services={"b"}))
    clock.now += 0.1
    p.outputs.append({("", "a"): Bundle({TYPE.CLUSTER: {"a": _msg("1")}})})
    assert pub.publish_due(), "expected the failed batch to be due again"
    assert p.seen[-1].services == {"a", "b"}, f"expected the failed change beside the new one, got {p.seen[-1].services}"
    assert cache.names(TYPE.CLUSTER) == ["a"], f"expected the failed batch's resources published, got {cache.names(TYPE.CLUSTER)}"


def test_a_producer_deadline_publishes_without_a_change() -> None:
    class Later(Script):
        due: float | None = 1000.5

        def next_deadline(self) -> float | None:
            return self.due

    p = Later()
    pub, _cache, clock = _publisher(p)
    assert pub.next_deadline() == 1000.5 and not pub.publish_due(), "expected the producer's deadline, not yet reached"
    clock.now = 1000.5
    assert pub.publish_due() and len(p.seen) == 1 and not p.seen[0], f"expected a publication with no changes at the deadline, got {p.seen}"


def test_a_resource_put_in_by_hand_is_published_at_once_and_taken_back() -> None:
    p = Script()
    pub, cache, _ = _publisher(p)
    p.outputs.append({("", "web"): Bundle({TYPE.CLUSTER: {"web": _msg("1")}})})
    pub.publish(Changes(everything=True))
    pub.inject(TYPE.CLUSTER, "broken", _msg("bad"))
    pub.inject(TYPE.EXTENSION_CONFIG, "filter", _msg("bad"), scope="n1")
    assert cache.names(TYPE.CLUSTER) == ["broken", "web"] and cache.names(TYPE.EXTENSION_CONFIG, "n1") == ["filter"], "expected both injected at once"
    pub.inject(TYPE.CLUSTER, "broken", None)
    assert cache.names(TYPE.CLUSTER) == ["web"], f"expected the injected cluster taken back and the producer's kept, got {cache.names(TYPE.CLUSTER)}"


def test_writes_held_up_behind_a_publications_pushes_wait_for_quiet_instead_of_each_going_at_once() -> None:
    # 500 sequential writes to a control plane pushing to 2,000 streams: each publication held the
    # loop ~0.3 s, so each next write arrived "after a pause" and went out at once on its own
    p = Script()
    pub, _cache, clock = _publisher(p)
    pub.note(Changes(services={"a"}))
    assert pub.publish_due() and len(p.seen) == 1, "expected the first change of the burst published at once"
    meant = pub.next_wake()
    assert meant is not None and meant <= clock.now + 0.05, f"expected the loop watched after a publication, next wake-up {meant}"
    clock.now += 0.3  # the pushes held the loop; the writer's next request waited behind them
    pub.woke(meant)
    pub.note(Changes(services={"b"}))
    assert not pub.publish_due(), "expected a write that waited out the pushes to wait for quiet, not to go at once"
    assert pub.next_deadline() == clock.now + 0.1, f"expected it due 100 ms later unless more come, got {pub.next_deadline()}"
    clock.now += 0.01
    pub.note(Changes(services={"c"}))  # the rest of the burst comes at once now
    clock.now += 0.1
    assert pub.publish_due() and p.seen[-1].services == {"b", "c"}, f"expected the rest published together, got {p.seen[1:]}"
    clock.now += 2.0  # long after: no publication watched, a change goes at once again
    pub.woke(pub.next_wake())
    pub.note(Changes(services={"d"}))
    assert pub.publish_due() and p.seen[-1].services == {"d"}, "expected a change to an idle control plane published at once"


def test_a_publication_whose_pushes_hold_nothing_leaves_the_next_change_going_at_once() -> None:
    p = Script()
    pub, _cache, clock = _publisher(p)
    pub.note(Changes(services={"a"}))
    assert pub.publish_due()
    meant = pub.next_wake()
    assert meant is not None
    clock.now = meant + 0.001  # on time: nothing held the loop
    pub.woke(meant)
    clock.now += 0.2
    pub.note(Changes(services={"b"}))
    assert pub.publish_due() and p.seen[-1].services == {"b"}, "expected a change 200 ms after a publication that held nothing to go at once"
