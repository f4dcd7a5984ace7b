"""The publisher and its debouncer, driven by hand: a clock that moves only when the test moves it,
producers that return what the test tells them, and the cache's own change notifications as the
record of what was written and in which order."""

from __future__ import annotations

from hypothesis import given
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


def test_a_burst_is_due_once_it_has_been_quiet() -> None:
    d = Debouncer(quiet_s=0.05, cap_s=2.0)
    assert d.next_deadline() is None and not d.due(0.0), "expected nothing due before any change"
    for i in range(300):  # 300 changes a millisecond apart
        d.add(10.0 + i / 1000)
        assert not d.due(10.0 + i / 1000), f"expected nothing due in the middle of the burst (change {i})"
    last = 10.0 + 299 / 1000
    assert d.next_deadline() == last + 0.05, f"expected the deadline 50 ms after the last change, got {d.next_deadline()}"
    assert not d.due(last + 0.049) and d.due(last + 0.05), "expected the burst due exactly 50 ms after its last change"
    d.take()
    assert d.next_deadline() is None and not d.due(last + 10), "expected nothing due once taken"


def test_a_steady_stream_of_changes_is_due_at_the_cap() -> None:
    d = Debouncer(quiet_s=0.1, cap_s=0.15)
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
    d.add(5.0)
    assert d.due(5.0), "expected a change due at once without a quiet time"


@given(
    quiet=st.floats(0, 5, allow_nan=False),
    cap=st.floats(0, 5, allow_nan=False),
    gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=30),
    probe=st.floats(0, 10, allow_nan=False),
)
def test_due_means_quiet_enough_or_capped(quiet: float, cap: float, gaps: list[float], probe: float) -> None:
    d = Debouncer(quiet, cap)
    times = []
    now = 0.0
    for gap in gaps:
        now += gap
        times.append(now)
        d.add(now)
    at = now + probe
    want = at >= times[-1] + quiet or at >= times[0] + cap
    assert d.due(at) == want, f"quiet {quiet} cap {cap} changes at {times}: expected due({at}) {want}, got {d.due(at)}"
    deadline = d.next_deadline()
    assert deadline is not None and deadline <= times[0] + cap, f"expected the deadline never past the cap, got {deadline}"


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


def test_changes_wait_for_the_debouncer_and_arrive_merged() -> None:
    p = Script()
    pub, _cache, clock = _publisher(p)
    pub.note(Changes(services={"a"}))
    clock.now += 0.05
    pub.note(Changes(endpoints={"b"}, instances={"i"}))
    assert not pub.publish_due() and p.seen == [], "expected nothing published 50 ms into a 100 ms quiet time"
    assert pub.next_deadline() == clock.now + 0.1, f"expected the deadline 100 ms after the last change, got {pub.next_deadline()}"
    clock.now += 0.1
    assert pub.publish_due(), "expected the changes published once quiet"
    assert len(p.seen) == 1 and (p.seen[0].services, p.seen[0].endpoints, p.seen[0].instances) == ({"a"}, {"b"}, {"i"}), f"expected one merged publication, got {p.seen}"
    assert pub.next_deadline() is None and not pub.publish_due(), "expected nothing left pending"


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
