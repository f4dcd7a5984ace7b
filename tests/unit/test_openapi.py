"""/openapi.json states what the model's validators check: each pattern in the document accepts
exactly the strings the model accepts."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpilot.api.app import API_PATH, INSTANCE_ID, LABEL, PORT_NAME, openapi_document
from meshpilot.model import ApiOperation, Instance, Service, ServicePort, ValidationError
from meshpilot.policy.api import policy_routes
from meshpilot.policy.mesh import load_kinds
from meshpilot.registry import Registry
from meshpilot.registry.store import MemoryStore

# letters, digits, the punctuation the patterns allow, and white space of every kind (some of
# which the model strips and some it does not)
ALPHABET = st.sampled_from(list("aZ09-_.:@/ ") + ["\t", "\n", "\x0b", "\x1c", "\x85", "\xa0", "\u2028", "\u3000", "\ufeff", "!", "é"])


def _service(name: str) -> object:
    return Service(name=name, ports=[ServicePort(name="http", port=80)])


def _instance(iid: str) -> object:
    return Instance(id=iid, service="web", address="10.0.0.1", ports={"http": 80})


CASES: list[tuple[str, str, Callable[[str], object]]] = [
    ("LABEL", LABEL, _service),
    ("PORT_NAME", PORT_NAME, lambda s: ServicePort(name=s, port=80)),
    ("INSTANCE_ID", INSTANCE_ID, _instance),
    ("API_PATH", API_PATH, lambda s: ApiOperation(path=s)),
]


@pytest.mark.parametrize("name,pattern,build", CASES, ids=[c[0] for c in CASES])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_document_patterns_agree_with_the_model(name: str, pattern: str, build: Callable[[str], object], data: st.DataObject) -> None:
    value = data.draw(st.one_of(st.text(ALPHABET, max_size=20), st.from_regex(pattern, fullmatch=True).filter(lambda s: len(s) < 300)))
    documented = re.fullmatch(pattern, value) is not None
    try:
        build(value)
        accepted = True
    except ValidationError:
        accepted = False
    assert documented == accepted, f"{name}: {value!r} is {'valid' if documented else 'invalid'} by the document but the model {'accepts' if accepted else 'refuses'} it"


def test_document_declares_every_path_parameter() -> None:
    load_kinds()
    doc = openapi_document(token=True, routes=policy_routes(Registry(MemoryStore())))  # the policy routes, as serve adds them
    assert any(p.startswith("/v1/policies/") for p in doc["paths"]), f"expected the policy routes, got {sorted(doc['paths'])}"
    for path, item in doc["paths"].items():
        wanted = set(re.findall(r"\{(\w+)\}", path))
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == wanted, f"{method.upper()} {path}: path parameters {sorted(wanted)} but the document declares {sorted(declared)}"
