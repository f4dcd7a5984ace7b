"""The front doors beyond xDS (HDS, the Consul and Eureka APIs, the policy routes), assembled into a
ControlPlane. Each listed module exposes ``install(core)``, which returns the ``Part`` it
contributes (parts.py) and sets nothing on the control plane; a part a setting switches off (a
front door's port) decides that in its own ``install``. A listed module that cannot be imported is
an error: every one ships with the product."""

from __future__ import annotations

import importlib
import logging

from meshpilot.controlplane import ControlPlane

__all__ = ["install_plugins"]

_PLUGINS = (
    "meshpilot.hds.plugin",
    "meshpilot.consul.plugin",
    "meshpilot.eureka.plugin",
    "meshpilot.policy.plugin",
    "meshpilot.identity.plugin",
    "meshpilot.tracing.plugin",
    "meshpilot.topology.plugin",
    "meshpilot.console.plugin",
    "meshpilot.catalog.plugin",
    "meshpilot.logs.plugin",
    "meshpilot.alerts.plugin",
)


def install_plugins(cp: ControlPlane) -> None:
    for name in _PLUGINS:
        cp.include(importlib.import_module(name).install(cp))
        logging.getLogger("meshpilot").debug("event=plugin_installed plugin=%s", name)
