"""Rules of the management API's bodies that JSON Schema cannot state, told to schemathesis.

/openapi.json states types, bounds, patterns and formats; a few rules relate values to each
other and are stated in words only: a service's port names and numbers are unique, and a
policy's fields follow its kind's rules (exactly one of some fields, valid regular expressions,
routes naming subsets it defines, rates such as ``100/s``), and an API catalog upload is a whole
OpenAPI document with its own rules (unique operationIds, templates starting with '/'). A body that breaks one of these is
answered 400 naming the field; such an answer to a generated body is not a disagreement with
the document. Loaded by test_openapi_conformance.py through ``SCHEMATHESIS_HOOKS``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis

_POLICY_WRITE = re.compile(r"^/v1/policies/[A-Za-z]+(/[^/]+/[^/]+)?$")


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a 400 to a schema-valid body that names one of the rules above."""
    if getattr(failure, "code", "") != "ST202" or response.status_code != 400:
        return True
    try:
        fields = [f.get("reason", "") for f in json.loads(response.content).get("fields", [])]
    except (ValueError, AttributeError):
        return True
    if case.operation.path in ("/v1/services", "/v1/services/{namespace}/{name}"):
        return not all("must be unique" in reason for reason in fields)
    if case.operation.path == "/v1/catalog/{namespace}/{name}" and case.method == "PUT":
        return not fields
    return not (_POLICY_WRITE.match(case.operation.path) and case.method in ("POST", "PUT") and fields)
