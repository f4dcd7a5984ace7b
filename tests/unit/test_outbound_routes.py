"""The incremental outbound route builder produces exactly what the plain builder does."""

from __future__ import annotations

from envoy.config.route.v3 import route_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.model import Service
from meshpilot.translate.routes import OutboundRoutes, build_outbound_routes

names = st.sampled_from(["web", "api", "db", "cache", "auth"])
namespaces = st.sampled_from(["default", "prod"])


def _svc(name: str, ns: str, port: int, timeout: int) -> Service:
    return Service(name=name, namespace=ns, ports=[{"name": "http", "port": port}], traffic={"timeout_ms": timeout}, vip=f"240.240.1.{port % 250}")


steps = st.lists(
    st.tuples(st.booleans(), names, namespaces, st.sampled_from([80, 8080]), st.sampled_from([1000, 2000]),
              st.frozensets(st.sampled_from(["web.default", "api.prod", "db.default"]))),
    max_size=25,
)


@settings(max_examples=100, deadline=None)
@given(steps)
def test_incremental_build_matches_full_build(ops: list[tuple[bool, str, str, int, int, frozenset[str]]]) -> None:
    services: dict[str, Service] = {}
    builder = OutboundRoutes()
    for put, name, ns, port, timeout, guarded in ops:
        key = f"{name}.{ns}"
        if put:
            services[key] = _svc(name, ns, port, timeout)
        else:
            services.pop(key, None)
        optional = {"gov": guarded}
        got = route_pb2.RouteConfiguration.FromString(builder.build(list(services.values()), "mesh", None, optional))
        want = build_outbound_routes(list(services.values()), "mesh", None, optional)
        assert got == want, f"after {len(services)} services the incremental build differs"
