"""What parsing a Consul registration costs: its keys are folded once (the body, and its check
inside it), not once more per check; addresses are canonical either way."""

from __future__ import annotations

from typing import Any

import pytest

from meshpilot.consul import definitions
from meshpilot.consul.definitions import canonical_ip, parse_check, parse_service

BODY = {"ID": "web-1", "Name": "web", "Tags": ["a", "b"], "Port": 8080, "Address": "127.0.0.1", "Meta": {"Version": "1"},
        "Check": {"TTL": "60s", "Deregister_Critical_Service_After": "90s"}}


def test_a_registration_is_folded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = definitions.fold

    def counted(data: Any) -> Any:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(definitions, "fold", counted)
    sdef = parse_service(BODY, "10.0.0.1")
    objects = [c for c in calls if isinstance(c, dict)]
    assert len(objects) == 2, f"expected the body and its check folded once each, fold took {len(objects)} objects: {objects}"
    assert sdef.meta == {"Version": "1"}, f"expected Meta keys kept as given, got {sdef.meta}"
    assert sdef.checks[0].ttl_s == 60.0 and sdef.checks[0].deregister_after_s == 90.0, f"unexpected check {sdef.checks[0]}"


def test_a_folded_check_parses_as_the_raw_one() -> None:
    raw = {"CheckID": "c1", "HTTP": "http://127.0.0.1:1/h", "Interval": "10s", "Header": {"X-A": ["1"]}}
    assert parse_check(definitions.fold(raw), folded=True) == parse_check(raw), "expected the same check from folded and raw keys"


@pytest.mark.parametrize(("text", "expected"), [("127.0.0.1", "127.0.0.1"), ("2001:DB8::0:1", "2001:db8::1"),
                                                  ("db.internal", None), ("300.1.1.1", None)])
def test_canonical_ip(text: str, expected: str | None) -> None:
    assert canonical_ip(text) == expected, f"expected {text!r} -> {expected!r}, got {canonical_ip(text)!r}"
