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


def test_check_definitions_and_registration_are_stored_before_the_answer() -> None:
    agent = _agent()
    _register(agent, "web", "web-1", Check={"TTL": "10s"}, Meta={"team": "a"})
    stored = agent.reg.store.get("meta", "consul/checks/consul:10.0.0.1:web-1")
    assert stored and stored[0]["ttl_s"] == 10, f"expected the TTL check stored when register returns, got {stored}"
    again = ConsulAgent(agent.reg)
    assert again.checks_json(agent.reg.instance("consul:10.0.0.1:web-1"), None, with_node=False)[0]["Definition"] == {"TTL": "10s"}
    assert again.agent_services("10.0.0.1")["web-1"]["Meta"] == {"team": "a"}, "expected Meta as registered after a restart"


def test_meta_and_tagged_addresses_as_registered() -> None:
    agent = _agent()
    _register(agent, "web", "web-1", Tags=["grpc"], Meta={"version": "2", "zone": "z1"}, Address="10.0.0.5",
              TaggedAddresses={"wan": {"Address": "198.51.100.1", "Port": 1}})
    [entry] = agent.health_service("web", False, [])
    svc = entry["Service"]
    assert svc["Meta"] == {"version": "2", "zone": "z1"}, f"expected Meta without an added protocol, got {svc['Meta']}"
    assert svc["TaggedAddresses"] == {"wan": {"Address": "198.51.100.1", "Port": 1}, "lan_ipv4": {"Address": "10.0.0.5", "Port": 8080},
                                      "wan_ipv4": {"Address": "10.0.0.5", "Port": 8080}}, svc["TaggedAddresses"]
    inst = agent.reg.instance("consul:10.0.0.1:web-1")
    assert inst is not None and inst.labels == {"version": "2"} and inst.zone == "z1", inst
    assert agent.reg.lookup("web").ports[0].protocol == "grpc", "expected the protocol on the service port"


def test_names_consul_accepts_are_kept_and_one_mesh_name_has_one_consul_name() -> None:
    agent = _agent()
    _register(agent, "api.v2", "a-1")
    _register(agent, "API.v2", "a-2")
    assert sorted(e["Service"]["Service"] for e in agent.health_service("api.v2", False, [])) == ["API.v2", "api.v2"]
    svc = agent.reg.lookup("api-v2")
    assert svc is not None and svc.labels.get("consul-name") == "api.v2", svc
    assert agent.catalog_services() == {"api.v2": []}
    with pytest.raises(ConsulError) as err:
        _register(agent, "api_v2", "a-3")
    assert err.value.status == 400 and "api-v2" in err.value.message, err.value.message
    agent.register(parse_service({"Name": "bare", "ID": "b-1", "Port": 0}, "10.0.0.1"), "10.0.0.1")
    inst = agent.reg.instance("consul:10.0.0.1:b-1")
    assert inst is not None and inst.ports == {"http": 0} and not inst.routable, inst
    assert agent.health_service("bare", False, [])[0]["Service"]["Port"] == 0


def test_a_heartbeat_with_a_new_note_changes_no_index() -> None:
    agent = _agent()
    _register(agent, "web", "web-1", Check={"TTL": "10s"})
    agent.update_check("10.0.0.1", "service:web-1", "passing", "alive 0")
    before = agent.answer("h", lambda: agent.health_service("web", True, []))
    revision = agent.reg.revision
    for n in range(1, 4):
        agent.update_check("10.0.0.1", "service:web-1", "passing", f"alive {n}")
    after = agent.answer("h", lambda: agent.health_service("web", True, []))
    assert (after.index, agent.reg.revision) == (before.index, revision), "expected notes alone to change neither the index nor the registry"
    assert agent.agent_checks("10.0.0.1")["service:web-1"]["Output"] == "alive 3", "expected the agent view to show the newest note"
    agent.update_check("10.0.0.1", "service:web-1", "warning", "slow")
    assert agent.answer("h2", lambda: agent.health_service("web", False, [])).index > before.index, "expected a status change to count"


def test_wait_hash_blocks_until_the_content_changes() -> None:
    async def scenario() -> tuple[bool, str, str]:
        agent = _agent()
        _register(agent, "web", "web-1")
        first = agent.answer("s", lambda: agent.agent_services("10.0.0.1")["web-1"])
        waiter = asyncio.create_task(agent.blocking("s", "catalog", lambda: agent.agent_services("10.0.0.1")["web-1"], 0, 5, first.hash))
        _register(agent, "db", "db-1")  # another service: same content
        await asyncio.sleep(0.05)
        parked = not waiter.done()
        _register(agent, "web", "web-1", Tags=["new"])
        ans = await asyncio.wait_for(waiter, 2)
        return parked, first.hash, ans.hash

    parked, before, after = asyncio.run(scenario())
    assert parked, "expected a query with the current hash to block while the service is unchanged"
    assert before and after != before, f"expected a new content hash after the change, got {before} -> {after}"
