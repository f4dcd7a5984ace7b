"""Policy text with a number JSON cannot carry is refused naming ``text``, whichever format it is read as
(YAML's ``.inf``, and JSON's ``1e999``, which Python reads as infinity)."""

from __future__ import annotations

import pytest

from meshpilot.api.app import ApiError
from meshpilot.console.plugin import parse_text


@pytest.mark.parametrize("text,fmt", [("1e999", "json"), ('{"rate": -1e400}', "json"), ("[1, 2e308]", "json"), ("rate: .inf\n", "yaml")])
def test_infinity_is_refused_naming_text(text: str, fmt: str) -> None:
    with pytest.raises(ApiError) as caught:
        doc = parse_text(text, fmt)
        pytest.fail(f"expected {text!r} ({fmt}) refused, got {doc!r}")
    assert caught.value.status == 400 and caught.value.fields == [{"field": "text", "reason": "NaN or infinity"}], \
        f"expected a 400 naming text (NaN or infinity), got {caught.value.status} {caught.value.fields}"
