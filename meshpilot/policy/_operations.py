"""The check a policy's ``operation`` selectors pass when the policy is written: each names an
operation the target service has now (the API catalog sets a service's apis from its OpenAPI
document, named by operationId), whose path template the sidecars can match.

A kind's own check sees only the policy; this one reads the registry, so the management API runs it
before it stores a policy. A stored policy whose operation later leaves the catalog stays stored:
its selector then resolves to nothing (``resolve_apis``) until the operation comes back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from meshpilot.model import ApiOperation
from meshpilot.model import service_key as model_service_key
from meshpilot.policy._filterspec import ApiSelector
from meshpilot.policy.authz import path_template_regex
from meshpilot.policy.kinds import PolicyBase
from meshpilot.registry import Registry

__all__ = ["operation_problems"]

_FILTER_PATH = 512  # the governance filter's longest path template


def operation_problems(policy: PolicyBase, registry: Registry) -> list[dict[str, str]]:
    """``[{field, reason}]`` for each ``operation`` selector of ``policy`` the target service cannot resolve."""
    found = list(_selectors(policy, ""))
    if not found:
        return []
    service = getattr(policy, "service", None)
    service_key = model_service_key(service, policy.namespace) if isinstance(service, str) else None
    svc = registry.service(service_key) if service_key is not None else None
    problems = []
    for field, operation in found:
        if service_key is None:
            problems.append({"field": field, "reason": "an operation is one service's: give the policy a service, or select by method + path"})
            continue
        if svc is None:
            problems.append({"field": field, "reason": f"service {service_key} is not registered, so it has no operation {operation!r}"})
            continue
        op = next((o for o in svc.apis if o.name == operation), None)
        if op is None:
            problems.append({"field": field, "reason": _unknown(service_key, operation, svc.apis)})
        elif path_template_regex(op.path) is None or len(op.path) > _FILTER_PATH:
            problems.append({"field": field, "reason": f"operation {operation!r} has the path {op.path}, which the sidecars cannot match "
                                                       "('{name}' must be a whole segment); select it by method + path instead"})
    return problems


def _unknown(service_key: str, operation: str, apis: list[ApiOperation]) -> str:
    names = sorted(o.name for o in apis if o.name)
    if not names:
        return f"{service_key} has no catalogued operations (upload or import its OpenAPI document: /v1/catalog/...), so no {operation!r}"
    close = [n for n in names if n.lower() == operation.lower()]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"{service_key} has no operation {operation!r}{hint} (operations: {shown})"


def _selectors(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(field path, operationId) of every selector with an ``operation`` in a policy's fields."""
    if isinstance(value, BaseModel):
        operation = getattr(value, "operation", None) if "operation" in type(value).model_fields else None
        if isinstance(operation, str):  # an API selector, a route's match
            yield (f"{path}.operation" if path else "operation", operation)
        if isinstance(value, ApiSelector):
            return
        for name in type(value).model_fields:
            yield from _selectors(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _selectors(item, f"{path}.{i}")
