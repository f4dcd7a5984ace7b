"""The Consul agent core against an in-memory registry: indexes of blocking queries, ownership,
and the registry left unchanged by rejected writes."""

from __future__ import annotations

import asyncio

import pytest

from meshpilot.consul.agent import ConsulAgent
from meshpilot.consul.definitions import ConsulError, parse_service
from meshpilot.model import Check, CheckStatus, Instance, Service, ServicePort
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore


def _agent() -> ConsulAgent:
    return ConsulAgent(Registry(MemoryStore()))


def _register(agent: ConsulAgent, name: str, sid: str, node: str = "10.0.0.1", **extra: object) -> None:
    agent.register(parse_service({"Name": name, "ID": sid, "Port": 8080, **extra}, node), node)


def test_index_changes_only_when_the_answer_does() -> None:
    agent = _agent()
    _register(agent, "web", "web-1", Check={"TTL": "10s"})
    first = agent.answer("h/web", lambda: agent.health_service("web", False, []))
    _register(agent, "db", "db-1")
    again = agent.answer("h/web", lambda: agent.health_service("web", False, []))
    assert again.index == first.index, f"expected index {first.index} unchanged by another service, got {again.index}"
    agent.update_check("10.0.0.1", "service:web-1", "passing", "")
    changed = agent.answer("h/web", lambda: agent.health_service("web", False, []))
    assert changed.index > first.index, f"expected a larger index after the check passed, got {changed.index} <= {first.index}"


def test_blocking_query_waits_then_wakes_on_change() -> None:
    async def scenario() -> tuple[int, int, float]:
        agent = _agent()
        _register(agent, "web", "web-1", Check={"TTL": "10s"})
        start = agent.answer("k", lambda: agent.health_service("web", True, []))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        waiter = asyncio.create_task(agent.blocking("k", "svc:web.default", lambda: agent.health_service("web", True, []), start.index, 5))
        await asyncio.sleep(0.05)
        assert not waiter.done(), "expected the query to block while nothing changed"
        agent.update_check("10.0.0.1", "service:web-1", "passing", "")
        ans = await waiter
        return start.index, ans.index, loop.time() - t0

    before, after, took = asyncio.run(scenario())
    assert after != before and took < 1, f"expected a prompt wake with a new index, got {before}->{after} after {took:.2f}s"


def test_mesh_instances_are_visible_but_not_writable() -> None:
    agent = _agent()
    reg = agent.reg
    reg.put_service(Service(name="pay", ports=[ServicePort(name="http", port=80)]))
    reg.register(Instance(id="pay-1", service="pay", address="10.0.0.9", ports={"http": 9000}, source="mesh", labels={"version": "3"},
                          checks=[Check(id="hds", owner="hds", status=CheckStatus.passing)]))
    entries = agent.health_service("pay", True, [])
    assert [(e["Service"]["ID"], e["Service"]["Port"], e["Service"]["Meta"]["version"]) for e in entries] == [("pay-1", 9000, "3")], entries
    with pytest.raises(ConsulError) as err:
        agent.deregister("10.0.0.9", "pay-1")
    assert err.value.status == 404
    assert reg.instance("pay-1") is not None, "expected the mesh instance to stay registered"


def test_rejected_check_registration_leaves_registry_unchanged() -> None:
    agent = _agent()
    _register(agent, "web", "web-1")
    before = (agent.reg.services(), agent.reg.instances())
    for body in ({"Name": "c", "TTL": "1s"}, {"Name": "c", "ServiceID": "nope", "TTL": "1s"}, {"Name": "c", "ServiceID": "web-1"}):
        with pytest.raises(ConsulError):
            agent.register_check(body, "10.0.0.1")
    assert (agent.reg.services(), agent.reg.instances()) == before


def test_service_id_moving_to_another_name_replaces_the_instance() -> None:
    agent = _agent()
    _register(agent, "a", "x")
    _register(agent, "b", "x")
    assert [i.service for i in agent.reg.instances()] == ["b"]
    assert agent.reg.lookup("a") is None, "expected the emptied Consul-created service to be removed"
