"""The TTL deadlines the Consul checker finds by due time: what ``due`` gives is exactly what a scan
of every deadline would have found, whatever order of sets, re-sets and removals came before."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.consul.deadlines import Deadlines

_keys = st.sampled_from([("i1", "c1"), ("i1", "c2"), ("i2", "c1"), ("i3", "c9")])
_ops = st.lists(st.one_of(
    st.tuples(st.just("set"), _keys, st.floats(0, 100)),
    st.tuples(st.just("pop"), _keys, st.just(0.0)),
    st.tuples(st.just("due"), _keys, st.floats(0, 100)),
), max_size=60)


@settings(max_examples=300)
@given(_ops)
def test_due_is_what_a_scan_of_every_deadline_finds(ops: list[tuple[str, tuple[str, str], float]]) -> None:
    d, model = Deadlines(), {}
    for op, key, t in ops:
        if op == "set":
            d[key] = t
            model[key] = t
        elif op == "pop":
            assert d.pop(key) == model.pop(key, None)
        else:
            scanned = sorted(k for k, at in model.items() if at <= t)
            got = sorted(d.due(t))
            assert got == scanned, f"due({t}) gave {got}, a scan finds {scanned} in {model}"
            for k in got:  # as the checker does: the next deadline of what it acted on
                d[k] = model[k] = t + 50
        assert {k: d.get(k) for k in d} == model and len(d) == len(model)


def test_a_deadline_set_later_replaces_the_earlier_one() -> None:
    d = Deadlines()
    d[("i", "c")] = 1.0
    d[("i", "c")] = 5.0  # a TTL pass pushed it out
    assert d.due(2.0) == [], "the replaced deadline came due"
    assert d.due(5.0) == [("i", "c")]


def test_many_passes_keep_the_heap_bounded() -> None:
    d = Deadlines()
    for n in range(20_000):
        d[("i", str(n % 10))] = float(n)
    assert len(d._heap) <= 2 * len(d) + 1024, f"the heap kept {len(d._heap)} entries for {len(d)} deadlines"
    assert sorted(d.due(1e9)) == sorted(("i", str(n)) for n in range(10))
