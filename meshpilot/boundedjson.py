"""JSON from the network with its nesting bounded, for every HTTP front door.

Python's decoder recurses once per level, so a body like ``[[[[...`` raises ``RecursionError``
(which a front door would answer with a 500), and a document it can still decode may be too deep
for the code that walks it afterwards (validation, re-encoding a stored policy, protobuf).
``loads`` refuses any document nested deeper than ``MAX_DEPTH`` with a ``ValueError``, which
every front door already answers with a 400 naming the body.

A number without a fractional part (``5.0``, ``1e3``) decodes as an integer, as JSON Schema
counts it, so strict validation takes it where an integer is due.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "TooDeep", "loads"]

MAX_DEPTH = 64  # the deepest real input (an AdmissionReview's pod, an injected Envoy resource) is ~30


class TooDeep(ValueError):
    pass


def loads(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads``, refusing documents nested deeper than ``max_depth`` arrays and objects."""
    opens = raw.count(b"[") + raw.count(b"{")
    try:
        doc = json.loads(raw, parse_float=_number)
    except RecursionError:
        raise TooDeep(f"nested deeper than {max_depth} levels") from None
    if opens > max_depth:  # only then can it be too deep
        _check_depth(doc, max_depth)
    return doc


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _check_depth(doc: Any, max_depth: int) -> None:
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise TooDeep(f"nested deeper than {max_depth} levels")
        for child in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
