"""The policies' part of the management API: the policy routes join its route table.

The policies themselves (kinds, engine, governance) are assembled by the control plane
(policy/mesh.py) and publish through its publisher; adding a kind is adding a module to this
package (it registers itself on import).
"""

from __future__ import annotations

from meshpilot.parts import Core, Part
from meshpilot.policy.api import policy_routes

__all__ = ["install"]


def install(core: Core) -> Part:
    return Part(routes=policy_routes(core.registry))
